"""Version registry: complete versions only, atomic `latest`, promote and roll back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from anime_role_detect.errors import RegistryError
from anime_role_detect.registry import Registry, main


def _make(reg: Registry, payload: str, parent=None, promote=True) -> str:
    st = reg.staging_dir()
    (st / "metrics.json").write_text('{"val/acc": 0.5}')
    (st / "gallery.json").write_text(payload)
    return reg.commit(st, parent=parent, promote=promote)


def test_commit_promote_rollback(tmp_path, capsys):
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="no live version"):
        reg.path()
    v1 = _make(reg, "one")
    v2 = _make(reg, "two", parent=v1)
    assert reg.latest_id() == v2
    assert (reg.path() / "gallery.json").read_text() == "two"
    assert (reg.path() / "parent").read_text().strip() == v1
    assert [v.id for v in reg.list()] == [v1, v2]
    assert reg.rollback() == v1 and reg.latest_id() == v1
    v3 = _make(reg, "three", promote=False)
    assert reg.latest_id() == v1
    assert main(["--root", str(tmp_path), "promote", v3]) == 0
    assert reg.latest_id() == v3
    assert main(["--root", str(tmp_path), "list"]) == 0
    assert "* " + v3 in capsys.readouterr().out
    assert main(["--root", str(tmp_path), "promote", "v-missing"]) == 2


def test_staging_is_invisible_and_cleanable(tmp_path):
    reg = Registry(tmp_path)
    v1 = _make(reg, "one")
    st = reg.staging_dir()
    (st / "gallery.json").write_text("half")
    assert [v.id for v in reg.list()] == [v1]
    assert reg.clean_staging() == 1
    assert reg.latest_id() == v1


def test_kill_during_version_write_keeps_latest(tmp_path):
    reg = Registry(tmp_path)
    v1 = _make(reg, "one")
    code = (
        "import os, sys\n"
        "from anime_role_detect.registry import Registry\n"
        f"reg = Registry({str(tmp_path)!r})\n"
        "st = reg.staging_dir()\n"
        "(st / 'gallery.json').write_text('partial')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode != 0
    assert reg.latest_id() == v1
    assert (reg.path() / "gallery.json").read_text() == "one"
    assert [v.id for v in reg.list()] == [v1]
