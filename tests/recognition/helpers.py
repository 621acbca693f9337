"""Helpers shared by the recognition tests: compose the real Hydra configs with overrides."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"
TRAIN_CHARS = 8

def compose(config_name: str, overrides: list[str]):
    """`conf/<config_name>.yaml` composed exactly as the entry point would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def infer_cfg(overrides: list[str] | None = None) -> dict:
    """`conf/infer.yaml` composed with overrides, as a plain dict."""
    from anime_role_detect.recognition.gallery_cli import compose_config

    return compose_config(overrides or [])
