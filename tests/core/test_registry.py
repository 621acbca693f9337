"""Version registry: complete versions only, atomic `latest`, promote and roll back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from anime_role_detect.errors import RegistryError
from anime_role_detect.registry import Registry
from anime_role_detect.registry.__main__ import main


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


def test_rollback_twice_goes_back_two_versions(tmp_path):
    reg = Registry(tmp_path)
    v1, v2, v3 = _make(reg, "one"), _make(reg, "two"), _make(reg, "three")
    assert reg.rollback() == v2 and reg.latest_id() == v2
    assert reg.rollback() == v1 and reg.latest_id() == v1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    v4 = _make(reg, "four")  # a promotion after rollbacks starts a new branch: back from v4 is v1
    assert reg.rollback() == v1
    assert main(["--root", str(tmp_path), "promote", v3]) == 0
    assert main(["--root", str(tmp_path), "rollback"]) == 0 and reg.latest_id() == v1
    assert v4 in reg.history()


def test_derive_carries_links_writes_changes_and_commits_once(tmp_path):
    reg = Registry(tmp_path)
    v1 = _make(reg, "one")
    (reg.path(v1) / "model.ckpt").write_bytes(b"weights")
    with reg.derive("latest", kind="edit", promote=True, skip={"metrics.json"}, extra={"why": "test"}) as d:
        assert d.base_id == v1 and (d.dir / "model.ckpt").samefile(reg.path(v1) / "model.ckpt")
        assert not (d.dir / "metrics.json").exists() and not (d.dir / "manifest.json").exists()
        d.writable("gallery.json").write_text("two")  # in-place write must not touch the base
        assert [v.id for v in reg.list()] == [v1]  # invisible until committed
    assert d.id and reg.latest_id() == d.id
    assert (reg.path(v1) / "gallery.json").read_text() == "one"
    assert (reg.path() / "gallery.json").read_text() == "two"
    assert (reg.path() / "parent").read_text().strip() == v1
    assert reg.info(d.id).kind == "edit"


def test_derive_failure_leaves_no_version(tmp_path):
    reg = Registry(tmp_path)
    v1 = _make(reg, "one")
    with pytest.raises(RuntimeError):
        with reg.derive(v1, kind="edit", promote=True) as d:
            (d.dir / "gallery.json").unlink()
            raise RuntimeError("writer failed")
    assert [v.id for v in reg.list()] == [v1] and reg.latest_id() == v1
    assert not list(reg.versions_dir.glob(".staging-*"))


def test_staging_folder_killed_after_its_manifest_is_never_a_version(tmp_path):
    """A writer killed between writing manifest.json and the rename leaves a hidden folder that looks complete:
    it is neither listed nor promotable."""
    reg = Registry(tmp_path)
    v1 = _make(reg, "one")
    st = reg.staging_dir()
    (st / "manifest.json").write_text('{"id": "x"}')
    assert [v.id for v in reg.list()] == [v1]
    with pytest.raises(RegistryError, match="not a version id"):
        reg.promote(st.name)
    assert main(["--root", str(tmp_path), "promote", st.name]) == 2 and reg.latest_id() == v1
