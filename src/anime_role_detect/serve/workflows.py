"""Workflow jobs behind `/api/workflow`: build the config from a validated request, run it in its own process
(`job_process`; or a worker thread), keep its progress events for status queries and live streams, honour cancel.
The request and status models are in `workflow_schema`.

Clients never send config strings or paths: characters and whitelisted parameters are checked by
pydantic, then written into the composed config with `OmegaConf.update` (no override parsing).
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, UserError
from ..fsutil import atomic_write_text
from ..log import get_logger
from ..workflow.progress import CancelledError, Progress, ProgressEvent
from .job_process import JobFailed
from .settings import WorkflowSettings
from .workflow_schema import (FINISHED, NAME_PATTERN, CharacterIn, JobStatus, StageStatus, WorkflowOutcome, WorkflowParams,
                              WorkflowRequest, WorkflowStatus, outcome_fields)

_log = get_logger("system")

__all__ = ["WorkflowManager", "Job", "JobQueueFull", "WorkflowRunner", "build_runner", "check_runner_spec", "apply_param",
           "compose_config", "FINISHED", "NAME_PATTERN", "CharacterIn", "JobStatus", "StageStatus", "WorkflowOutcome",
           "WorkflowParams", "WorkflowRequest", "WorkflowStatus"]

SAVE_INTERVAL_S = 2.0  # progress saves to jobs_dir at most this often (status changes always)


WorkflowRunner = Callable[[Any, Progress], Any]


class JobQueueFull(UserError):
    """`workflow.max_queued` jobs are already waiting: the submission is refused (429), nothing is queued."""


def default_config_dir() -> Path:
    """The project's `conf/` folder (next to `src/`)."""
    from ..confutil import CONFIG_DIR

    return CONFIG_DIR


def compose_config(settings: WorkflowSettings) -> Any:
    """Compose the workflow's Hydra config (inside a running Hydra app or standalone)."""
    from ..confutil import compose_config as compose

    return compose(settings.config_name, settings.overrides, fix="set workflow.config_dir / workflow.overrides in serve.yaml",
                   config_dir=settings.config_dir or default_config_dir())


def check_runner_spec(spec: dict[str, Any]) -> None:
    """Refuse a runner spec whose module cannot be found, without importing it (the job's process imports it)."""
    import importlib.util

    target = str(spec.get("_target_") or "")
    module = target.rpartition(".")[0]
    try:
        found = bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"workflow.runner {target!r} names no importable module; fix serve.yaml")


def build_runner(settings: WorkflowSettings) -> WorkflowRunner:
    """Instantiate the configured runner (`_target_`, default `workflow.run.run_workflow`)."""
    from hydra.utils import instantiate

    try:
        return instantiate(settings.runner)
    except Exception as exc:  # noqa: BLE001 - a bad target is a config mistake
        raise ConfigError(f"workflow.runner {settings.runner.get('_target_')!r} cannot be loaded ({exc}); fix serve.yaml") from None


@dataclass
class Job:
    """One workflow run: its request, progress, event history and outcome."""

    id: str
    request: WorkflowRequest
    params: dict[str, Any]
    progress: Progress = field(default_factory=lambda: Progress(log=True))
    status: JobStatus = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: WorkflowOutcome | None = None
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    restored: WorkflowStatus | None = None  # a job read back from jobs_dir after a restart (stages and log frozen)
    on_change: Callable[["Job", bool], None] | None = None  # persistence hook: (job, important)

    # -- events -----------------------------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event (numbered from 1) and hand it to live listeners."""
        with self.lock:
            ev = {"id": len(self.events) + 1, "event": kind, "data": data}
            self.events.append(ev)
            listeners = list(self.listeners)
        for fn in listeners:
            fn(ev)

    def subscribe(self, fn: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Register a listener; returns the events so far (nothing is lost or doubled in between)."""
        with self.lock:
            self.listeners.append(fn)
            return list(self.events)

    def unsubscribe(self, fn: Callable[[dict[str, Any]], None]) -> None:
        with self.lock:
            if fn in self.listeners:
                self.listeners.remove(fn)

    def set_status(self, status: JobStatus, **extra: Any) -> None:
        self.status = status
        self.publish("status", {"status": status, **extra})
        if status in FINISHED:
            self.publish("end", {"status": status, "error": self.error,
                                 "result": self.result.model_dump(mode="json") if self.result else None})
        if self.on_change is not None:
            self.on_change(self, True)

    def on_progress(self, ev: ProgressEvent) -> None:
        self.publish("progress", ev.to_json())
        if self.on_change is not None:
            self.on_change(self, False)

    # -- views ------------------------------------------------------------------------------
    def snapshot(self) -> WorkflowStatus:
        if self.restored is not None:
            return self.restored
        stages = [StageStatus(stage=e.stage, done=e.done, total=e.total, percent=round(100 * e.fraction, 1), message=e.message)
                  for e in list(self.progress.stages.values())]
        log = [f"[{e.stage}] {e.done}/{e.total} {e.message}".rstrip() for e in self.progress.events if e.message][-50:]
        return WorkflowStatus(id=self.id, status=self.status, created=self.created, started=self.started, finished=self.finished,
                              characters=self.request.characters, params=self.params, stages=stages, log=log,
                              events=len(self.events), result=self.result, error=self.error)


def apply_param(cfg: Any, target: str, value: Any) -> None:
    """Set one validated parameter: ``key`` sets a value, ``LIST+=k={value}`` replaces/appends an override in a list."""
    from omegaconf import OmegaConf

    if "+=" not in target:
        OmegaConf.update(cfg, target, value, merge=False, force_add=True)
        return
    list_key, template = target.split("+=", 1)
    entry = template.format(value=value)
    prefix = entry.split("=", 1)[0] + "="
    current = OmegaConf.select(cfg, list_key, default=None)
    items = [str(x) for x in (current or []) if not str(x).lstrip("+~").startswith(prefix.lstrip("+~"))]
    OmegaConf.update(cfg, list_key, [*items, entry], merge=False, force_add=True)


class WorkflowManager:
    """Runs workflow jobs (each in its own process, watched from a small thread pool) and keeps the recent ones.

    A `runner` given here instead of `settings.runner` must be picklable (a module-level function) unless
    ``isolation`` is ``thread``: the job's process receives it.
    """

    def __init__(self, settings: WorkflowSettings, registry_dir: str, runner: WorkflowRunner | None = None,
                 config_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.registry_dir = registry_dir
        self._runner = runner
        self._config_factory = config_factory or (lambda: compose_config(settings))
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="workflow")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.jobs_dir = Path(settings.jobs_dir).expanduser() if settings.jobs_dir else None
        self._saved_at: dict[str, float] = {}
        self._saved_stage: dict[str, str | None] = {}
        if self.jobs_dir is not None:
            self._restore()

    # -- persistence (jobs_dir) -------------------------------------------------------------
    def _save(self, job: Job, important: bool) -> None:
        """Write the job's status file (write-then-rename): on status and stage changes, else at most every 2 s."""
        if self.jobs_dir is None:
            return
        now = time.monotonic()
        events = job.progress.events
        stage = events[-1].stage if events else None
        new_stage = stage != self._saved_stage.get(job.id)
        if not (important or new_stage) and now - self._saved_at.get(job.id, 0.0) < SAVE_INTERVAL_S:
            return
        self._saved_at[job.id], self._saved_stage[job.id] = now, stage
        try:
            atomic_write_text(self.jobs_dir / f"{job.id}.json", job.snapshot().model_dump_json())
        except OSError as exc:  # a full disk must not fail the run itself
            _log.warning(f"workflow {job.id}: could not save its status to {self.jobs_dir} ({exc})")

    def _restore(self) -> None:
        """Read back the jobs of earlier server runs; one that was still running is reported as interrupted."""
        files = sorted(self.jobs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime) if self.jobs_dir.is_dir() else []
        for path in files[-self.settings.keep_finished:]:
            try:
                st = WorkflowStatus.model_validate_json(path.read_text())
            except (OSError, ValueError) as exc:
                _log.warning(f"skipping unreadable workflow status {path} ({exc})")
                continue
            if st.status not in FINISHED:
                st = st.model_copy(update={"status": "failed", "finished": path.stat().st_mtime,
                                           "error": "the server stopped while this job was running; submit the same "
                                                    "characters again to resume it (collected files and finished stages are reused)"})
            job = Job(id=st.id, request=WorkflowRequest(characters=st.characters), params=st.params, status=st.status,
                      created=st.created, started=st.started, finished=st.finished, result=st.result, error=st.error,
                      restored=st)
            job.publish("status", {"status": st.status})
            job.publish("end", {"status": st.status, "error": st.error,
                                "result": st.result.model_dump(mode="json") if st.result else None})
            self._jobs[job.id] = job

    @property
    def runner(self) -> WorkflowRunner:
        if self._runner is None:
            self._runner = build_runner(self.settings)
        return self._runner

    def check_runner(self) -> None:
        """Fail now (400) rather than inside the job when the runner is misconfigured; a job's own process
        imports it, so here it is only looked up."""
        if self.settings.isolation == "thread":
            _ = self.runner
        elif self._runner is None:
            check_runner_spec(self.settings.runner)

    def execute(self, cfg: Any, progress: Progress) -> Any:
        """Run the workflow for `cfg` where the settings say (its own process, or this thread)."""
        if self.settings.isolation == "thread":
            return self.runner(cfg, progress)
        from ..confutil import running_hydra_state
        from ..log import current_log_config
        from .job_process import JobSpec, run_in_process

        spec = JobSpec(runner=self._runner if self._runner is not None else dict(self.settings.runner), cfg=cfg,
                       hydra=running_hydra_state(), log=current_log_config(), nice=self.settings.job_nice,
                       grace_s=self.settings.cancel_grace_s)
        return run_in_process(spec, progress)

    def check_params(self, params: WorkflowParams) -> dict[str, Any]:
        """The set parameters, refusing any that this server does not expose."""
        given = params.model_dump(exclude_none=True)
        blocked = sorted(k for k in given if k not in self.settings.params)
        if blocked:
            raise ConfigError(f"parameter(s) {', '.join(blocked)} cannot be set on this server; "
                              f"allowed: {', '.join(sorted(self.settings.params)) or 'none'}")
        return given

    def build_config(self, job: Job) -> Any:
        """Composed workflow config with the job's characters, parameters and this server's registry."""
        from omegaconf import OmegaConf

        cfg = self._config_factory()
        OmegaConf.set_struct(cfg, False)
        for key, value in self.settings.values.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        chars = [c.model_dump() for c in job.request.characters]
        OmegaConf.update(cfg, self.settings.characters_key, chars, merge=False, force_add=True)
        for name, value in job.params.items():
            apply_param(cfg, self.settings.params[name], value)
        for key in self.settings.registry_keys:
            OmegaConf.update(cfg, key, self.registry_dir, merge=False, force_add=True)
        return cfg

    def submit(self, request: WorkflowRequest) -> Job:
        """Queue a job; runs as soon as a worker is free."""
        params = self.check_params(request.params)
        self.check_runner()
        job = Job(id=uuid.uuid4().hex[:12], request=request, params=params, on_change=self._save)
        job.progress.subscribe(job.on_progress)
        with self._lock:
            waiting = sum(j.status == "queued" and not j.progress.cancelled for j in self._jobs.values())
            if waiting >= self.settings.max_queued:
                raise JobQueueFull(f"{waiting} workflow jobs are already waiting (workflow.max_queued); retry when one "
                                   "has started, or cancel one")
            self._jobs[job.id] = job
            while len(self._jobs) > self.settings.keep_finished:
                oldest = next((k for k, j in self._jobs.items() if j.status in FINISHED), None)
                if oldest is None:
                    break
                del self._jobs[oldest]
                if self.jobs_dir is not None:
                    (self.jobs_dir / f"{oldest}.json").unlink(missing_ok=True)
        job.publish("status", {"status": "queued"})
        self._save(job, True)
        self._pool.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        if job.progress.cancelled:
            job.finished = time.time()
            job.set_status("cancelled")
            return
        job.started = time.time()
        job.set_status("running")
        try:
            cfg = self.build_config(job)
            out = self.execute(cfg, job.progress)
            job.progress.check_cancelled()
            job.result = WorkflowOutcome(**outcome_fields(out))
            job.finished = time.time()
            job.set_status("succeeded")
        except CancelledError:
            job.finished = time.time()
            job.set_status("cancelled")
        except (UserError, JobFailed) as exc:  # a job process's failure is logged with its traceback there
            job.error = str(exc)
            job.finished = time.time()
            job.set_status("failed")
        except Exception as exc:  # noqa: BLE001 - a job failure is reported, never kills the server
            job.error = f"{type(exc).__name__}: {exc}"
            _log.error(f"workflow {job.id} failed: {job.error}\n{traceback.format_exc()}")
            job.finished = time.time()
            job.set_status("failed")

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job: Job) -> None:
        """Ask a job to stop at its next progress event (queued jobs never start)."""
        if job.status in FINISHED:
            return
        job.progress.cancel()
        if job.status == "running":
            job.set_status("cancelling")

    def shutdown(self) -> None:
        for job in self.list():
            if job.status not in FINISHED:
                job.progress.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
