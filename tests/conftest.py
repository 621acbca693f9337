"""Shared fixtures: project paths, the real-data folder, small synthetic datasets, isolated logs.

Area-specific fixtures live in each area's own conftest (tests/<area>/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ARD_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _processes_naming(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().decode("utf-8", "replace"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="session")
def processes_naming():
    """`processes_naming(text)`: the live processes whose command line holds `text` (Linux /proc), e.g. every rank
    of a training that runs apart from its caller (their command lines name its launch.yaml)."""
    return _processes_naming


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real labelled images); tests that need it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set ARD_DATA_DIR to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (8 characters with near-twins, 24 images each at 96 px), made once per session."""
    from anime_role_detect.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "chars"
    generate_dataset(root, n_characters=8, images_per_character=24, size=96, seed=0)
    return root


@pytest.fixture()
def log_dir(tmp_path) -> Path:
    """Loguru sinks pointed at a temporary folder for one test."""
    from anime_role_detect.log import setup_logging

    return setup_logging({"dir": str(tmp_path / "logs"), "console_level": "WARNING"})


def train_tiny_classifier(root: Path, data: Path, epochs: int, size: int = 64) -> Path:
    """A tiny random-init classifier trained on `data` by the real `training.train`; returns its checkpoint."""
    from anime_role_detect.confutil import compose_config
    from anime_role_detect.training import train

    cfg = compose_config("train", [
        f"paths.root_dir={root}", f"paths.output_dir={root / 'run'}", "data=folder", f"data.root={data}", "~experiment",
        f"data.image_size={size}", "data.batch_size=16", "data.num_workers=0", "model=tiny", "trainer=cpu",
        f"trainer.max_epochs={epochs}", "logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
        "log.console_level=WARNING", "evaluate=false", "seed=0",
    ])
    return Path(train(cfg).ckpt_path)


@pytest.fixture(scope="session")
def train_tiny():
    """`train_tiny_classifier(root, data, epochs, size)` as a fixture."""
    return train_tiny_classifier
