"""What a finished run leaves beside its checkpoint: the evaluation of the published epoch (metrics.json, per-character
table, confusion PNG), learning curves from the CSV logger, and the same pictures on a W&B logger when there is one.
torch / Lightning / W&B are imported inside the functions, so importing the training package stays cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..log import training_log

LEARNING_CURVES = "learning_curves.png"  # per-epoch loss/accuracy drawn from the CSV logger, next to confusion_matrix.png


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
