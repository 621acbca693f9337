"""`python -m anime_role_detect.serve` refuses bad configuration with one clear line (exit 2), before loading anything."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("override, needle", [
    ("port=not_a_port", "port"),
    ("limits.max_files=0", "limits.max_files"),
    ("+limits.max_upload_gb=1", "limits.max_upload_gb"),
])
def test_bad_config_is_one_line_error(tmp_path, override, needle):
    r = subprocess.run([sys.executable, "-m", "anime_role_detect.serve", override, f"hydra.run.dir={tmp_path}",
                        f"registry_dir={tmp_path / 'reg'}", f"feature_log.dir={tmp_path / 'fl'}"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "serve.yaml" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
