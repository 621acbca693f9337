"""Fine-tune the live classifier on logged uploads during a fusion, and keep it only when it is not worse.

The seed's "model update" was an empty stub. Here a fusion with ``finetune.enabled=true`` turns the
selected logged detections whose uploads were stored (``feature_log.policy.store_images``) into
crops, trains the live version's classifier further on them together with the data it was trained
on (warm start: ``model.init_from``, so nothing is forgotten for lack of data and no character is
relearnt from scratch), and compares old and new classifiers on held-back feedback crops and on the
merged validation split. The new ``model.ckpt`` goes into the fused version only when it is not worse.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import OmegaConf

from ..confutil import compose_config, dataclass_from_mapping
from ..data.layout import ImageRecord, scan_dataset, write_metadata
from ..errors import ConfigError, DatasetError
from ..fsutil import link_or_copy
from ..log import get_logger
from ..versionfiles import MODEL
from .featurelog import FeatureLog, LogRecord

_log = get_logger("training")


@dataclass
class FinetunePolicy:
    """``finetune:`` of conf/fusion.yaml."""

    enabled: bool = False
    # the data the live classifier was trained on; null = the live version's manifest ``dataset``
    base_dataset: str | None = None
    epochs: int = 3
    # learning rate = the checkpoint's learning rate x lr_scale (a warm start wants smaller steps)
    lr_scale: float = 0.3
    # fewer usable logged crops than this: skip fine-tuning (the gallery part still runs)
    min_images: int = 4
    # accept the new classifier if neither comparison drops by more than this
    tolerance: float = 0.0
    # extra ``key=value`` settings applied last to the training config (e.g. trainer.accelerator=gpu)
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "FinetunePolicy":
        pol = dataclass_from_mapping(cls, cfg, "finetune")
        pol.overrides = [str(o) for o in pol.overrides or []]
        if pol.epochs < 1 or pol.lr_scale <= 0:
            raise ConfigError(f"finetune: epochs ({pol.epochs}) must be >= 1 and lr_scale ({pol.lr_scale}) > 0")
        return pol


@dataclass
class FinetuneOutcome:
    """What fine-tuning produced: the accepted checkpoint (None when skipped or rejected) and its report."""

    ckpt_path: Path | None
    report: dict = field(default_factory=dict)


# -- logged uploads -> dataset folder ------------------------------------------------------------------
def _record_and_detection(source: str) -> tuple[str, int]:
    """``log:<record id>#<detection>`` (an example's source) -> (record id, detection index)."""
    rid, det = source[len("log:"):].rsplit("#", 1)
    return rid, int(det)


def write_example_crops(examples: Iterable[Any], records: Mapping[str, LogRecord], log: FeatureLog, out: Path) -> tuple[list[ImageRecord], int]:
    """Crop each example's detection out of its stored upload into ``out/<character>/<sha>_<det>.png``.

    Returns the dataset rows (``group`` = the upload's hash, so crops of one upload never straddle a
    split) and how many examples had no stored image.
    """
    from PIL import Image

    rows: list[ImageRecord] = []
    no_image = 0
    for ex in examples:
        rid, det = _record_and_detection(ex.source)
        rec = records.get(rid)
        path = log.image_path(rec) if rec is not None else None
        if path is None:
            no_image += 1
            continue
        with Image.open(path) as im:
            im = im.convert("RGB")
            box = rec.detections[det].get("box") or [0, 0, im.width, im.height]
            crop = im if rec.data.get("whole_image") else im.crop(tuple(int(round(v)) for v in box[:4]))
        rel = f"{ex.character}/{rec.image_sha256[:16]}_{det}.png"
        (out / ex.character).mkdir(parents=True, exist_ok=True)
        crop.save(out / rel)
        rows.append(ImageRecord(file_name=rel, character=ex.character, series=ex.series, source=ex.source,
                                group=rec.image_sha256, tags=[t["tag"] for t in rec.detections[det].get("tags", [])]))
    return rows, no_image


def records_by_id(log: FeatureLog, ids: set[str]) -> dict[str, LogRecord]:
    """The log records with these ids (read without embeddings)."""
    return {r.id: r for r in log.read(embeddings=False) if r.id in ids}


def merge_datasets(base: Path, extra: Path, extra_rows: Sequence[ImageRecord], out: Path) -> list[ImageRecord]:
    """``out`` = the base dataset (hard links) + the logged crops, with one ``metadata.jsonl``."""
    base_rows = scan_dataset(base)
    for r in base_rows:
        link_or_copy(r.path(base), out / r.file_name)
    for r in extra_rows:
        link_or_copy(extra / r.file_name, out / r.file_name)
    rows = [*base_rows, *extra_rows]
    write_metadata(out, rows)
    return rows


# -- train and compare ----------------------------------------------------------------------------------
def finetune_config(ckpt: Path, dataset: Path, work: Path, policy: FinetunePolicy, log_cfg: Mapping[str, Any] | None = None) -> Any:
    """``train.yaml`` bound to the merged dataset, with the checkpoint's own model settings and a warm start;
    training logs go where the calling job logs (`log_cfg`)."""
    import torch

    hp = torch.load(str(ckpt), map_location="cpu", weights_only=False).get("hyper_parameters", {})
    run_model = (hp.get("run_config") or {}).get("model")
    cfg = compose_config("train", [
        "data=folder", "logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "~experiment",
    ], fix="fix conf/train.yaml")
    OmegaConf.set_struct(cfg, False)
    if run_model:
        cfg.model = OmegaConf.create(run_model)
    else:  # a checkpoint from outside train.py: its hyper-parameters still name the backbone
        cfg.model.backbone = OmegaConf.create(dict(hp.get("backbone") or {}))
    cfg.model.init_from = str(ckpt)
    cfg.model.backbone.pretrained = False  # the warm start brings the weights
    cfg.model.backbone.weights_path = None
    cfg.model.optimizer.lr = float(cfg.model.optimizer.lr) * policy.lr_scale
    cfg.model.scheduler.warmup_epochs = 0
    cfg.data.root = str(dataset)
    cfg.data.synthetic = None
    cfg.data.image_size = int(hp.get("image_size", cfg.data.image_size))
    # the same framing and views as the live classifier, so its gallery and recognition stay consistent
    cfg.data.resize = str(hp.get("eval_resize") or cfg.data.resize)
    if hp.get("face_view"):
        cfg.data.face_view = OmegaConf.create(dict(hp["face_view"]))
    cfg.trainer.max_epochs = policy.epochs
    cfg.paths.output_dir = str(work / "train")
    cfg.paths.data_dir = str(work)
    cfg.callbacks.pop("early_stopping", None)
    cfg.evaluate = True
    if log_cfg:
        cfg.log = OmegaConf.create(dict(log_cfg))
    for item in policy.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"finetune.overrides: {item!r} is not key=value")
        if OmegaConf.is_dict(OmegaConf.select(cfg, key.strip(), default=None)):
            raise ConfigError(f"finetune.overrides: {key.strip()!r} is a config section; set its fields, e.g. trainer.accelerator=gpu")
        OmegaConf.update(cfg, key.strip(), OmegaConf.from_dotlist([f"v={value}"]).v, merge=True, force_add=True)
    return cfg


def classifier_top1(ckpt: Path, images: Sequence[Any], labels: Sequence[str], batch_size: int = 32) -> float | None:
    """Top-1 of a classifier checkpoint on images; a label the classifier does not know counts as a miss."""
    import torch

    from ..recognition.embedder import ClassifierEmbedder

    if not labels:
        return None
    e = ClassifierEmbedder(str(ckpt))
    hits = 0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            logits, _ = e.model(e.preprocess(list(images[i : i + batch_size])))
            hits += sum(e.model.class_names[p] == y for p, y in zip(logits.argmax(1).tolist(), labels[i : i + batch_size]))
    return hits / len(labels)


def _images(root: Path, rows: Sequence[ImageRecord]) -> list[Any]:
    from ..imageio import load_image

    return [load_image(r.path(root)) for r in rows]


def finetune_classifier(base_dir: Path, base_manifest: Mapping[str, Any], chosen: Sequence[Any], holdout: Sequence[Any],
                        log: FeatureLog, policy: FinetunePolicy, work: Path, log_cfg: Mapping[str, Any] | None = None) -> FinetuneOutcome:
    """Fine-tune ``base_dir/model.ckpt`` on the chosen logged crops + its dataset; keep it when not worse."""
    from ..training import train_launched

    report: dict[str, Any] = {"enabled": True, "decision": "skipped"}
    ckpt = base_dir / MODEL
    if not ckpt.is_file():
        report["reason"] = f"live version has no {MODEL}"
        return FinetuneOutcome(None, report)
    base = policy.base_dataset or base_manifest.get("dataset")
    if not base or not Path(str(base)).is_dir():
        report["reason"] = (f"the data the live classifier was trained on is not available ({base}); "
                            "set finetune.base_dataset=<dataset folder>")
        return FinetuneOutcome(None, report)
    shutil.rmtree(work, ignore_errors=True)
    ids = {_record_and_detection(ex.source)[0] for ex in [*chosen, *holdout]}
    records = records_by_id(log, ids)
    rows, no_image = write_example_crops(chosen, records, log, work / "logged")
    ho_rows, _ = write_example_crops(holdout, records, log, work / "holdout")
    report.update({"logged_images": len(rows), "without_stored_image": no_image, "holdout_images": len(ho_rows),
                   "per_character": dict(Counter(r.character for r in rows)), "base_dataset": str(base)})
    if len(rows) < policy.min_images:
        report["reason"] = (f"{len(rows)} logged crops with stored images (< finetune.min_images={policy.min_images}); "
                            "turn on feature_log.policy.store_images in the service to collect them")
        return FinetuneOutcome(None, report)
    try:
        merge_datasets(Path(str(base)), work / "logged", rows, work / "dataset")
    except DatasetError as exc:
        report["reason"] = f"base dataset unusable: {exc}"
        return FinetuneOutcome(None, report)
    cfg = finetune_config(ckpt, work / "dataset", work, policy, log_cfg)
    _log.info(f"fusion fine-tune: {len(rows)} logged crops + {base}, {policy.epochs} epochs from {ckpt}")
    result = train_launched(cfg)
    new_ckpt = Path(result.ckpt_path)

    # Compare on what neither model trained on (held-back feedback) and on the new validation split
    # (which the live model may have seen in training: a comparison biased towards the live model).
    from ..data.layout import Split

    split = Split.load(next((work / "splits").glob("*.json"))) if (work / "splits").is_dir() else None
    all_rows = {r.file_name: r for r in scan_dataset(work / "dataset")}
    val_rows = [all_rows[f] for f in (split.val if split else []) if f in all_rows]
    metrics: dict[str, Any] = {}
    for name, root, rs in (("holdout", work / "holdout", ho_rows), ("val", work / "dataset", val_rows)):
        ims, ys = _images(root, rs), [r.character for r in rs]
        metrics[f"{name}_n"] = len(ys)
        metrics[f"{name}_before"] = classifier_top1(ckpt, ims, ys)
        metrics[f"{name}_after"] = classifier_top1(new_ckpt, ims, ys)
    report["metrics"] = metrics
    worse = [n for n in ("holdout", "val") if metrics[f"{n}_before"] is not None
             and metrics[f"{n}_after"] < metrics[f"{n}_before"] - policy.tolerance]
    if worse:
        report.update(decision="rejected", reason="fine-tuned classifier is worse on " + " and ".join(worse))
        return FinetuneOutcome(None, report)
    report.update(decision="accepted", reason="not worse on " + " and ".join(
        n for n in ("holdout", "val") if metrics[f"{n}_before"] is not None), checkpoint=str(new_ckpt))
    return FinetuneOutcome(new_ckpt, report)
