"""Evaluation reports: metrics.json, a per-character accuracy table, a confusion-matrix PNG and learning curves.

`predict_loader` runs a classifier over a loader; `write_report` turns labels + predictions into
the files a run (or the workflow's version folder) keeps. Reused by the workflow and fusion.
`plot_learning_curves` draws the CSV logger's per-epoch loss/accuracy.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..fsutil import atomic_path, atomic_write_json, atomic_write_text
from ..models.filed_accuracy import filed_targets
from ..versionfiles import METRICS


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def per_character_table(class_names: Sequence[str], cm: np.ndarray, correct_per_class: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One row per character: images, correct (`correct_per_class`, else the diagonal), accuracy, most frequent
    confusion."""
    rows = []
    for i, name in enumerate(class_names):
        total = int(cm[i].sum())
        correct = int(cm[i, i] if correct_per_class is None else correct_per_class[i])
        off = cm[i].copy()
        off[i] = 0
        confused = class_names[int(off.argmax())] if off.sum() else ""
        rows.append(
            {
                "character": name,
                "images": total,
                "correct": correct,
                "accuracy": round(correct / total, 4) if total else None,
                "most_confused_with": confused,
            }
        )
    return rows


def _table_markdown(rows: list[dict[str, Any]], overall: float) -> str:
    lines = ["| character | images | correct | accuracy | most confused with |", "|---|---:|---:|---:|---|"]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {r['character']} | {r['images']} | {r['correct']} | {acc} | {r['most_confused_with']} |")
    total = sum(r["images"] for r in rows)
    lines.append(f"| **overall** | {total} | {sum(r['correct'] for r in rows)} | {100 * overall:.1f}% | |")
    return "\n".join(lines) + "\n"


def _table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["character"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _save_png(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (write-then-rename: a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (counts in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (rows: true)")
    return _save_png(fig, path)


# (column, label) per panel; val/f1_macro shares the accuracy panel since it is on the same 0..1 scale, and so does
# the strict readings (under train/acc and val/acc when a side holds group pictures)
_CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("train/loss", "train"), ("val/loss", "val"))),
    ("accuracy", (("train/acc", "train"), ("train/acc_strict", "train, each copy on its label"), ("val/acc", "val"),
                  ("val/acc_strict", "val, each copy on its label"),
                  ("val/f1_macro", "val macro F1"))),
)


def read_epoch_metrics(metrics_csv: str | Path) -> dict[int, dict[str, float]]:
    """Lightning CSVLogger rows merged per epoch (rows are sparse; the last filled value wins); {} if absent."""
    path = Path(metrics_csv)
    if not path.is_file():
        return {}
    epochs: dict[int, dict[str, float]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            epoch = _as_float(row.get("epoch"))
            if epoch is None:
                continue  # e.g. the LR monitor's rows, which carry only a step
            merged = epochs.setdefault(int(epoch), {})
            for key, raw in row.items():
                value = _as_float(raw)
                if key not in ("epoch", "step") and value is not None:
                    merged[key] = value
    return dict(sorted(epochs.items()))


def _as_float(raw: str | None) -> float | None:
    """A CSV cell as a float, None when empty or not a number."""
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def plot_learning_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Per-epoch train/val loss and accuracy as one two-panel PNG; None when the CSV has nothing to draw."""
    epochs = read_epoch_metrics(metrics_csv)
    if not any(col in m for m in epochs.values() for _, cols in _CURVE_PANELS for col, _ in cols):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(_CURVE_PANELS), figsize=(10, 4))
    for ax, (title, cols) in zip(axes, _CURVE_PANELS):
        for col, label in cols:
            points = [(e, m[col]) for e, m in epochs.items() if col in m]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linestyle="--" if "f1" in col or "strict" in col else "-", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save_png(fig, path)


def write_report(
    out_dir: str | Path,
    class_names: Sequence[str],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    extra_metrics: Mapping[str, Any] | None = None,
    right: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``per_character.csv``/``.md`` and ``confusion_matrix.png``; return the metrics.

    `right` marks the answers that count as right (a group picture named as another character it shows), else
    prediction == label; the confusion matrix always plots labels against predictions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    cm = confusion_matrix(y_true, y_pred, len(names))
    n = int(cm.sum())
    hits = np.asarray(y_true) == np.asarray(y_pred) if right is None else np.asarray(right, bool)
    acc = float(hits.mean()) if n else 0.0
    correct = np.bincount(np.asarray(y_true, np.int64), weights=hits.astype(float), minlength=len(names)).astype(int) if n else None
    rows = per_character_table(names, cm, correct)
    per_class = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    metrics: dict[str, Any] = {
        "accuracy": round(acc, 6),
        "balanced_accuracy": round(float(np.mean(per_class)), 6) if per_class else 0.0,
        "images": n,
        "classes": len(names),
        "per_character": {r["character"]: r["accuracy"] for r in rows},
        "confusion_matrix": cm.tolist(),
        "class_names": names,
    }
    metrics.update({k: _jsonable(v) for k, v in dict(extra_metrics or {}).items()})
    atomic_write_json(out / METRICS, metrics)
    atomic_write_text(out / "per_character.csv", _table_csv(rows))
    atomic_write_text(out / "per_character.md", _table_markdown(rows, acc))
    plot_confusion_matrix(cm, names, out / "confusion_matrix.png", title=f"accuracy {100 * acc:.1f}% on {n} images")
    return metrics


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: Any, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Run a classifier over a (x, y, tags[, filed]) loader: labels, predictions, probabilities, tag targets/probs,
    ``filed`` (bool [n, classes]: the characters each picture is filed under; its own label when the loader has none)
    and ``right`` (the prediction is one of them)."""
    was_training = model.training
    model.eval().to(device)
    ys, probs, tag_true, tag_prob, filed = [], [], [], [], []
    for batch in loader:
        x, y, tags = batch[:3]
        char_logits, tag_logits = model(x.to(device))
        ys.append(y.numpy())
        probs.append(char_logits.softmax(-1).cpu().numpy())
        tag_true.append(tags.numpy())
        tag_prob.append(tag_logits.sigmoid().cpu().numpy())
        filed.append(filed_targets(y, char_logits.shape[1], batch[3] if len(batch) > 3 else None).numpy())
    model.train(was_training)
    probs_a = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    y_pred = probs_a.argmax(-1) if len(probs_a) else np.zeros(0, np.int64)
    filed_a = np.concatenate(filed) if filed else np.zeros((0, 0), bool)
    return {
        "y_true": np.concatenate(ys) if ys else np.zeros(0, np.int64),
        "y_pred": y_pred,
        "probs": probs_a,
        "tag_true": np.concatenate(tag_true) if tag_true else np.zeros((0, 0)),
        "tag_probs": np.concatenate(tag_prob) if tag_prob else np.zeros((0, 0)),
        "filed": filed_a,
        "right": filed_a[np.arange(len(y_pred)), y_pred] if len(y_pred) else np.zeros(0, bool),
    }


def topk_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int, filed: np.ndarray | None = None) -> float:
    """Fraction of rows whose label (with `filed`, bool [n, classes]: any character the picture is filed under) is
    among the k most probable classes."""
    if not len(y_true):
        return 0.0
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    if filed is None:
        return float(np.mean([t in row for t, row in zip(y_true, top)]))
    return float(np.take_along_axis(filed, top, axis=1).any(axis=1).mean())


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    f1s = []
    for i in range(n_classes):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i].sum() - cm[i, i]
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def tag_map(tag_true: np.ndarray, tag_probs: np.ndarray) -> float | None:
    """Mean average precision over tags that have at least one positive (None without tags)."""
    if tag_true.size == 0 or tag_true.shape[1] == 0:
        return None
    aps = []
    for j in range(tag_true.shape[1]):
        t = tag_true[:, j]
        if t.sum() == 0:
            continue
        order = np.argsort(-tag_probs[:, j])
        hits = t[order]
        prec = np.cumsum(hits) / (np.arange(len(hits)) + 1)
        aps.append(float((prec * hits).sum() / hits.sum()))
    return float(np.mean(aps)) if aps else None
