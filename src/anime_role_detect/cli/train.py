"""``python train.py`` / ``python -m anime_role_detect.train`` / ``ard-train``: train a character classifier
(conf/train.yaml); with ``register=true`` (the demo's default) the run also becomes the live registry version."""

from __future__ import annotations

import sys
from typing import Optional

from omegaconf import DictConfig

from ..training import check_group_overrides, optimized_metric, train
from . import hydra_main, user_errors_exit


@hydra_main("train")
def app(cfg: DictConfig) -> Optional[float]:
    """Train, evaluate, publish when ``register=true``; return the optimised metric for Hydra sweepers."""
    result = train(cfg)
    if cfg.get("register", False) and result.is_global_zero:
        from ..workflow.publish import publish_training_run, report_published

        report_published(publish_training_run(cfg, result, promote=not _sweeping()))
    return optimized_metric(cfg, result)


def _sweeping() -> bool:
    """True inside a Hydra multirun: each run is registered, none promoted (promote the best with ``ard-registry``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@user_errors_exit
def check_cli() -> None:
    """One-line errors for unknown or null config-group options, before Hydra prints its own."""
    check_group_overrides(sys.argv[1:])


def main() -> None:
    """Check the command line, then run the Hydra app."""
    check_cli()
    app()


if __name__ == "__main__":
    main()
