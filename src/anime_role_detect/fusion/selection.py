"""Which logged detections become gallery examples: trusted feedback, confident answers, near-duplicates out, caps.

What the seed got wrong (it averaged *every* unchecked log into the index): confirmed and corrected
detections always count; unconfirmed ones only when the answer was confident (score and margin over
the runner-up above thresholds, a bar the feedback itself can raise); only embeddings from the live
gallery's embedder; near-duplicates of gallery rows or of each other dropped; per-character caps.
A deterministic share of the feedback is held back for evaluation.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..confutil import dataclass_from_mapping
from ..recognition.gallery import Gallery
from ..recognition.schema import UNKNOWN
from .featurelog import LogRecord


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
class Example:
    """One logged detection chosen as a gallery example (or held back to evaluate on)."""

    character: str
    series: str
    embedding: np.ndarray
    kind: str  # corrected | confirmed | unconfirmed
    score: float
    source: str  # log:<record id>#<detection>


_KIND_PRIORITY = {"corrected": 0, "confirmed": 1, "unconfirmed": 2}


def is_holdout(split_key: str, fraction: float) -> bool:
    """Deterministic split of feedback examples by `split_key` (``"<image sha256>#<detection index>"``): the same
    picture is always held back for the gate (or never)."""
    h = int(hashlib.sha1(split_key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
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
                (holdout if is_holdout(split_key, holdout_fraction) else add).append(ex)
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
        nearest = gallery.nearest_rows(np.stack([e.embedding for e in ordered]), k=1)  # rows, not aggregate scores
    for ex, hit in zip(ordered, nearest if ordered else []):
        if hit and hit[0][0] == ex.character and hit[0][1] > policy.dedupe_cosine:
            dropped["near_duplicate_of_gallery"] += 1
            continue
        if kept_vecs[ex.character] and float(np.max(np.stack(kept_vecs[ex.character]) @ ex.embedding)) > policy.dedupe_cosine:
            dropped["near_duplicate_in_log"] += 1
            continue
        if ex.kind == "unconfirmed" and hit and hit[0][0] != ex.character and hit[0][1] > policy.dedupe_cosine:
            dropped["unconfirmed_conflicts_with_gallery"] += 1
            continue
        room = min(policy.max_added_per_character, policy.max_per_character - existing.get(ex.character, 0))
        if len(kept[ex.character]) >= room:
            dropped["per_character_cap"] += 1
            continue
        kept[ex.character].append(ex)
        kept_vecs[ex.character].append(ex.embedding)
    return [e for c in sorted(kept) for e in kept[c]], dropped
