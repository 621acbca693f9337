"""`EpochProgress`: a Lightning callback that reports each epoch (and its val/acc) to a caller and lets it cancel.

An epoch is reported once its checkpoints are on disk: Lightning saves them in the last ``on_train_epoch_end`` hooks,
so epoch N is reported as epoch N + 1 starts (or training ends). A run stopped on hearing "epoch N" resumes from
epoch N's ``last.ckpt``.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L

Report = Callable[[int, int, str], None]  # (epochs done, epochs in all, message)


class EpochProgress(L.Callback):
    """Report epochs done out of ``max_epochs`` from global rank 0; `check` runs after every batch (raise to cancel)."""

    def __init__(self, report: Report | None, check: Callable[[], None] | None = None) -> None:
        self.report = report
        self.check = check
        self._started_at = 0

    def _emit(self, trainer: L.Trainer, message: str) -> None:
        if self.report is not None and trainer.is_global_zero:
            total = int(trainer.max_epochs or 1)
            self.report(min(trainer.current_epoch, total), total, message)

    def _finished(self, trainer: L.Trainer) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        self._emit(trainer, f"epoch {trainer.current_epoch}: val/acc={float(acc):.3f}" if acc is not None else "")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started_at = trainer.current_epoch
        self._emit(trainer, f"resumed at epoch {trainer.current_epoch}" if trainer.current_epoch else "")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self._started_at:
            self._finished(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.check is not None:
            self.check()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished(trainer)
