"""`StopTogether`: every DDP rank, on every node, stops after the same training batch when one of them gets SIGTERM.

Lightning's own SIGTERM handler broadcasts from inside the handler, on the rank that got the signal, a collective the
other ranks are not in at that moment; it meets whatever collective they run next, and on two one-rank nodes the
ranks hung until killed in 4 of 7 runs (node 1 waited out node 0's 20 s grace). The training child (`launch`)
replaces that handler, once Lightning has installed it, with one that only raises a flag; after each training batch
the ranks reduce the flag together (one all-reduce of a boolean) and all raise `SIGTERMException` at the same step.
Lightning restores the handlers it found when training ends. The epoch in progress is lost, as with any stop.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopTogether(L.Callback):
    """Stop all ranks after the same batch once any rank has been sent SIGTERM (DDP only; one process is untouched)."""

    def __init__(self) -> None:
        self.asked = False

    def _ask(self, signum: int, frame: FrameType | None) -> None:
        self.asked = True

    def _take_sigterm(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._ask)  # Lightning's handler goes: it was installed just before

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigterm(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigterm(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(self.asked, all=False):
            raise SIGTERMException()
