"""Child process groups: a command started in a session of its own (its DDP ranks join its group), stopped as a whole,
and a child that stops its own group once the process that started it is gone (even by SIGKILL).

Used where a stage runs a command whose ranks Lightning starts by re-running that command line: training
(`training.launch`) and gallery embedding over processes (`recognition.predict`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Sequence

from .log import get_logger

_log = get_logger("system")

PARENT_POLL_S = 1.0  # how often a child looks for the process that started it


def start_group(cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
    """`cmd` as the leader of a new session and process group: a terminal's Ctrl-C reaches the caller alone, and the
    caller decides how the group stops."""
    return subprocess.Popen(list(cmd), start_new_session=True, **popen)


def signal_group(pgid: int, sig: int) -> None:
    """`sig` to every process of group `pgid`, if any is left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the group's leader (it stops its ranks), SIGKILL to the whole group after `grace_s` (0: at once)."""
    if grace_s > 0:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _log.warning(f"process group {proc.pid} did not stop within {grace_s:g}s of SIGTERM: killed")
    signal_group(proc.pid, signal.SIGKILL)  # whatever is left
    proc.wait()


def watch_parent(on_gone: Callable[[], None], caller: int) -> threading.Thread:
    """Call `on_gone` (in a daemon thread) once this process's parent has exited (at once if it already has): a
    child is re-parented then, so a changed parent pid says so even after a SIGKILL. The group's leader, started by
    `start_group`, watches `caller` (its caller's pid, passed on its command line, so one that dies while this process
    starts up is not missed); the other processes of the group (ranks the leader started by re-running its command
    line, `caller` and all) watch the leader, their parent."""
    parent = caller if os.getpgid(0) == os.getpid() else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        on_gone()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def kill_own_group() -> None:
    """SIGKILL this process's group (this process too): a child whose caller is gone, when nothing is worth saving."""
    signal_group(os.getpgid(0), signal.SIGKILL)
