"""Training layer — train(cfg, callbacks=()) behind ``train.py``, its reports, the offline YOLO trainer; imports base, data,
models and recognition's detectors (animeface finds the faces of face-view training and labels real pictures for the YOLO
tool), so it sits above recognition in the import order (README, `tests/core/test_layering.py`).

`train` composes data, model, callbacks, loggers and trainer from the Hydra config, fits, then evaluates
the best checkpoint and writes the run's report.

`train(cfg)` is callable in-process (the workflow composes a config with ``hydra.compose``) and
returns a `TrainResult`; ``train.py`` returns ``metrics[cfg.optimized_metric]`` for sweepers.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..confutil import CONFIG_DIR, config_dirs as default_config_dirs
from ..errors import ConfigError
from ..fsutil import atomic_write_text, fingerprint
from ..log import setup_logging, training_log
from ..versionfiles import CONFIG

LEARNING_CURVES = "learning_curves.png"  # per-epoch loss/accuracy drawn from the CSV logger, next to confusion_matrix.png

# torch / Lightning are imported inside the functions that need them, so `train.py` can reject a
# bad command line (see `check_group_overrides`) before paying for those imports.



@dataclass
class TrainResult:
    """What a run leaves: the best checkpoint, the run folder, its final metrics and the data it was split from."""

    ckpt_path: str
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    data_root: str = ""  # the dataset folder
    split_path: str = ""  # its train/val split manifest (a gallery built for this model reuses it)
    is_global_zero: bool = True  # False on the other DDP ranks (they publish nothing)


# -- W&B ------------------------------------------------------------------------------------
def wandb_reachable(host: str = "api.wandb.ai", port: int = 443, timeout_s: float = 1.5) -> bool:
    """True when the W&B API host accepts a TCP connection within `timeout_s`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


def wandb_offline_needed() -> tuple[bool, str]:
    """(offline?, why): offline when asked to, when there is no API key, or when W&B is unreachable."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True, f"WANDB_MODE={mode}"
    if not wandb_has_credentials():
        return True, "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    if not wandb_reachable():
        return True, "api.wandb.ai is unreachable"
    return False, "online"


def build_wandb_logger(offline: bool | None = None, **kwargs: Any):
    """`WandbLogger` that never hangs: offline automatically without a key or network."""
    from lightning.pytorch.loggers import WandbLogger

    forced, why = wandb_offline_needed()
    use_offline = forced if offline is None else bool(offline) or forced
    if use_offline:
        os.environ["WANDB_MODE"] = "offline"
        training_log.info(f"W&B logging offline ({why}); sync later with `wandb sync <run dir>`")
    kwargs.setdefault("settings", None)
    settings = kwargs.pop("settings")
    if settings is None:
        import wandb

        settings = wandb.Settings(init_timeout=60, silent=True, x_disable_stats=True)
    return WandbLogger(offline=use_offline, settings=settings, **kwargs)


# -- config helpers -------------------------------------------------------------------------
def check_group_overrides(argv: Sequence[str], config_dirs: Sequence[Path] | None = None) -> None:
    """Fail fast with one line for ``group=value`` overrides naming a config file that does not exist, or null.

    Groups and options are looked up in `config_dirs` (default: ``$ARD_CONF_DIR`` then the shipped conf/).
    Hydra cannot set a group to null (``experiment=null`` is a raw traceback there): the fix is ``~group``.
    """
    dirs = list(config_dirs) if config_dirs is not None else default_config_dirs()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key.startswith("~"):
            continue  # ~group=option deletes; Hydra checks the option itself
        key = key.lstrip("+")
        groups = [d / key for d in dirs if (d / key).is_dir()]
        if key.startswith("hydra") or "." in key or not groups:
            continue
        options = sorted({p.stem for g in groups for p in g.glob("*.yaml")})
        for choice in value.split(","):
            choice = choice.strip()
            if choice in ("", "null"):
                raise ConfigError(f"{key}={choice or repr('')} cannot unset a config group; drop it with ~{key} "
                                  f"(e.g. python train.py '~{key}') or choose one of: {', '.join(options)}")
            if choice.startswith(("choice(", "range(", "glob(")):
                continue
            if choice not in options:
                raise ConfigError(f"unknown {key} {choice!r}; choose one of: {', '.join(options)}")


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


# -- reporting ------------------------------------------------------------------------------
def evaluate_checkpoint(model: Any, datamodule: Any, out_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on the validation split and write metrics.json, the per-character table and the confusion PNG; an
    answer naming any character its picture is filed under counts as right (``accuracy_strict``: the label alone)."""
    import numpy as np

    from .evaluation import macro_f1, predict_loader, tag_map, topk_accuracy, write_report

    pred = predict_loader(model, datamodule.val_dataloader())
    n = len(model.class_names)
    tmap = tag_map(pred["tag_true"], pred["tag_probs"])
    extra = {
        **extra,
        "accuracy_strict": round(float(np.mean(pred["y_true"] == pred["y_pred"])) if len(pred["y_true"]) else 0.0, 6),
        "top5_accuracy": round(topk_accuracy(pred["y_true"], pred["probs"], 5, pred["filed"]), 6),
        "macro_f1": round(macro_f1(pred["y_true"], pred["y_pred"], n), 6),
        "tag_map": None if tmap is None else round(tmap, 6),
    }
    metrics = write_report(out_dir, model.class_names, pred["y_true"].tolist(), pred["y_pred"].tolist(), extra, right=pred["right"].tolist())
    metrics["_pred"] = pred
    return metrics


def csv_metrics_path(loggers: Sequence[Any]) -> Path | None:
    """The CSV logger's metrics.csv (where Lightning writes the per-epoch curves), None without a CSV logger."""
    from lightning.pytorch.loggers import CSVLogger

    for lg in loggers:
        if isinstance(lg, CSVLogger):
            return Path(lg.log_dir) / "metrics.csv"
    return None


def write_learning_curves(loggers: Sequence[Any], out_dir: Path) -> Path | None:
    """Draw ``learning_curves.png`` from the CSV logger's metrics; None (logged at debug) when there is none."""
    from .evaluation import plot_learning_curves

    metrics_csv = csv_metrics_path(loggers)
    if metrics_csv is None or not metrics_csv.is_file():
        training_log.debug(f"no learning curves: no CSV logger metrics ({metrics_csv or 'no CSV logger'})")
        return None
    png = plot_learning_curves(metrics_csv, out_dir / LEARNING_CURVES)
    if png is None:
        training_log.debug(f"no learning curves: {metrics_csv} has no per-epoch rows")
    return png


def log_media_to_wandb(loggers: Sequence[Any], out_dir: Path, metrics: dict[str, Any], datamodule: Any, class_names: Sequence[str]) -> None:
    """Confusion matrix and learning-curve images, per-class accuracy and sample predictions onto any W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    wb = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wb:
        return
    import wandb

    pred = metrics.get("_pred", {})
    rows = []
    for i, rec in enumerate(datamodule.val_records[:24]):
        if i >= len(pred.get("y_pred", [])):
            break
        p = int(pred["y_pred"][i])
        rows.append([wandb.Image(str(rec.path(datamodule.root))), rec.character, class_names[p], float(pred["probs"][i][p])])
    media: dict[str, Any] = {
        "eval/confusion_matrix": wandb.Image(str(out_dir / "confusion_matrix.png")),
        "eval/per_class_accuracy": wandb.Table(
            columns=["character", "accuracy"], data=[[k, v] for k, v in metrics["per_character"].items()]
        ),
        "eval/sample_predictions": wandb.Table(columns=["image", "true", "predicted", "confidence"], data=rows),
        "eval/accuracy": metrics["accuracy"],
    }
    if (out_dir / LEARNING_CURVES).is_file():
        media["eval/learning_curves"] = wandb.Image(str(out_dir / LEARNING_CURVES))
    for lg in wb:
        lg.experiment.log(media)


# -- main -----------------------------------------------------------------------------------
def batches_per_epoch(n_batches: int, limit: float | None, world_size: int = 1) -> int:
    """The training steps (batches) one process runs per epoch: its share of `n_batches`, after Lightning's
    ``limit_train_batches`` (an int caps the count, a float takes that fraction)."""
    per_rank = -(-int(n_batches) // max(1, int(world_size)))
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return per_rank
    return min(per_rank, int(limit)) if isinstance(limit, int) else int(per_rank * float(limit))


def budgeted_epochs(max_epochs: int, steps_per_epoch: int, max_steps: int | None, min_epochs: int = 1) -> int:
    """`max_epochs`, shortened to the epochs that fit `max_steps` training steps but never below `min_epochs`: a small
    set runs the whole schedule, a big one keeps the time its steps take (`epoch_budget` in conf/train.yaml)."""
    if not max_steps or steps_per_epoch <= 0 or max_epochs <= 0:
        return max_epochs
    return max(min(max_epochs, int(min_epochs)), min(max_epochs, int(max_steps) // int(steps_per_epoch)))


def apply_epoch_budget(trainer: Any, datamodule: Any, budget: Mapping[str, Any] | None) -> int:
    """Shorten `trainer`'s schedule to `budget` (``max_steps``, ``min_epochs``) for this dataset's size; the epochs it runs.
    The model's cosine schedule reads ``trainer.max_epochs``, so it spans the shortened run."""
    if budget is not None and not isinstance(budget, Mapping):
        raise ConfigError(f"epoch_budget={budget!r} is not a mapping; give epoch_budget.max_steps=<steps> (and min_epochs)")
    budget = dict(budget or {})
    unknown = sorted(set(budget) - {"max_steps", "min_epochs"})
    if unknown:
        raise ConfigError(f"epoch_budget: unknown key(s) {', '.join(unknown)}; choose from max_steps, min_epochs")
    bad = ConfigError(f"epoch_budget={budget}: max_steps and min_epochs must be positive whole numbers (max_steps: null for no budget)")
    try:
        max_steps = int(budget["max_steps"]) if budget.get("max_steps") else None  # null (or 0): no budget
        min_epochs = 1 if budget.get("min_epochs") is None else int(budget["min_epochs"])
    except (TypeError, ValueError):
        raise bad from None
    if (max_steps is not None and max_steps < 1) or min_epochs < 1:
        raise bad
    planned = trainer.max_epochs
    if max_steps is None or not planned or planned < 0 or getattr(trainer, "fast_dev_run", False):
        return planned
    steps = batches_per_epoch(len(datamodule.train_dataloader()), trainer.limit_train_batches, trainer.world_size)
    epochs = budgeted_epochs(planned, steps, max_steps, min_epochs)
    if epochs != planned:
        trainer.fit_loop.max_epochs = epochs
        training_log.info(f"epoch budget: {epochs} of trainer.max_epochs={planned} epochs ({steps} steps each, "
                          f"epoch_budget.max_steps={max_steps}, min_epochs={min_epochs})")
    return epochs


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
    apply_epoch_budget(trainer, datamodule, cfg.get("epoch_budget"))
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams({"cfg": cfg_plain, "data": datamodule.summary()})

    if trainer.is_global_zero:
        atomic_write_text(out_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.perf_counter()
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


__all__ = [
    "TrainResult",
    "train",
    "optimized_metric",
    "check_group_overrides",
    "build_wandb_logger",
    "evaluate_checkpoint",
    "CONFIG_DIR",
]
