"""Train a character classifier: ``python train.py [group=option ...] [key=value ...]``.

Thin Hydra entry point; the work happens in `anime_role_detect.training.train`. See docs/training.md.
"""

from __future__ import annotations

import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from anime_role_detect.cli import user_errors_exit
from anime_role_detect.training import check_group_overrides, optimized_metric, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> Optional[float]:
    """Train, evaluate, and return the optimised metric for Hydra sweepers."""
    result = train(cfg)
    return optimized_metric(cfg, result)


@user_errors_exit
def check_cli() -> None:
    """One-line errors for unknown config-group options, before Hydra prints its own."""
    check_group_overrides(sys.argv[1:])


if __name__ == "__main__":
    check_cli()
    main()
