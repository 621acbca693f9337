"""`train_launched`: train in this process, or in a process of its own when the trainer starts more (DDP).

Lightning's DDP launcher starts every other rank by re-running the current command line, so a program that trains
in-process on `trainer=ddp` (a workflow run, the server's job, log fusion) would run its whole self once more per rank.
Such a config is saved as YAML and trained by ``python -m anime_role_detect.cli.train_config`` (`train_from_file`),
whose command line is safe to re-run: each epoch comes back through an events file, the `TrainResult` as JSON. The
child leads a session of its own: a cancel, or the caller's Ctrl-C, sends SIGTERM to the child alone (rank 0), then
SIGKILL to the whole group after `STOP_GRACE_S`; the child does the same when its caller dies. `StopTogether` carries
that SIGTERM to every rank on every node through a collective after the next batch, so all stop at the same step and
exit with `STOPPED_EXIT` (Lightning's own handler broadcasts from inside the signal handler and raced the ranks'
collectives). The epoch in progress is lost, and the next attempt resumes from the last finished epoch's
``last.ckpt`` (`training_bridge` checks it loads).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from ..fsutil import atomic_write_text
from ..log import get_logger
from ..procgroup import kill_own_group, start_group, stop_group, watch_parent
from .run import TrainResult, launch_rank, resolve_output_dir, train

_log = get_logger("training")

CHILD_MODULE = "anime_role_detect.cli.train_config"
POLL_S = 0.5  # how often the caller reads the child's events and checks for a cancel
STOP_GRACE_S = 20.0  # a child sent SIGTERM that has not stopped by then is killed with all its ranks
STOPPED_EXIT = 128 + int(signal.SIGTERM)  # a rank stopped on SIGTERM (its own or another rank's) exits as if killed by it
CONFIG_FILE, EVENTS_FILE, RESULT_FILE = "launch.yaml", "launch-events.jsonl", "launch-result.json"

Report = Callable[[int, int, str], None]


class TrainingProcessFailed(RuntimeError):
    """The training child exited without a result: its exit code, last line of output and the command to rerun."""


def starts_processes(cfg: DictConfig) -> bool:
    """Whether `cfg.trainer` launches more processes than this one (and this one was not itself started as a rank)."""
    from ..recognition.predict import starts_ranks

    return launch_rank()[1] == 1 and starts_ranks(cfg.get("trainer") or {})


def train_launched(cfg: DictConfig, report: Report | None = None, check: Callable[[], None] | None = None) -> TrainResult:
    """`train(cfg)` with each epoch passed to `report(done, total, message)` and `check()` after each batch (or poll),
    which raises to cancel; in a child process when the trainer starts more processes (module docstring)."""
    if not starts_processes(cfg):
        from .epoch_progress import EpochProgress

        return train(cfg, callbacks=[EpochProgress(report, check)] if report or check else [])
    return train_in_child(cfg, resolve_output_dir(cfg), report, check)


def train_in_child(cfg: DictConfig, work: Path, report: Report | None = None, check: Callable[[], None] | None = None) -> TrainResult:
    """Train `cfg` (its ``paths.output_dir`` fixed) in ``python -m anime_role_detect.cli.train_config``; see the module."""
    work.mkdir(parents=True, exist_ok=True)
    config, events, result = work / CONFIG_FILE, work / EVENTS_FILE, work / RESULT_FILE
    atomic_write_text(config, OmegaConf.to_yaml(cfg))  # unresolved: the child resolves it as this process would
    events.unlink(missing_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", CHILD_MODULE, str(config), "--events", str(events), "--result", str(result)]
    proc = start_group([*cmd, "--parent-pid", str(os.getpid())], stderr=subprocess.PIPE, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=30)
    echo = threading.Thread(target=_echo, args=(proc.stderr, tail), name="train-child-stderr", daemon=True)
    echo.start()
    _log.info(f"training in process group {proc.pid}: its trainer starts more processes ({' '.join(cmd)})")
    seen = 0
    try:
        while True:
            running = proc.poll() is None
            for done, total, message in _new_events(events, seen):
                seen += 1
                if report is not None:
                    report(done, total, message)
            if not running:
                break
            if check is not None:
                check()
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            _log.info(f"stopping training process group {proc.pid}")
            stop_group(proc, STOP_GRACE_S)
        echo.join(5)
    if proc.returncode != 0 or not result.is_file():
        raise _failure(proc.returncode, list(tail), cmd)
    return TrainResult(**json.loads(result.read_text(encoding="utf-8")))


def _echo(stream: IO[str], tail: deque[str]) -> None:
    """Copy the child's stderr (its log and progress) to ours, keeping the last lines for an error message."""
    for line in stream:
        tail.append(line.rstrip("\n"))
        sys.stderr.write(line)
    stream.close()


def _new_events(path: Path, seen: int) -> Iterator[tuple[int, int, str]]:
    """The complete event lines of `path` after the first `seen` (a line being written is read on the next poll)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    lines = text.split("\n")[:-1]  # the part after the last newline is not complete yet
    for line in lines[seen:]:
        ev = json.loads(line)
        yield int(ev["done"]), int(ev["total"]), str(ev.get("message", ""))


def _failure(code: int | None, tail: list[str], cmd: list[str]) -> Exception:
    """The child's own one-line error (``error: ...``) as a `UserError`, else `TrainingProcessFailed`."""
    from ..errors import UserError

    said = next((line for line in reversed(tail) if line.strip()), "no output")
    if said.startswith("error: "):
        return UserError(said.removeprefix("error: "))
    return TrainingProcessFailed(f"training in its own process failed (exit code {code}: {said.strip()[:300]}); "
                                 f"its log is above; rerun `{' '.join(cmd)}` to see it again")


# -- the child -------------------------------------------------------------------------------------


def train_from_file(config: Path, events: Path | None, result: Path | None, parent_pid: int | None = None) -> TrainResult:
    """The child's work: train the saved config, rank 0 appending each epoch to `events` and writing `result`;
    Lightning's `SIGTERMException` when a SIGTERM stopped every rank (`StopTogether`). With `parent_pid` (what
    `train_in_child` passes) training stops once that process, its caller, is gone; a command run by hand (another
    node's) outlives its shell."""
    cfg = _saved_config(config)  # first: a file that is not a config is refused before Lightning loads (~6 s)
    from .epoch_progress import EpochProgress
    from .stop_together import StopTogether

    if parent_pid is not None:
        watch_parent(_parent_gone, parent_pid)
    out = train(cfg, callbacks=[EpochProgress(_appender(events) if events else None), StopTogether()])
    if out.is_global_zero and result is not None:
        atomic_write_text(result, json.dumps(asdict(out), default=_plain))
    return out


def _saved_config(path: Path) -> DictConfig:
    """The training config saved at `path`, or a one-line error when the file is not one."""
    from ..errors import ConfigError

    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - YAML and OmegaConf raise several kinds for a file that is not a config
        raise ConfigError(f"{path} is not a saved training config ({type(exc).__name__}); give the launch.yaml a "
                          "training run folder holds") from None
    if not isinstance(cfg, DictConfig) or "trainer" not in cfg:
        raise ConfigError(f"{path} is not a saved training config (no trainer section); give the launch.yaml a "
                          "training run folder holds")
    return cfg


def _appender(path: Path) -> Report:
    def append(done: int, total: int, message: str) -> None:
        with open(path, "a", encoding="utf-8") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps({"done": done, "total": total, "message": message}) + "\n")

    return append


def _plain(value: Any) -> Any:
    """JSON for what `json` cannot write itself (numpy scalars, paths)."""
    return value.item() if hasattr(value, "item") else str(value)


def _parent_gone() -> None:
    """Stop this process group as a cancel would: SIGTERM to this process, SIGKILL to the group after `STOP_GRACE_S`
    (a rank whose rank 0 died goes at once)."""
    _log.warning("the process that started this training is gone: stopping it (the next attempt resumes from last.ckpt)")
    if os.getpgid(0) == os.getpid():  # the group's leader, rank 0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
    kill_own_group()
