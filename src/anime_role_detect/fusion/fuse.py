"""Fuse logged features into a new registry version: trusted examples in, near-duplicates out, caps per character.

This module orchestrates one run under a per-registry lock: `selection` picks the examples,
`evaluation` judges live vs new (validation set and held-back feedback, regression pruning),
`finetune` optionally retrains the classifier, `report` decides and reports; the new version is
written through `Registry.derive` and registered only if it is not worse than the live one.
`export_dataset` writes the selected stored uploads as a dataset folder instead.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, RegistryError, UserError
from ..fsutil import atomic_write_json, atomic_write_text, link_or_copy, read_json
from ..log import get_logger
from ..recognition.evalset import EvalSet
from ..recognition.gallery import Gallery
from ..recognition.onnx_export import export_into, manifest_entry
from ..recognition.runtime import ONNX_FILES, ONNX_META
from ..registry import Derivation, Registry
from ..versionfiles import (
    CALIBRATION,
    EMBEDDER,
    FUSION_REPORT_JSON,
    FUSION_REPORT_MD,
    GALLERY_INDEX,
    GALLERY_META,
    GALLERY_ROWS,
    GALLERY_VECTORS,
    MANIFEST,
    METRICS,
    MODEL,
    VAL_EMBEDDINGS,
)
from .evaluation import (
    EvalPolicy,
    holdout_eval_set,
    load_eval_set,
    prune_regressions,
    top1_accuracy,
    top1_hits,
)
from .featurelog import FeatureLog, LogRecord
from .finetune import (
    FinetuneOutcome,
    FinetunePolicy,
    finetune_classifier,
    write_example_crops,
)
from .report import decide, render_markdown
from .selection import Example, SelectionPolicy, collect_examples, select_examples

_log = get_logger("system")
STAGING_PREFIX = "f"  # fusion's versions are ``f<stamp>``, staged in ``.staging-f<stamp>``: a crashed fusion's leftovers are recognisable


@dataclass
class FuseResult:
    """Outcome of one fusion: the registered version (None when nothing was registered) and the report."""

    version_id: str | None
    report: dict = field(default_factory=dict)


def fuse(cfg: Mapping[str, Any]) -> FuseResult:
    """Build a new version from the live one plus the feature log; register it when not worse (or forced)."""
    cfg = dict(cfg)
    for key in ("log_dir", "registry_dir"):
        if not cfg.get(key):
            raise ConfigError(f"fusion: {key} is not set; pass {key}=<folder>")
    selection = SelectionPolicy.from_mapping(cfg.get("selection"))
    evaluation = EvalPolicy.from_mapping(cfg.get("evaluation"))
    log_dir, registry = Path(cfg["log_dir"]), Registry(cfg["registry_dir"])
    if not log_dir.is_dir():
        raise ConfigError(f"fusion: log_dir {log_dir} does not exist; point it at the service's feature log folder")
    output_dir = Path(cfg["output_dir"]) if cfg.get("output_dir") else None
    with fusion_lock(registry.root):
        stale = clean_fusion_staging(registry)
        base_id = registry.latest_id() if cfg.get("base_version", "latest") == "latest" else str(cfg["base_version"])
        if base_id is None:
            raise RegistryError(f"registry {registry.root} has no live version to fuse into; run the workflow first")
        base_dir = registry.path(base_id)
        gallery = Gallery.load(base_dir)
        known = {c["name"] for c in gallery.characters()}

        retention = dict(cfg.get("retention") or {})
        log = FeatureLog(log_dir, {"retention_days": float(retention.get("retention_days", 14))})
        if retention.get("apply", False):
            log.apply_retention()
        n_records = 0

        def counted() -> Iterator[LogRecord]:  # streamed: only selected examples keep their embeddings in memory
            nonlocal n_records
            for rec in log.read(embedder=gallery.embedder_id):
                n_records += 1
                yield rec

        candidates, holdout, skipped, bar_info = collect_examples(counted(), gallery.embedder_id, gallery.dim, selection,
                                                                   evaluation.holdout_fraction, known)
        chosen, dropped = select_examples(candidates, gallery, selection)
        skipped.update(dropped)

        evalset, val_source = load_eval_set(base_dir, gallery, evaluation)
        val_x, val_y = evalset.embeddings if len(evalset) else np.zeros((0, gallery.dim), np.float32), evalset.labels
        held = holdout_eval_set(holdout, gallery.embedder_id)
        ho_x = held.embeddings if len(held) else np.zeros((0, gallery.dim), np.float32)
        ho_y = held.labels
        if not val_y and not ho_y and not cfg.get("force", False) and chosen:
            raise ConfigError("fusion: nothing to compare the new version with: the live version carries no evaluation set "
                              "and no feedback was held back; pass evaluation.val_dir=<dataset folder with split.json>, "
                              "give feedback on some answers, or force=true")
        metrics: dict[str, Any] = {"val_n": len(val_y), "val_source": val_source, "holdout_n": len(ho_y),
                                   "val_before": top1_accuracy(gallery, val_x, val_y),
                                   "holdout_before": top1_accuracy(gallery, ho_x, ho_y)}
        rounds = evaluation.prune_rounds if evaluation.prune_regressions else 0
        gallery, chosen, pruned = prune_regressions(base_dir, chosen, val_x, val_y, top1_hits(gallery, val_x, val_y), rounds)
        if pruned:
            skipped["pruned_validation_regression"] = pruned
        by_char: dict[str, list[Example]] = defaultdict(list)
        for ex in chosen:
            by_char[ex.character].append(ex)
        metrics["val_after"] = top1_accuracy(gallery, val_x, val_y)
        metrics["holdout_after"] = top1_accuracy(gallery, ho_x, ho_y)
        register, reason = decide(metrics, len(chosen), evaluation.tolerance, bool(cfg.get("force", False)))
        finetune = run_finetune(cfg, registry, base_dir, chosen, holdout, log, output_dir)
        new_model = finetune.ckpt_path if finetune is not None else None
        if new_model is not None and not register:  # the classifier improved though the gallery did not: keep the live gallery
            gallery, by_char, chosen = Gallery.load(base_dir), defaultdict(list), []
            metrics["val_after"], metrics["holdout_after"] = metrics["val_before"], metrics["holdout_before"]
            register, reason = True, f"gallery unchanged ({reason}); classifier fine-tuned ({finetune.report['reason']})"
        elif new_model is not None:
            reason += f"; classifier fine-tuned ({finetune.report['reason']})"
        report: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "base_version": base_id, "version_id": None,
            "decision": "registered" if register else "rejected", "reason": reason, "records": n_records,
            "corrupt_records": getattr(log, "corrupt", 0), "embedder": gallery.embedder_id, "metrics": metrics,
            "added_per_character": {c: dict(Counter(e.kind for e in exs)) for c, exs in by_char.items()},
            "new_characters": sorted(set(by_char) - known), "skipped": dict(skipped), "stale_staging_removed": stale,
            "unconfirmed_bar": bar_info, "selection": asdict(selection), "evaluation": asdict(evaluation),
            "finetune": finetune.report if finetune is not None else {"enabled": False},
        }
        version_id = None
        if register:
            version_id = write_version(registry, base_id, gallery, evalset.extend(held), report, bool(cfg.get("promote", True)), new_model)
        if output_dir is not None:
            write_report(output_dir, report)
        _log.info(f"fusion: {report['decision']} ({reason}); added {len(chosen)} examples; version {version_id or '-'}")
        return FuseResult(version_id, report)


def run_finetune(cfg: Mapping[str, Any], registry: Registry, base_dir: Path, chosen: Sequence[Example],
                 holdout: Sequence[Example], log: FeatureLog, output_dir: Path | None) -> FinetuneOutcome | None:
    """Classifier fine-tuning on the logged uploads when ``finetune.enabled`` (None when off)."""
    policy = FinetunePolicy.from_mapping(cfg.get("finetune"))
    if not policy.enabled:
        return None
    manifest = read_json(base_dir / MANIFEST) if (base_dir / MANIFEST).is_file() else {}
    work = (output_dir or registry.root / ".fusion-work") / "finetune"
    out = finetune_classifier(base_dir, manifest, chosen, holdout, log, policy, work, cfg.get("log"))
    _log.info(f"fusion fine-tune: {out.report['decision']} ({out.report.get('reason')})")
    return out


# -- the new version ------------------------------------------------------------------------------------
def write_version(registry: Registry, base_id: str, gallery: Gallery, evalset: EvalSet,
                  report: dict, promote: bool, new_model: Path | None = None) -> str:
    """Derive the new version from the base: new gallery, evaluation set (the base's + held-back feedback), metrics,
    reports (+ a fine-tuned model).

    Everything else (tag profiles, calibration, config, the model unless replaced) is carried as hard links.
    """
    skip = {GALLERY_INDEX, GALLERY_META, GALLERY_ROWS, GALLERY_VECTORS, METRICS, FUSION_REPORT_JSON, FUSION_REPORT_MD, VAL_EMBEDDINGS}
    base_dir = registry.path(base_id)
    reexport = new_model is not None and (base_dir / ONNX_META).is_file()  # the carried ONNX classifier is the old one
    if new_model is not None:
        skip.add(MODEL)
    if reexport:
        skip |= ONNX_FILES  # written fresh below, never through hard links into the base's files
    report["version_id"] = registry.new_version_id(prefix=STAGING_PREFIX)  # the reports inside the version name it
    extra = {"fusion": {"added": report["added_per_character"], "reason": report["reason"]}}
    with registry.derive(base_id, "fusion", promote=promote, skip=skip, extra=extra, version_id=report["version_id"]) as d:
        if new_model is not None:
            keep_gallery_embedder(gallery, d)
            shutil.copy2(new_model, d.dir / MODEL)
        gallery.save(d.dir)
        mark_calibration_stale(d, f"fusion added {sum(sum(c.values()) for c in report['added_per_character'].values())} examples")
        if len(evalset):  # inherited and extended, so the next fusion and `registry compare` can judge without images
            evalset.save(d.dir)
        assert d.base_dir is not None
        atomic_write_json(d.dir / METRICS, version_metrics(d.base_dir, report, new_model))
        write_report(d.dir, report)
        if reexport:  # the fine-tuned classifier (and the old one, now the gallery's embedder) for ONNX Runtime
            d.extra["onnx"] = manifest_entry(export_into(d.dir))
    assert d.id is not None
    return d.id


def mark_calibration_stale(d: Derivation, reason: str) -> None:
    """The carried open-set thresholds were measured on the old gallery: say so, and since when, in the new version."""
    from ..recognition.openset import OpenSetCalibration

    if d.base_dir is None or not (d.base_dir / CALIBRATION).is_file():
        return
    try:
        calib = OpenSetCalibration.load(d.base_dir)
    except UserError:
        return  # an unreadable calibration is carried as it is; the recognizer reports it when loading
    calib.mark_stale(reason)
    calib.save(d.writable(CALIBRATION))


def keep_gallery_embedder(gallery: Gallery, d: Derivation) -> None:
    """A gallery embedded by the live classifier keeps those weights as ``embedder.ckpt`` when model.ckpt is replaced."""
    ecfg = dict(gallery.embedder_config)
    if ecfg.get("kind") != "classifier" or d.base_dir is None:
        return
    current = Path(str(ecfg.get("ckpt_path") or MODEL))
    if not current.is_absolute():
        current = d.base_dir / current
    if not current.is_file():
        current = d.base_dir / MODEL  # what the recogniser falls back to
    link_or_copy(current, d.writable(EMBEDDER))
    gallery.embedder_config = {**ecfg, "ckpt_path": EMBEDDER}


def version_metrics(base_dir: Path, report: Mapping[str, Any], new_model: Path | None) -> dict[str, Any]:
    """The new version's ``metrics.json``: the base's, plus the gallery's top-1s, how many were added, and ``finetune/*``
    (only when its model.ckpt is the fine-tuned one)."""
    base = read_json(base_dir / METRICS) if (base_dir / METRICS).is_file() else {}
    m = report["metrics"]
    ft = ((report.get("finetune") or {}).get("metrics") or {}) if new_model is not None else {}
    return {**base, "gallery/val_top1": m["val_after"], "gallery/holdout_top1": m["holdout_after"],
            "fusion/added": sum(sum(d.values()) for d in report["added_per_character"].values()),
            **{f"finetune/{k}": v for k, v in ft.items()}}


def write_report(folder: Path, report: Mapping[str, Any]) -> None:
    """``fusion_report.json`` + ``fusion_report.md`` into `folder` (the new version, or the run's output folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / FUSION_REPORT_JSON, report)
    atomic_write_text(folder / FUSION_REPORT_MD, render_markdown(report))


# -- one fusion at a time -------------------------------------------------------------------------------
@contextmanager
def fusion_lock(registry_root: Path) -> Iterator[None]:
    """One fusion per registry at a time (an OS lock: released even when the process is killed)."""
    registry_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(registry_root / ".fusion.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegistryError(f"another fusion is running on {registry_root}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def clean_fusion_staging(registry: Registry) -> int:
    """Remove staging folders left by a killed fusion (only fusion's own; call with the fusion lock held)."""
    n = 0
    if registry.versions_dir.is_dir():
        for p in registry.versions_dir.glob(f".staging-{STAGING_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


# -- export for classifier fine-tuning ------------------------------------------------------------------
def export_dataset(cfg: Mapping[str, Any]) -> dict:
    """Write the selected logged examples whose uploads were stored as a dataset folder for the training framework.

    ``ROOT/<character>/<sha>_<det>.png`` (the detection's box cropped) + ``metadata.jsonl`` with
    ``source=log:<record>#<det>`` and ``group=<image sha>`` so crops of one upload never straddle a
    split. Feed it to the workflow (``extra_datasets=[ROOT] extend_live=true``) to fine-tune.
    """
    from ..data.layout import write_metadata

    cfg = dict(cfg)
    out = Path(str(cfg.get("export_dir") or ""))
    if not cfg.get("export_dir"):
        raise ConfigError("fusion export: export_dir is not set; pass export_dir=<new dataset folder>")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"fusion export: {out} exists and is not empty; pass a new export_dir")
    selection = SelectionPolicy.from_mapping(cfg.get("selection"))
    registry = Registry(cfg["registry_dir"])
    gallery = Gallery.load(registry.path(str(cfg.get("base_version") or "latest")))
    log = FeatureLog(cfg["log_dir"])
    records = {r.id: r for r in log.read()}
    examples, holdout, skipped, _ = collect_examples(records.values(), gallery.embedder_id, gallery.dim, selection, 0.0,
                                                  {c["name"] for c in gallery.characters()})
    staging = out.with_name(f".{out.name}.partial")  # written aside, renamed into place: never a half export
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows, no_image = write_example_crops(examples, records, log, staging)
    if rows:
        write_metadata(staging, rows)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    summary = {"export_dir": str(out), "images": len(rows), "without_stored_image": no_image,
               "per_character": dict(Counter(r.character for r in rows)), "skipped": dict(skipped)}
    _log.info(f"fusion export: {len(rows)} images to {out} ({no_image} selected examples had no stored image)")
    return summary
