"""Workflow fixtures: a fake booru on 127.0.0.1 serving synthetic characters, fast HTTP policy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakebooru import FakeBooru, make_posts  # noqa: E402

from anime_role_detect.data.synthetic import make_characters  # noqa: E402

#: Short timeouts and backoff so fault scenarios take well under a second each.
FAST_HTTP = {"timeout_s": 0.5, "retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "rate_limit_per_s": 0}


@pytest.fixture()
def specs():
    return make_characters(3, seed=3, twin_fraction=0.0)


@pytest.fixture()
def booru(specs):
    server = FakeBooru(make_posts(specs, per_character=12, size=96, seed=1), timeout_sleep_s=1.0)
    server.start()
    yield server
    server.stop()


#: Tiny training: random-init resnet10t at 64 px, a few epochs, no progress bar, one thread.
TINY_TRAIN = [
    "data=folder", "~experiment", "model=efficientnet_lite0", "trainer.max_epochs=4", "data.image_size=96",
    "data.batch_size=16", "logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
    "callbacks.early_stopping.patience=10", "threads=1", "data.num_workers=0",
]


def workflow_config(root: Path, base_url: str | None, characters: list[dict], extra: list[str] = ()):
    """conf/workflow.yaml composed for tests: the fake booru (None: set the collector in `extra`), fast HTTP,
    tiny training, everything under `root`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from anime_role_detect.confutil import CONFIG_DIR

    booru = [
        "collector=danbooru", f"collector.base_url={base_url}", "collector.page_size=10", "collector.limit_per_character=40",
        *[f"collector.http.{k}={v}" for k, v in FAST_HTTP.items()],
    ] if base_url else []
    overrides = [f"paths.root_dir={root}", *booru, "clean.min_side=48", "gallery.embedder.flip_tta=false",
                 "gallery.embedder.batch_size=64", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="workflow", overrides=overrides)
    cfg.train.overrides = list(TINY_TRAIN)
    cfg.characters = OmegaConf.create(characters)
    return cfg
