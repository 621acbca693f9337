"""`train(cfg)`: compose data, model, callbacks, loggers and trainer from the Hydra config, fit, then evaluate the
published checkpoint and write the run's report. Callable in-process (the workflow composes a config with
``hydra.compose``); returns a `TrainResult`, and `optimized_metric` gives a sweeper its number.

torch / Lightning are imported inside the functions that need them, so ``train.py`` can reject a bad command line
(`confutil.check_group_overrides`) before paying for those imports.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import ConfigError
from ..fsutil import atomic_write_text, fingerprint
from ..log import setup_logging, training_log
from ..versionfiles import CONFIG
from .budget import apply_epoch_budget, batches_per_epoch
from .reports import evaluate_checkpoint, log_media_to_wandb, write_learning_curves


@dataclass
class TrainResult:
    """What a run leaves: the best checkpoint, the run folder, its final metrics and the data it was split from."""

    ckpt_path: str
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    data_root: str = ""  # the dataset folder
    split_path: str = ""  # its train/val split manifest (a gallery built for this model reuses it)
    is_global_zero: bool = True  # False on the other DDP ranks (they publish nothing)


def resolve_output_dir(cfg: DictConfig) -> Path:
    """The run folder: ``paths.output_dir`` (Hydra's run dir) or, outside a Hydra run, a fresh one under outputs/."""
    try:
        out = Path(str(cfg.paths.output_dir))
    except Exception:  # noqa: BLE001 - ${hydra:...} is unresolvable outside @hydra.main
        root = Path(str(OmegaConf.select(cfg, "paths.root_dir", default=".")))
        out = root / "outputs" / "train" / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _instantiate_list(cfg: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    out: list[Any] = []
    if not cfg:
        return out
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            try:
                out.append(instantiate(conf))
            except Exception as exc:  # noqa: BLE001 - report which entry failed
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"{what}.{name} could not be built ({type(exc).__name__}: {exc}); check conf/{what}/") from None
    return out


def best_checkpoint(trainer: Any) -> str:
    """The path of the checkpoint a run returns: the best of a callback that monitors a metric (val/acc), else the
    newest one a checkpoint callback saved (`last_checkpoint` alone), else "" (none saved)."""
    saved = [cb for cb in trainer.checkpoint_callbacks if cb.best_model_path]
    saved.sort(key=lambda cb: cb.monitor is None)  # a monitored best first; the every-epoch last.ckpt only without one
    return saved[0].best_model_path if saved else ""


def _drop_logger_only_callbacks(callbacks: list[Any], has_logger: bool) -> list[Any]:
    """Drop callbacks that need a logger (LR monitor) when ``logger=none``, instead of failing at fit."""
    if has_logger:
        return callbacks
    from lightning.pytorch.callbacks import LearningRateMonitor

    kept = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if len(kept) != len(callbacks):
        training_log.info("logger=none: learning-rate monitor disabled (it needs a logger)")
    return kept


def launch_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of a process that torchrun or srun started together with its peers, else (0, 1).

    Such peers run the data preparation at the same time, so they share it out. Lightning's own DDP
    launcher starts the other ranks later (from `fit`), by which time rank 0 has done it alone.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun; not sbatch's single batch script
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    return 0, 1


def _add_face_views(datamodule: Any) -> dict[str, Any] | None:
    """With ``data.face_view.enabled``, find each training picture's face once (cached beside the split manifest)
    and train on it as one more sample; returns the spec the checkpoint records, so recognition uses the same views."""
    from ..recognition.views import FaceFinder, FaceViewSpec

    setting = getattr(datamodule, "face_view_setting", None) or getattr(datamodule, "face_view", None)
    spec = FaceViewSpec.from_mapping(setting)  # a mistyped key fails even when the views are off
    if not getattr(datamodule, "face_view", None):
        return None
    from ..imageio import load_image

    manifest = Path(datamodule.split_path or datamodule.default_split_path())
    root_key = fingerprint(str(Path(datamodule.root).resolve()))[:8]
    cache = manifest.with_name(f"faces-{Path(datamodule.root).name}-{root_key}-{spec.key}.json")  # every seed's split shares it
    t0 = time.perf_counter()
    recs = datamodule.train_records
    crops = FaceFinder(spec).regions_for_files(((r.file_name, r.path(datamodule.root)) for r in recs), cache, load_image,
                                               shard=launch_rank())
    n = datamodule.add_face_views(crops)
    training_log.info(f"face views: {n} of {len(recs)} training pictures have a face ({time.perf_counter() - t0:.0f} s, cache {cache})")
    return spec.to_dict()


#: torch's notice about an API Lightning's own batch handling calls at every fit: no user can act on it
_LIGHTNING_TORCH_NOTICE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _fit_log_interval(trainer: Any, steps_per_epoch: int) -> None:
    """Log at least once an epoch: ``trainer.log_every_n_steps`` cut to the epoch's batches on a small set, where
    Lightning otherwise warns at every run that the interval is longer than an epoch."""
    if 0 < steps_per_epoch < trainer.log_every_n_steps:
        trainer.log_every_n_steps = steps_per_epoch


def train(cfg: DictConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fit the classifier described by `cfg`, evaluate the best checkpoint, write the report.

    `callbacks` are extra Lightning callbacks from the caller (the workflow's progress), beside the config's.
    """
    import lightning as L
    import torch

    setup_logging(cfg.get("log"))
    out_dir = resolve_output_dir(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    cfg_plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    face_view = _add_face_views(datamodule)
    training_log.info(f"data: {datamodule.summary()}")

    # Data-derived arguments are passed in Python (not merged into the config) so the resolved
    # run config travels into the checkpoint untouched.
    model_factory = instantiate(cfg.model, _partial_=True, _convert_="all")
    model = model_factory(
        class_names=datamodule.class_names,
        series=datamodule.series,
        tag_names=datamodule.tag_names,
        class_weights=datamodule.class_weights,
        image_size=datamodule.image_size,
        eval_resize=datamodule.resize,
        face_view=face_view,
        run_config=cfg_plain,
    )
    datamodule.set_normalization(model.mean, model.std)

    callbacks = _instantiate_list(cfg.get("callbacks"), "callbacks") + list(callbacks)
    loggers = _instantiate_list(cfg.get("logger"), "logger")
    callbacks = _drop_logger_only_callbacks(callbacks, has_logger=bool(loggers))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    steps_per_epoch = batches_per_epoch(len(datamodule.train_dataloader()), trainer.limit_train_batches, trainer.world_size)
    apply_epoch_budget(trainer, steps_per_epoch, cfg.get("epoch_budget"))
    _fit_log_interval(trainer, steps_per_epoch)
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams({"cfg": cfg_plain, "data": datamodule.summary()})

    if trainer.is_global_zero:
        atomic_write_text(out_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LIGHTNING_TORCH_NOTICE)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_s = time.perf_counter() - t0

    ckpt_path = best_checkpoint(trainer)
    if not ckpt_path:
        ckpt_path = str(out_dir / "checkpoints" / "last.ckpt")
        trainer.save_checkpoint(ckpt_path)  # fast_dev_run / no checkpoint callback: still leave a model
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}

    metrics: dict[str, Any] = dict(fit_metrics)
    if trainer.is_global_zero and cfg.get("evaluate", True):
        from ..models.classifier import CharacterClassifier

        best = CharacterClassifier.load_from_checkpoint(ckpt_path, map_location="cpu")
        extra = {
            "checkpoint": ckpt_path,
            "fit_seconds": round(fit_s, 2),
            "epochs": int(trainer.current_epoch),
            "data": datamodule.summary(),
            "fit_metrics": fit_metrics,
        }
        report = evaluate_checkpoint(best, datamodule, out_dir, extra)
        try:
            write_learning_curves(loggers, out_dir)
        except Exception as exc:  # noqa: BLE001 - a plot must not lose a finished run
            training_log.warning(f"could not draw the learning curves: {exc}")
        try:
            log_media_to_wandb(loggers, out_dir, report, datamodule, best.class_names)
        except Exception as exc:  # noqa: BLE001 - media logging must not lose a finished run
            training_log.warning(f"could not log media to W&B: {exc}")
        report.pop("_pred", None)
        metrics.update({k: v for k, v in report.items() if k not in ("confusion_matrix",)})
        metrics["val/acc"] = report["accuracy"]
        metrics["val/acc_top5"] = report["top5_accuracy"]
        metrics["val/f1_macro"] = report["macro_f1"]
        training_log.info(
            f"run done in {fit_s:.0f}s: val accuracy {100 * report['accuracy']:.1f}% "
            f"(top-5 {100 * report['top5_accuracy']:.1f}%), checkpoint {ckpt_path}, report in {out_dir}"
        )
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish(quiet=True)
            except Exception:  # noqa: BLE001
                pass
    return TrainResult(ckpt_path=ckpt_path, output_dir=str(out_dir), metrics=metrics, data_root=str(datamodule.root),
                       split_path=str(datamodule.split_path or ""), is_global_zero=bool(trainer.is_global_zero))


def optimized_metric(cfg: DictConfig, result: TrainResult) -> float | None:
    """The value a sweeper optimises (``cfg.optimized_metric``), or None when unset/absent."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    value = result.metrics.get(name)
    if value is None:
        raise ConfigError(f"optimized_metric={name!r} is not among the run's metrics: {', '.join(sorted(map(str, result.metrics)))}")
    return float(value)
