"""The workflow's bridge into training: ``conf/train.yaml`` composed with the run's bindings, progress and cancel fed back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..confutil import compose_config
from ..errors import ConfigError
from ..log import get_logger
from .context import RunContext

_log = get_logger("system")


# Training: the real training framework, composed from conf/train.yaml with the workflow's overrides.


def hydra_quote(value: Any) -> str:
    """A Hydra override value that stays one string whatever it holds (spaces, commas, brackets in paths)."""
    return "'" + str(value).replace("'", "\\'").replace("${", "\\${") + "'"


#: `train.face_view` -> the mapping merged into the training config's ``data.face_view`` (docs/training.md)
FACE_VIEW_SETTINGS: dict[str, str] = {
    "false": "{enabled:false}",
    "true": "{enabled:true}",  # each picture's animeface face
    "head": "{enabled:true,margin:0.0,detector:{kind:region}}",  # its top centre: no detector to run
}


def face_view_key(value: Any) -> str:
    """`train.face_view` as its `FACE_VIEW_SETTINGS` key, or a one-line error naming the choices."""
    key = str(value).strip().lower()  # YAML's true / false arrive as bools
    if key not in FACE_VIEW_SETTINGS:
        raise ConfigError(f"train.face_view={value!r} is not a choice; use false, true (animeface faces) or head "
                          "(each picture's top centre, no face detector)")
    return key


def face_view_setting(value: Any) -> str:
    """The ``data.face_view`` override for a `train.face_view` value, or a one-line error naming the choices."""
    return FACE_VIEW_SETTINGS[face_view_key(value)]


def face_view_schedule(tcfg: Any) -> list[str]:
    """The training overrides `train.face_view_overrides` gives the chosen face view (its measured schedule: a head view
    doubles the samples of an epoch, so it trains fewer epochs); `train.overrides` come after them and win."""
    table = tcfg.get("face_view_overrides") or {}
    return [str(o) for o in table.get(face_view_key(tcfg.get("face_view", False))) or []]


def recipe_overrides(tcfg: Any) -> list[str]:
    """The workflow's training recipe before the run's bindings: the face view's schedule, then `train.overrides`."""
    return face_view_schedule(tcfg) + [str(o) for o in tcfg.get("overrides") or []]


def compose_train_config(ctx: RunContext, resume_ckpt: Path | None) -> DictConfig:
    """``conf/train.yaml`` + ``train.overrides`` + the bindings to this run's dataset, split and folders."""
    tcfg = ctx.cfg.train
    values = {"dataset": hydra_quote(ctx.dataset_dir.resolve()), "train_dir": hydra_quote(ctx.train_dir.resolve()),
              "val_fraction": float(ctx.cfg.split.val_fraction), "seed": int(ctx.cfg.split.seed),
              "face_view": face_view_setting(tcfg.get("face_view", False))}
    overrides = recipe_overrides(tcfg)
    overrides += [str(b).format(**values) for b in tcfg.bind]
    log_dir = OmegaConf.select(ctx.cfg, "log.dir", default=None)
    if log_dir:  # training logs where the workflow logs, at the same console level
        overrides += [f"log.dir={hydra_quote(log_dir)}", f"log.console_level={ctx.cfg.log.console_level}"]
    if resume_ckpt is not None:
        overrides.append(f"ckpt_path={hydra_quote(resume_ckpt)}")
    return compose_config(str(tcfg.get("config_name", "train")), overrides, fix="fix train.overrides")


def readable_checkpoint(path: Path) -> bool:
    """Whether `path` loads; one torn by a kill during its save is set aside (``.torn``) so training starts over."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure to read it means it cannot resume anything
        path.replace(path.with_name(path.name + ".torn"))
        _log.warning(f"{path} does not load ({type(exc).__name__}: {exc}); set aside as {path.name}.torn, training starts over")
        return False


def stage_train(ctx: RunContext) -> dict[str, Any]:
    """Train the classifier (in-process, or in a process of its own when its trainer starts more: DDP); an
    interrupted attempt resumes from its ``last.ckpt``."""
    from ..training import train_launched

    if ctx.restarted and ctx.train_dir.exists():
        shutil.rmtree(ctx.train_dir)  # partial training under another config: start over
    last = ctx.train_dir / "checkpoints" / "last.ckpt"
    resume = last if last.is_file() and readable_checkpoint(last) else None
    if resume:
        _log.info(f"resuming training from {resume}")
    tcfg = compose_train_config(ctx, resume)
    try:
        result = train_launched(tcfg, report=lambda done, total, msg: ctx.progress.emit("train", done, total, msg),
                                check=ctx.progress.check_cancelled)
    except SystemExit as exc:  # Lightning turns Ctrl-C during fit into sys.exit(1): keep it an interrupt
        raise KeyboardInterrupt("training interrupted") from exc
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str)) or v is None}
    return {"ckpt_path": str(result.ckpt_path), "output_dir": str(result.output_dir), "metrics": metrics,
            "resumed_from": str(resume) if resume else None}
