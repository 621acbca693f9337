"""The resumable runner: `run_workflow` runs the stages in order, skipping those whose marker matches.

Each run lives in a folder named after its characters and collector (the same command finds the same
folder). A finished stage leaves a marker ``stages/<stage>.json`` (written atomically) holding a
fingerprint of its config and of the stages before it; a rerun skips stages whose marker matches and
redoes the rest. Downloads resume image by image (collector manifests), training resumes from
``last.ckpt``, and the version is committed to the registry under an id fixed at the run's first
attempt, so a crash at any point can never register two versions or leave a half version live.
`run_workflow` is what ``python -m anime_role_detect.workflow`` and the service's /api/workflow call.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time

from omegaconf import DictConfig

from ..errors import ConfigError
from ..fsutil import atomic_write_json, atomic_write_text, fingerprint, read_json
from ..log import get_logger
from .context import STAGE_DIR, RunContext, WorkflowResult, parse_characters, resolve_run_dir, run_lock
from .progress import Progress
from .stages import STAGE_NAMES, STAGES, apply_promotion, promote_policy, redacted_yaml, resolve_extra_datasets, summary_rows
from .training_bridge import hydra_quote

__all__ = ["run_workflow", "WorkflowResult", "RunContext", "parse_characters", "resolve_run_dir", "run_lock", "hydra_quote",
           "STAGES", "STAGE_NAMES"]

_log = get_logger("system")


def run_workflow(cfg: DictConfig, progress: Progress | None = None) -> WorkflowResult:
    """Run (or resume) the whole workflow for ``cfg.characters``; returns the registered version and summary."""
    progress = progress or Progress()
    queries = parse_characters(cfg)
    run_dir = resolve_run_dir(cfg, queries)
    with run_lock(run_dir):
        stage_dir = run_dir / STAGE_DIR
        if cfg.get("restart", False):  # everything but the downloads is redone, and a new version is made
            shutil.rmtree(stage_dir, ignore_errors=True)
            for pinned in ("version_id.json", "extend_live.json"):
                (run_dir / pinned).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "workflow.yaml", redacted_yaml(cfg))
        ctx = RunContext(cfg=cfg, progress=progress, run_dir=run_dir, queries=queries)
        _log.info(f"workflow run folder {run_dir} ({len(queries)} characters)")
        resumed: list[str] = []
        chain, result_key = "", ""
        t_start = time.perf_counter()
        stop_after = cfg.get("stop_after")
        if stop_after and stop_after not in STAGE_NAMES:
            raise ConfigError(f"stop_after={stop_after!r}: choose one of {', '.join(STAGE_NAMES)}")
        promote_policy(cfg)  # a bad promote= value fails now, not after training
        ctx.extra_datasets = resolve_extra_datasets(ctx)
        for name, fn, inputs in STAGES:
            if stop_after and STAGE_NAMES.index(name) > STAGE_NAMES.index(stop_after):
                break
            # A stage's fingerprint: the one before it, its own inputs, and what the stage before it produced.
            fp = fingerprint([chain, inputs(ctx), result_key])
            chain = fp
            done_path, started_path = stage_dir / f"{name}.json", stage_dir / f"{name}.started"
            marker = read_json(done_path) if done_path.is_file() else None
            if marker and marker.get("fingerprint") == fp:
                ctx.outputs[name] = marker["output"]
                result_key = fingerprint(marker["output"].get("data_key", marker["output"]))
                resumed.append(name)
                progress.emit(name, 1, 1, "done earlier")
                continue
            started = read_json(started_path) if started_path.is_file() else None
            ctx.restarted = bool(started and started.get("fingerprint") != fp)
            ctx.fingerprint = fp
            atomic_write_json(started_path, {"fingerprint": fp})
            progress.check_cancelled()
            t0 = time.perf_counter()
            output = fn(ctx)
            ctx.outputs[name] = output
            result_key = fingerprint(output.get("data_key", output))
            if output.get("incomplete"):  # e.g. pages the site failed to serve: the next run tries again
                _log.warning(f"stage {name} incomplete: {output['incomplete']}; rerun the same command to retry")
                continue
            atomic_write_json(done_path, {"fingerprint": fp, "seconds": round(time.perf_counter() - t0, 2),
                                          "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                          "output": output})
            _log.info(f"stage {name} done in {time.perf_counter() - t0:.1f}s")
        vid = ctx.outputs.get("register", {}).get("version_id", "")
        metrics = {"accuracy": ctx.outputs.get("evaluate", {}).get("accuracy"), **ctx.outputs.get("train", {}).get("metrics", {}),
                   "seconds": round(time.perf_counter() - t_start, 2)}
        live = apply_promotion(ctx)
        return WorkflowResult(version_id=vid, metrics=metrics, summary=summary_rows(ctx), run_dir=str(run_dir),
                              resumed_stages=resumed, live=live, gate=ctx.outputs.get("register", {}).get("gate"))
