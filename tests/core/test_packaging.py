"""`pip install .` works, not only editable installs: the wheel carries conf/ and every package, and its
console scripts and ``python -m`` entry points run from a folder outside the checkout.

The wheel is built offline from a copy of the sources and installed without dependencies into a temporary
venv that sees the project's .venv site-packages through a plain ``.pth`` line (so the editable install's
finder, which only a site folder's own ``.pth`` files start, cannot leak the checkout in).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def source_packages() -> set[str]:
    """Every package under src/ (a folder with ``__init__.py``), plus conf/ shipped as ``anime_role_detect.conf``."""
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py") if "__pycache__" not in p.parts}
    return found | {"anime_role_detect.conf"}


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert source_packages() - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - source_packages() == set(), "these listed packages do not exist under src/"


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline (no build isolation) from a clean copy of the sources."""
    copy = tmp_path_factory.mktemp("sdist") / "anime_role_detect"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    dist = copy.parent / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(copy)],
         cwd=copy.parent, env=dict(os.environ))
    (whl,) = dist.glob("anime_role_detect-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> tuple[Path, dict[str, str]]:
    """A fresh venv with only the wheel installed; the project's dependencies are visible through a .pth line."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=venv, env=dict(os.environ))
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ARD_CONF_DIR", "ARD_ROOT", "ARD_REGISTRY", "VIRTUAL_ENV")}
    env.update({"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return venv, env


slow = pytest.mark.slow


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A working folder outside the checkout."""
    assert ROOT not in tmp_path.parents
    return tmp_path


@slow
def test_wheel_ships_conf_and_static_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"anime_role_detect/conf/{n}" for n in shipped} <= names
    assert "anime_role_detect/serve/static/index.html" in names and "anime_role_detect/conf/train.yaml" in names


@slow
def test_installed_package_is_the_wheel_not_the_checkout(installed, outside):
    venv, env = installed
    code = "import anime_role_detect, anime_role_detect.confutil as c; print(anime_role_detect.__file__); print(c.CONFIG_DIR)"
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=outside, env=env).stdout.split()
    assert Path(out[0]).is_relative_to(venv) and Path(out[1]).is_relative_to(venv), out
    assert (Path(out[1]) / "train.yaml").is_file() and (Path(out[1]) / "experiment" / "demo.yaml").is_file()


@slow
def test_console_scripts_and_modules_run_outside_the_checkout(installed, outside):
    venv, env = installed
    bin_ = venv / "bin"
    assert "serve is powered by Hydra" in _run([str(bin_ / "ard-serve"), "--help"], cwd=outside, env=env).stdout
    _run([str(bin_ / "ard-registry"), "list"], cwd=outside, env=env)
    assert "workflow is powered by Hydra" in _run([str(bin_ / "python"), "-m", "anime_role_detect.workflow", "--help"],
                                                  cwd=outside, env=env).stdout
    for script in ("ard-train", "ard-infer", "ard-fusion"):
        _run([str(bin_ / script), "--help"], cwd=outside, env=env)
    assert "usage: ard-gallery" in _run([str(bin_ / "ard-gallery"), "--help"], cwd=outside, env=env).stdout


@slow
def test_module_train_fast_dev_run_outside_the_checkout(installed, outside, synthetic_root):
    venv, env = installed
    args = [str(venv / "bin" / "python"), "-m", "anime_role_detect.train", "+trainer.fast_dev_run=true", "~experiment",
            "data=folder", f"data.root={synthetic_root}", "data.image_size=64", "data.num_workers=0", "model=tiny", "trainer=cpu",
            "logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "log.console_level=WARNING", "threads=1"]
    _run(args, cwd=outside, env=env, timeout=600)
    (run,) = (outside / "outputs" / "train" / "runs").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.json").is_file()
    assert (outside / "logs" / "training.log").is_file()  # paths follow the working folder, not the package
