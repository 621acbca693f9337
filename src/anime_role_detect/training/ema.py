"""Exponential moving average of the weights, sized to the run (`callbacks=[default,ema]`).

Lightning's `EMAWeightAveraging` takes a fixed per-step decay: 0.999 averages over ~1,000 optimizer steps, which is
a whole run on a 300-picture set (the average would still be mostly the first weights) and a tenth of one on a big
set. `RunLengthEMA` sets the horizon as a share of the run's planned optimizer steps instead, so one setting carries
across set sizes. Validation, the saved checkpoints (their ``state_dict``) and the evaluation report then use the
averaged weights; Lightning keeps the raw ones under ``current_model_state``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

from ..errors import ConfigError


class RunLengthEMA(WeightAveraging):
    """EMA with decay ``1 - 1 / (horizon x planned steps)``; updates start after ``start_fraction`` of the run (the
    first steps, with fresh heads, stay out of the average)."""

    def __init__(self, horizon: float = 0.1, start_fraction: float = 0.1, use_buffers: bool = True) -> None:
        if not 0.0 < float(horizon) <= 1.0 or not 0.0 <= float(start_fraction) < 1.0:
            raise ConfigError(
                f"callbacks.ema: horizon={horizon} must be in (0, 1] and start_fraction={start_fraction} in [0, 1) "
                "(shares of the run's optimizer steps)"
            )
        super().__init__(use_buffers=use_buffers)
        self.horizon = float(horizon)
        self.start_fraction = float(start_fraction)
        self.decay: float | None = None
        self.start_step = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            steps = max(1, int(trainer.estimated_stepping_batches))
            self.decay = 1.0 - 1.0 / max(1.0, self.horizon * steps)
            self.start_step = int(self.start_fraction * steps)
            self._kwargs["avg_fn"] = get_ema_avg_fn(decay=self.decay)
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step
