"""Run one workflow job in a child process: the server never imports the training stack nor keeps its memory.

A job's child is started with ``spawn`` (forking a threaded server is unsafe) and given the composed config, the
runner's ``_target_`` spec, the server's Hydra search path and its log settings. Progress events come back over a
pipe into the job's `Progress`; a cancel sets a shared flag the child turns into its own cancel, and a child that
has not stopped `JobSpec.grace_s` later is terminated (every stage writes atomically and resumes, so nothing is lost). A
child whose server died (even by SIGKILL) cancels itself the same way. The outcome comes back as plain JSON.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

from ..errors import UserError
from ..log import get_logger
from ..workflow.progress import CancelledError, Progress, ProgressEvent

_log = get_logger("system")

POLL_S = 0.2  # how often the parent looks at the pipe, the cancel flag and the child's liveness


class JobFailed(Exception):
    """The job's child process failed: its message is the child's one-line reason (traceback in the logs)."""


@dataclass
class JobSpec:
    """What a child needs to run the job as the server would: all of it picklable."""

    runner: Any  # the runner's hydra spec (dict with _target_) or a picklable callable
    cfg: Any  # the composed workflow config (DictConfig)
    hydra: Any  # `confutil.HydraState` of the server's app (search path + hydra node), or None outside an app
    log: Any  # `log.LogConfig` the server logs with, or None
    start_method: str = field(default_factory=mp.get_start_method)  # the server's: the job's data loaders start workers so
    nice: int = 0  # added to the process's niceness (POSIX): training yields the CPU to the server's requests
    grace_s: float = 30.0  # a cancelled child (or one whose server died) that has not stopped by then is ended


def run_in_process(spec: JobSpec, progress: Progress) -> SimpleNamespace:
    """Run the job in a fresh process; returns ``version_id / metrics / summary`` or raises as the runner did
    (`CancelledError`, `UserError` with its message, `JobFailed` for anything else, including a crashed child)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    cancel = ctx.Event()
    proc = ctx.Process(target=child_main, args=(spec, send, cancel), name="workflow-job", daemon=False)
    proc.start()
    send.close()  # the child holds the only write end: EOF here means it is gone
    _log.info(f"workflow job running in process {proc.pid}")
    cancel_at: float | None = None
    try:
        while True:
            msg = _receive(recv, proc)
            if msg is not None and (outcome := _handle(msg, progress)) is not None:
                return outcome
            if progress.cancelled and cancel_at is None:
                cancel.set()
                cancel_at = time.monotonic()
            if cancel_at is not None and time.monotonic() - cancel_at > spec.grace_s:
                _log.warning(f"workflow job process {proc.pid} did not stop within {spec.grace_s:g}s of its cancel: terminated")
                proc.terminate()
                raise CancelledError("cancelled by user (its process was terminated)")
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        recv.close()


def _receive(conn: Any, proc: Any) -> tuple | None:
    """The next message, or None when there is none within `POLL_S`; a child gone without its last word fails."""
    try:
        if conn.poll(POLL_S):
            return conn.recv()
        if proc.is_alive() or conn.poll():
            return None
    except (EOFError, OSError):
        pass
    proc.join(5)
    raise JobFailed(f"the workflow process ended without an answer (exit code {proc.exitcode}); "
                    "see error.log, then submit the same characters again to resume")


def _handle(msg: tuple, progress: Progress) -> SimpleNamespace | None:
    """Forward an event, or turn the child's last message into the outcome (or its exception)."""
    kind, payload = msg
    if kind == "event":
        progress.publish(ProgressEvent(**payload), log=False)  # the child logged it already
        return None
    if kind == "done":
        return SimpleNamespace(**payload)
    if kind == "cancelled":
        raise CancelledError(payload)
    if kind == "user_error":
        raise UserError(payload)
    raise JobFailed(payload)


# -- the child -------------------------------------------------------------------------------------


def child_main(spec: JobSpec, conn: Any, cancel: Any) -> None:
    """Entry point of the job's process: run the runner under the server's Hydra state, report back over `conn`."""
    from ..confutil import restored_hydra
    from ..log import setup_logging

    # a spawned process defaults to spawn for its own children: data-loader workers would re-import torch each
    # (training ran ~3x slower than in the server's thread); start them as the server would have
    mp.set_start_method(spec.start_method, force=True)
    # Ctrl-C at the server's terminal reaches its whole process group: the server cancels its jobs itself (the run
    # then reads "cancelled", as it did in a thread), so this process leaves that signal to it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.nice and hasattr(os, "nice"):
        os.nice(spec.nice)
    if spec.log is not None:
        setup_logging(spec.log)
    lock = threading.Lock()
    progress = Progress(log=True)

    def send(msg: tuple) -> None:
        with lock:
            conn.send(msg)

    def forward(ev: ProgressEvent) -> None:
        try:
            send(("event", asdict(ev)))
        except OSError:  # the server is gone: stop at this event
            progress.cancel()

    progress.subscribe(forward)
    threading.Thread(target=_watch, args=(cancel, progress, spec.grace_s), name="job-watch", daemon=True).start()
    try:
        with restored_hydra(spec.hydra):
            runner = _runner(spec.runner)
            out = runner(spec.cfg, progress)
        progress.check_cancelled()
        from .workflow_schema import outcome_fields

        reply: tuple = ("done", outcome_fields(out))
    except CancelledError as exc:
        reply = ("cancelled", str(exc) or "cancelled by user")
    except UserError as exc:
        reply = ("user_error", str(exc))
    except BaseException as exc:  # noqa: BLE001 - whatever ends the run is reported, the traceback logged here
        _log.error(f"workflow job failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        reply = ("error", f"{type(exc).__name__}: {exc}")
    try:
        send(reply)
    except OSError:
        pass
    conn.close()


def _runner(target: Any) -> Any:
    """The runner callable: instantiated from its spec here (so its imports happen in this process)."""
    if callable(target):
        return target
    from hydra.utils import instantiate

    return instantiate(target)


def _watch(cancel: Any, progress: Progress, grace_s: float) -> None:
    """Turn the server's cancel, or the server's death, into this run's cancel; a run that ignores it after its
    server died leaves after `grace_s` (its stages resume on the next submission)."""
    parent = mp.parent_process()
    while not cancel.wait(1.0):
        if parent is not None and not parent.is_alive():
            _log.warning("the server that started this workflow job is gone: cancelling it")
            progress.cancel()
            time.sleep(grace_s)
            os._exit(1)
    progress.cancel()
