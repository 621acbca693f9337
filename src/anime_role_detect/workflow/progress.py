"""Progress events ``{stage, done, total, message}``: one source, many consumers (CLI bars, log, API stream)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..log import get_logger

_log = get_logger("system")


@dataclass
class ProgressEvent:
    """One step of progress within a stage."""

    stage: str
    done: int
    total: int
    message: str = ""
    time: float = field(default_factory=time.time)

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)

    def to_json(self) -> dict:
        return {**asdict(self), "percent": round(100 * self.fraction, 1)}


Listener = Callable[[ProgressEvent], None]


class CancelledError(Exception):
    """Raised inside a run when a listener asked to cancel."""


class Progress:
    """Broadcasts events to listeners, keeps the latest event per stage, and carries a cancel flag."""

    def __init__(self, log: bool = True) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self.stages: dict[str, ProgressEvent] = {}
        self.events: list[ProgressEvent] = []
        self._cancel = threading.Event()
        self._log = log

    def subscribe(self, fn: Listener) -> Listener:
        with self._lock:
            self._listeners.append(fn)
        return fn

    def unsubscribe(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def emit(self, stage: str, done: int, total: int, message: str = "") -> ProgressEvent:
        """Publish an event; raises `CancelledError` if cancellation was requested."""
        ev = ProgressEvent(stage=stage, done=done, total=total, message=message)
        self.publish(ev)
        self.check_cancelled()
        return ev

    def publish(self, ev: ProgressEvent, log: bool = True) -> None:
        """Record `ev` and hand it to the listeners (no cancel check): also how events made elsewhere, e.g. in a
        job's own process, join this run's history; `log=False` where they were logged there."""
        with self._lock:
            self.stages[ev.stage] = ev
            self.events.append(ev)
            listeners = list(self._listeners)
        if log and self._log and (ev.done == ev.total or ev.done == 0 or ev.message):
            _log.info(f"[{ev.stage}] {ev.done}/{ev.total} {ev.message}".rstrip())
        for fn in listeners:
            fn(ev)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise CancelledError("cancelled by user")
