"""Helpers for training tests: compose the real `conf/train.yaml` with tiny overrides, or run `train.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

from anime_role_detect.confutil import CONFIG_DIR

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(root: Path, data_root: Path, epochs: int = 1) -> list[str]:
    """Small, fast settings: random-init resnet10t at 64 px on CPU, CSV logger, no progress bar, not registered."""
    return [
        f"paths.root_dir={root}",
        "register=false",
        f"data.root={data_root}",
        "data.synthetic=null",
        "data.image_size=64",
        "data.batch_size=16",
        "model=tiny",
        "trainer=cpu",
        f"trainer.max_epochs={epochs}",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "logger=csv",
        "log.console_level=WARNING",
        "threads=1",
    ]


def compose(overrides: Sequence[str]):
    """`conf/train.yaml` composed exactly as `train.py` would, with `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run_train_py(args: Sequence[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `train.py` entry point in a subprocess."""
    e = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.update(env or {})
    e.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "train.py"), *args],
        cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root):
    """One short real training run (in-process `training.train`) shared by a module's tests."""
    import torch

    from anime_role_detect.training import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    cfg = compose(tiny_overrides(root, synthetic_root, epochs=6) + [f"paths.output_dir={root / 'out'}", "model.optimizer.lr=3e-3"])
    return train(cfg)


@pytest.fixture(scope="session")
def tiny():
    """`tiny_overrides(root, data_root, epochs)` as a fixture."""
    return tiny_overrides


@pytest.fixture(scope="session")
def compose_cfg():
    """`compose(overrides)` as a fixture."""
    return compose


@pytest.fixture(scope="session")
def train_py():
    """`run_train_py(args, cwd, timeout, env)` as a fixture."""
    return run_train_py


@pytest.fixture(scope="session")
def group_picture_root(tmp_path_factory) -> dict:
    """A dataset folder holding a booru group picture's copies: 4 pictures of char_00 also filed (same bytes) under
    char_01, 2 pictures of char_01 and char_02 tied by the clean stage's ``multi:`` group (different bytes), and
    a resized re-encode of a char_02 picture filed under char_03 (a near-duplicate: another picture, not a copy)."""
    import json

    from PIL import Image

    from anime_role_detect.data.layout import MULTI_GROUP_PREFIX
    from anime_role_detect.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("groups") / "chars"
    generate_dataset(root, n_characters=4, images_per_character=12, size=96, seed=5, twin_fraction=0.0)
    same_bytes = []
    for k, src in enumerate(sorted((root / "char_00").glob("*.png"))[:4]):
        dst = root / "char_01" / f"group_{k}.png"
        dst.write_bytes(src.read_bytes())
        same_bytes.append((f"char_00/{src.name}", f"char_01/{dst.name}"))
    multi = [max((root / c).glob("default_*.png")).relative_to(root).as_posix() for c in ("char_01", "char_02")]
    lines = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines() if x.strip()]
    for line in lines:
        if line["file_name"] in multi:
            line["group"] = f"{MULTI_GROUP_PREFIX}post-7"
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    src = min((root / "char_02").glob("*.png"))
    Image.open(src).convert("RGB").resize((90, 90)).save(root / "char_03" / "reencoded.jpg", quality=90)
    return {"root": root, "same_bytes": same_bytes, "multi": multi,
            "near_duplicate": (f"char_02/{src.name}", "char_03/reencoded.jpg")}
