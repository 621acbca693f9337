"""Training layer — train(cfg, callbacks=()) behind ``train.py``, its reports, the offline YOLO trainer; imports base, data,
models and recognition's detectors (animeface finds the faces of face-view training and labels real pictures for the YOLO
tool), so it sits above recognition in the import order (README, `tests/core/test_layering.py`).

Modules: `run` (`train`, `TrainResult`, `optimized_metric`), `budget` (the epoch budget), `reports` (evaluation,
learning curves, W&B media), `wandb_logger` (offline-safe W&B), `evaluation` (metrics and report files), `ema`,
`formats` (channels-last), `detector` (the YOLO trainer), `launch` (`train_launched`: a DDP trainer trains in a process
of its own, since its launcher re-runs the command line), `epoch_progress` (the callback reporting epochs),
`stop_together` (a SIGTERM every DDP rank obeys at the same step). This front door re-exports what callers use;
importing it pulls in neither torch nor Lightning.
"""

from __future__ import annotations

from ..confutil import CONFIG_DIR, check_group_overrides
from .budget import apply_epoch_budget
from .reports import evaluate_checkpoint
from .launch import train_launched
from .run import TrainResult, launch_rank, optimized_metric, train
from .wandb_logger import build_wandb_logger

__all__ = [
    "CONFIG_DIR",
    "TrainResult",
    "apply_epoch_budget",
    "build_wandb_logger",
    "check_group_overrides",
    "evaluate_checkpoint",
    "launch_rank",
    "optimized_metric",
    "train",
    "train_launched",
]
