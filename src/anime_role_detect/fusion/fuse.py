"""Fuse logged features into a new registry version: trusted examples in, near-duplicates out, caps per character.

Selection (what the seed got wrong: it averaged *every* unchecked log into the index):
confirmed and corrected detections always count; unconfirmed ones only when the answer was
confident (score and margin over the runner-up above thresholds); only embeddings from the live
gallery's embedder; near-duplicates of gallery rows or of each other dropped; per-character caps.
A deterministic share of the feedback is held back for evaluation. The new version is registered
only if it is not worse than the live one on the validation set and on held-back feedback.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..confutil import dataclass_from_mapping
from ..errors import ConfigError, GalleryError, RegistryError
from ..fsutil import atomic_write_json, atomic_write_text, link_or_copy, read_json
from ..log import get_logger
from ..recognition.gallery import INDEX_FILE, META_FILE, Gallery
from ..recognition.schema import UNKNOWN
from ..registry import Registry
from .featurelog import FeatureLog, LogRecord
from .finetune import EMBEDDER_FILE, MODEL_FILE, FinetuneOutcome, FinetunePolicy, finetune_classifier, write_example_crops

_log = get_logger("system")
VAL_EMBEDDINGS = "val_embeddings.npz"
REPORT_JSON = "fusion_report.json"
REPORT_MD = "fusion_report.md"
STAGING_PREFIX = "f"  # fusion's staging folders are ``.staging-f<stamp>``: a crashed fusion's leftovers are recognisable


@dataclass
class SelectionPolicy:
    """Which logged detections become gallery examples."""

    include_unconfirmed: bool = True
    min_confidence: float = 0.85
    min_margin: float = 0.05
    # raise the bar from the feedback itself: the lowest score at which answers users checked were
    # right at least `auto_precision` of the time (needs `auto_min_feedback` verdicts)
    auto_confidence: bool = True
    auto_precision: float = 0.95
    auto_min_feedback: int = 20
    dedupe_cosine: float = 0.97
    max_added_per_character: int = 100
    max_per_character: int = 500
    allow_new_characters: bool = True
    since_days: float | None = None

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "SelectionPolicy":
        return dataclass_from_mapping(cls, cfg, "selection")


@dataclass
class EvalPolicy:
    """How new and live versions are compared."""

    val_dir: str | None = None
    holdout_fraction: float = 0.25
    tolerance: float = 0.0
    batch_size: int = 32
    prune_regressions: bool = True
    prune_rounds: int = 3

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "EvalPolicy":
        pol = dataclass_from_mapping(cls, cfg, "evaluation")
        if not 0.0 <= pol.holdout_fraction < 1.0:
            raise ConfigError(f"evaluation.holdout_fraction={pol.holdout_fraction}: must be in [0, 1)")
        return pol


@dataclass
class Example:
    """One logged detection chosen as a gallery example (or held back to evaluate on)."""

    character: str
    series: str
    embedding: np.ndarray
    kind: str  # corrected | confirmed | unconfirmed
    score: float
    source: str  # log:<record id>#<detection>


@dataclass
class FuseResult:
    """Outcome of one fusion: the registered version (None when nothing was registered) and the report."""

    version_id: str | None
    report: dict = field(default_factory=dict)


_KIND_PRIORITY = {"corrected": 0, "confirmed": 1, "unconfirmed": 2}


def _is_holdout(source: str, fraction: float) -> bool:
    """Deterministic split of feedback examples: the same record is always held back (or never)."""
    h = int(hashlib.sha1(source.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def _margin(det: Mapping[str, Any]) -> float:
    """Score gap between the answer and the best *other* character in its top-k."""
    role, score = det.get("role"), float(det.get("similarity", 0.0))
    others = [float(t.get("score", 0.0)) for t in det.get("topk", []) if t.get("role") != role]
    return score - max(others) if others else score


def feedback_threshold(verdicts: Sequence[tuple[float, bool]], precision: float, min_count: int) -> float | None:
    """Lowest score s such that checked answers scoring >= s were right at least `precision` of the time.

    None when there are fewer than `min_count` verdicts; +inf when no score reaches the precision
    (then no unconfirmed answer is trusted).
    """
    if len(verdicts) < min_count:
        return None
    ordered = sorted(verdicts, key=lambda v: -v[0])
    best = float("inf")
    right = 0
    for n, (score, ok) in enumerate(ordered, 1):
        right += ok
        if right / n >= precision and n >= min(5, len(ordered)):
            best = score
    return best


def collect_examples(records: Iterable[LogRecord], embedder_id: str, dim: int, policy: SelectionPolicy,
                     holdout_fraction: float, known: set[str]) -> tuple[list[Example], list[Example], Counter, dict]:
    """Split logged detections into (candidates to add, held-back feedback), count why others were skipped,
    and say which confidence bar unconfirmed answers had to pass (``info["min_confidence"]``)."""
    add: list[Example] = []
    holdout: list[Example] = []
    unconfirmed: list[Example] = []
    verdicts: list[tuple[float, bool]] = []  # (score of the logged answer, was it right) from feedback
    skipped: Counter = Counter()
    since = time.time() - policy.since_days * 86400 if policy.since_days else None
    for rec in records:
        if since is not None and rec.time < since:
            skipped["older_than_since_days"] += 1
            continue
        if rec.embedder != embedder_id or (rec.embeddings.size and rec.embeddings.shape[1] != dim):
            skipped["other_embedder"] += len(rec.detections) or 1
            continue
        for i, det in enumerate(rec.detections):
            if i >= len(rec.embeddings):
                skipped["no_embedding"] += 1
                continue
            source = f"log:{rec.id}#{i}"
            fb = rec.feedback.get(i)
            if fb is not None:
                role = fb.role
                kind = "confirmed" if fb.confirmed else "corrected"
                if det.get("role") not in (None, "", UNKNOWN) and not det.get("unknown"):
                    verdicts.append((float(det.get("similarity", 0.0)), role == det.get("role")))
                if not role or role == UNKNOWN:
                    skipped["feedback_without_character"] += 1
                    continue
                if role not in known and not policy.allow_new_characters:
                    skipped["feedback_new_character_not_allowed"] += 1
                    continue
                series = fb.series or (det.get("series", "") if role == det.get("role") else "")
                ex = Example(role, series, rec.embeddings[i], kind, 1.0, source)
                # split by image content: the same picture logged twice never lands on both sides
                split_key = f"{rec.image_sha256 or rec.id}#{i}"
                (holdout if _is_holdout(split_key, holdout_fraction) else add).append(ex)
                continue
            if not policy.include_unconfirmed:
                skipped["unconfirmed_disabled"] += 1
            elif det.get("unknown") or det.get("role") in (None, "", UNKNOWN):
                skipped["unconfirmed_unknown"] += 1
            elif float(det.get("similarity", 0.0)) < policy.min_confidence:
                skipped["unconfirmed_low_confidence"] += 1
            elif _margin(det) < policy.min_margin:
                skipped["unconfirmed_low_margin"] += 1
            elif det["role"] not in known:
                skipped["unconfirmed_not_in_gallery"] += 1
            else:
                unconfirmed.append(Example(det["role"], det.get("series", ""), rec.embeddings[i], "unconfirmed",
                                           float(det["similarity"]), source))
    bar = policy.min_confidence
    auto = feedback_threshold(verdicts, policy.auto_precision, policy.auto_min_feedback) if policy.auto_confidence else None
    if auto is not None and auto > bar:
        bar = auto
        kept = [e for e in unconfirmed if e.score >= bar]
        if len(kept) < len(unconfirmed):
            skipped["unconfirmed_below_feedback_bar"] += len(unconfirmed) - len(kept)
        unconfirmed = kept
    finite = lambda x: x if x is None or np.isfinite(x) else "unreachable"  # noqa: E731 - JSON has no infinity
    info = {"min_confidence": finite(bar), "feedback_bar": finite(auto), "verdicts": len(verdicts),
            "verdict_accuracy": (sum(ok for _, ok in verdicts) / len(verdicts)) if verdicts else None}
    return add + unconfirmed, holdout, skipped, info


def select_examples(candidates: Sequence[Example], gallery: Gallery, policy: SelectionPolicy) -> tuple[list[Example], Counter]:
    """Drop near-duplicates (of gallery rows of the same character, or of each other) and apply the caps.

    Trusted feedback goes first, then unconfirmed examples by confidence, so caps keep the best evidence.
    """
    dropped: Counter = Counter()
    ordered = sorted(candidates, key=lambda e: (_KIND_PRIORITY[e.kind], -e.score, e.source))
    existing = {c["name"]: int(c["prototypes"]) for c in gallery.characters()}
    kept: dict[str, list[Example]] = defaultdict(list)
    kept_vecs: dict[str, list[np.ndarray]] = defaultdict(list)
    if ordered:
        nearest = gallery.search(np.stack([e.embedding for e in ordered]), k=1) if len(gallery) else [[] for _ in ordered]
    for ex, hit in zip(ordered, nearest if ordered else []):
        if hit and hit[0][0] == ex.character and hit[0][2] > policy.dedupe_cosine:
            dropped["near_duplicate_of_gallery"] += 1
            continue
        if kept_vecs[ex.character] and float(np.max(np.stack(kept_vecs[ex.character]) @ ex.embedding)) > policy.dedupe_cosine:
            dropped["near_duplicate_in_log"] += 1
            continue
        if ex.kind == "unconfirmed" and hit and hit[0][0] != ex.character and hit[0][2] > policy.dedupe_cosine:
            dropped["unconfirmed_conflicts_with_gallery"] += 1
            continue
        room = min(policy.max_added_per_character, policy.max_per_character - existing.get(ex.character, 0))
        if len(kept[ex.character]) >= room:
            dropped["per_character_cap"] += 1
            continue
        kept[ex.character].append(ex)
        kept_vecs[ex.character].append(ex.embedding)
    return [e for c in sorted(kept) for e in kept[c]], dropped


def top1_hits(gallery: Gallery, embeddings: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Per query: is the best gallery character the label."""
    if len(labels) == 0:
        return np.zeros(0, bool)
    return np.array([bool(h) and h[0][0] == y for h, y in zip(gallery.search(np.asarray(embeddings, np.float32), k=1), labels)])


def regression_culprits(gallery: Gallery, val_x: np.ndarray, val_y: Sequence[str], right_before: np.ndarray,
                        added: set[str]) -> set[str]:
    """Sources of added rows that win a validation image the live version answered right and the new one gets wrong.

    Such an example pulls another character's look into the wrong name (a mislabel, or a style
    shared by several characters); dropping it keeps the original domain from regressing.
    """
    right_after = top1_hits(gallery, val_x, val_y)
    broken = np.flatnonzero(right_before & ~right_after)
    if len(broken) == 0 or gallery.index is None:
        return set()
    wrong = [gallery.search(val_x[i : i + 1], k=1)[0][0][0] for i in broken]
    _, ids = gallery.index.search(np.ascontiguousarray(val_x[broken], dtype=np.float32), min(len(gallery), 32))
    culprits: set[str] = set()
    for char, row_ids in zip(wrong, ids):
        for rid in row_ids.tolist():
            row = gallery.rows.get(int(rid))
            if row is not None and row.character == char:
                if row.source in added:
                    culprits.add(row.source)
                break
    return culprits


def gallery_with(base_dir: Path, examples: Sequence[Example]) -> Gallery:
    """The live gallery plus `examples` (one call to `Gallery.add` per character)."""
    gallery = Gallery.load(base_dir)
    by_char: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_char[ex.character].append(ex)
    for character, exs in sorted(by_char.items()):
        gallery.add(character, exs[0].series or gallery.series_of().get(character, ""), np.stack([e.embedding for e in exs]),
                    [e.source for e in exs], embedder_id=gallery.embedder_id)
    return gallery


def prune_regressions(base_dir: Path, chosen: list[Example], val_x: np.ndarray, val_y: Sequence[str],
                      right_before: np.ndarray, rounds: int) -> tuple[Gallery, list[Example], int]:
    """The live gallery plus `chosen`, after up to `rounds` passes dropping `regression_culprits`; returns (gallery, kept, dropped)."""
    gallery = gallery_with(base_dir, chosen)
    pruned = 0
    for _ in range(max(0, rounds) if len(val_y) else 0):
        culprits = regression_culprits(gallery, val_x, val_y, right_before, {e.source for e in chosen})
        if not culprits:
            break
        chosen = [e for e in chosen if e.source not in culprits]
        pruned += len(culprits)
        gallery = gallery_with(base_dir, chosen)
    return gallery, chosen, pruned


def top1_accuracy(gallery: Gallery, embeddings: np.ndarray, labels: Sequence[str]) -> float | None:
    """Share of queries whose best gallery character is the label (None when there are no queries)."""
    if len(labels) == 0:
        return None
    hits = gallery.search(np.asarray(embeddings, np.float32), k=1)
    return float(np.mean([bool(h) and h[0][0] == y for h, y in zip(hits, labels)]))


# -- validation set -------------------------------------------------------------------------------------
def load_val_embeddings(version_dir: Path, gallery: Gallery, policy: EvalPolicy) -> tuple[np.ndarray, list[str], str]:
    """Validation embeddings + labels: from ``evaluation.val_dir`` (embedded now), else stored with the version."""
    if policy.val_dir:
        return (*embed_val_dir(Path(policy.val_dir), gallery, policy.batch_size), str(policy.val_dir))
    stored = version_dir / VAL_EMBEDDINGS
    if stored.is_file():
        with np.load(stored, allow_pickle=False) as z:
            if str(z["embedder"]) != gallery.embedder_id:
                _log.warning(f"{stored} was made with another embedder; not used for evaluation")
                return np.zeros((0, gallery.dim), np.float32), [], ""
            return z["embeddings"].astype(np.float32), [str(x) for x in z["labels"]], f"{version_dir.name}/{VAL_EMBEDDINGS}"
    return np.zeros((0, gallery.dim), np.float32), [], ""


def embed_val_dir(root: Path, gallery: Gallery, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """Embed a dataset folder's validation images (its ``split.json`` val part, else every image) with the gallery's embedder."""
    from ..data.layout import SPLIT_FILE, scan_dataset
    from ..imageio import load_image
    from ..recognition.embedder import build_embedder

    records = scan_dataset(root)
    split = root / SPLIT_FILE
    if split.is_file():
        val = set(read_json(split).get("val", []))
        records = [r for r in records if r.file_name in val] or records
    if not gallery.embedder_config:
        raise GalleryError(f"the live gallery stores no embedder config, so {root} cannot be embedded; "
                           "rebuild the gallery with gallery_cli or drop evaluation.val_dir")
    embedder = build_embedder(gallery.embedder_config)
    gallery.check_embedder(embedder.model_id, embedder.dim, "the live gallery")
    vecs = [embedder.embed([load_image(r.path(root)) for r in records[i : i + batch_size]])
            for i in range(0, len(records), batch_size)]
    return np.concatenate(vecs).astype(np.float32), [r.character for r in records]


# -- registry plumbing ----------------------------------------------------------------------------------
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


def copy_version_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Carry the live version's other files (model, tag profiles, calibration...) into the new one (hard links when possible)."""
    for p in src.iterdir():
        if p.name in skip or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
            continue
        link_or_copy(p, dst / p.name)  # version files are immutable (replaced by rename, never edited)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable fusion report."""
    m, bar = report["metrics"], report.get("unconfirmed_bar") or {}
    lines = [
        f"# Fusion report {report['time']}", "",
        f"- decision: **{report['decision']}** ({report['reason']})",
        f"- base version: `{report['base_version']}` -> new version: `{report.get('version_id') or '-'}`",
        f"- log records read: {report['records']} ({report['corrupt_records']} corrupt skipped)",
        f"- unconfirmed answers needed score >= {bar.get('min_confidence')} (feedback bar {bar.get('feedback_bar')} "
        f"from {bar.get('verdicts', 0)} verdicts)", "",
        "| metric | live | new |", "|---|---|---|",
        f"| validation top-1 ({m['val_n']} images, {m.get('val_source') or 'none'}) | {_fmt(m['val_before'])} | {_fmt(m['val_after'])} |",
        f"| held-back feedback top-1 ({m['holdout_n']}) | {_fmt(m['holdout_before'])} | {_fmt(m['holdout_after'])} |",
        "", "| character | corrected | confirmed | unconfirmed | total added |", "|---|---|---|---|---|",
    ]
    for c, d in sorted(report["added_per_character"].items()):
        lines.append(f"| {c} | {d.get('corrected', 0)} | {d.get('confirmed', 0)} | {d.get('unconfirmed', 0)} | {sum(d.values())} |")
    lines += ["", "Skipped: " + (", ".join(f"{k}={v}" for k, v in sorted(report["skipped"].items())) or "none")]
    return "\n".join(lines) + "\n"


def decide(metrics: Mapping[str, Any], n_added: int, tolerance: float, force: bool) -> tuple[bool, str]:
    """Register only when something was added and neither validation nor held-back feedback got worse."""
    if n_added == 0:
        return False, "no new examples passed the selection"
    if force:
        return True, "forced"
    worse = [name for name in ("val", "holdout")
             if metrics[f"{name}_before"] is not None and metrics[f"{name}_after"] < metrics[f"{name}_before"] - tolerance]
    if worse:
        return False, "new version is worse on " + " and ".join(worse)
    if metrics["val_before"] is None and metrics["holdout_before"] is None:
        return True, "no validation set or held-back feedback to compare on (added examples are trusted by policy)"
    return True, "not worse on " + " and ".join(n for n in ("val", "holdout") if metrics[f"{n}_before"] is not None)


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

        val_x, val_y, val_source = load_val_embeddings(base_dir, gallery, evaluation)
        ho_x = np.stack([e.embedding for e in holdout]) if holdout else np.zeros((0, gallery.dim), np.float32)
        ho_y = [e.character for e in holdout]
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
        finetune = run_finetune(cfg, registry, base_id, base_dir, chosen, holdout, log, output_dir)
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
            version_id = _write_version(registry, base_id, base_dir, gallery, val_x, val_y, report,
                                        bool(cfg.get("promote", True)), new_model)
            report["version_id"] = version_id
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(output_dir / REPORT_JSON, report)
            atomic_write_text(output_dir / REPORT_MD, render_markdown(report))
        _log.info(f"fusion: {report['decision']} ({reason}); added {len(chosen)} examples; version {version_id or '-'}")
        return FuseResult(version_id, report)


def run_finetune(cfg: Mapping[str, Any], registry: Registry, base_id: str, base_dir: Path, chosen: Sequence[Example],
                 holdout: Sequence[Example], log: FeatureLog, output_dir: Path | None) -> FinetuneOutcome | None:
    """Classifier fine-tuning on the logged uploads when ``finetune.enabled`` (None when off)."""
    policy = FinetunePolicy.from_mapping(cfg.get("finetune"))
    if not policy.enabled:
        return None
    manifest_path = base_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    work = (output_dir or registry.root / ".fusion-work") / "finetune"
    out = finetune_classifier(base_dir, manifest, chosen, holdout, log, policy, work, cfg.get("log"))
    _log.info(f"fusion fine-tune: {out.report['decision']} ({out.report.get('reason')})")
    return out


def keep_gallery_embedder(gallery: Gallery, base_dir: Path, staging: Path) -> None:
    """A gallery embedded by the live classifier keeps those weights as ``embedder.ckpt`` when model.ckpt is replaced."""
    ecfg = dict(gallery.embedder_config)
    if ecfg.get("kind") != "classifier":
        return
    current = Path(str(ecfg.get("ckpt_path") or MODEL_FILE))
    if not current.is_absolute():
        current = base_dir / current
    if not current.is_file():
        current = base_dir / MODEL_FILE  # what the recogniser falls back to
    target = staging / EMBEDDER_FILE
    if target.exists():
        target.unlink()
    link_or_copy(current, target)
    gallery.embedder_config = {**ecfg, "ckpt_path": EMBEDDER_FILE}


def _write_version(registry: Registry, base_id: str, base_dir: Path, gallery: Gallery, val_x: np.ndarray,
                   val_y: Sequence[str], report: dict, promote: bool, new_model: Path | None = None) -> str:
    """Stage the new version (gallery + carried files + reports + a fine-tuned model), then commit it atomically."""
    vid = registry.new_version_id(prefix=STAGING_PREFIX)
    staging = registry.staging_dir(vid)
    skip = {INDEX_FILE, META_FILE, "manifest.json", "parent", "metrics.json", REPORT_JSON, REPORT_MD, VAL_EMBEDDINGS}
    if new_model is not None:
        skip.add(MODEL_FILE)
    copy_version_files(base_dir, staging, skip)
    if new_model is not None:
        keep_gallery_embedder(gallery, base_dir, staging)
        shutil.copy2(new_model, staging / MODEL_FILE)
    gallery.save(staging)
    if len(val_y):
        with open(staging / VAL_EMBEDDINGS, "wb") as fh:  # carried forward so the next fusion can compare without images
            np.savez(fh, embeddings=val_x, labels=np.asarray(val_y), embedder=np.asarray(gallery.embedder_id))
    base_metrics = read_json(base_dir / "metrics.json") if (base_dir / "metrics.json").is_file() else {}
    m = report["metrics"]
    atomic_write_json(staging / "metrics.json", {**base_metrics, "gallery/val_top1": m["val_after"],
                                                 "gallery/holdout_top1": m["holdout_after"],
                                                 "fusion/added": sum(sum(d.values()) for d in report["added_per_character"].values()),
                                                 **_finetune_metrics(report.get("finetune") or {}, new_model)})
    report["version_id"] = vid
    atomic_write_json(staging / REPORT_JSON, report)
    atomic_write_text(staging / REPORT_MD, render_markdown(report))
    return registry.commit(staging, parent=base_id, kind="fusion", promote=promote,
                           extra={"fusion": {"added": report["added_per_character"], "reason": report["reason"]}})


def _finetune_metrics(ft: Mapping[str, Any], new_model: Path | None) -> dict[str, Any]:
    """``finetune/*`` entries of the new version's metrics.json (only when its model.ckpt is the fine-tuned one)."""
    if new_model is None:
        return {}
    return {f"finetune/{k}": v for k, v in (ft.get("metrics") or {}).items()}


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
