"""Judging a fused gallery against the live one: top-1 on validation embeddings and held-back feedback, regression pruning.

The validation set is `evaluation.val_dir` embedded with the gallery's own embedder, else the live
version's evaluation set (`recognition.evalset.EvalSet`, ``val_embeddings.npz``: carried forward and
extended with held-back feedback, so the next fusion can compare without images). An added example that steals a validation image the live version answered right is
dropped (`prune_regressions`), so the original domain does not regress.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..confutil import dataclass_from_mapping
from ..errors import ConfigError, GalleryError
from ..fsutil import read_json
from ..log import get_logger
from ..recognition.evalset import EvalSet
from ..recognition.gallery import Gallery
from ..versionfiles import VAL_EMBEDDINGS
from .selection import Example

_log = get_logger("system")


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


def top1_hits(gallery: Gallery, embeddings: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Per query: is the best gallery character the label."""
    if len(labels) == 0:
        return np.zeros(0, bool)
    return np.array([bool(h) and h[0][0] == y for h, y in zip(gallery.search(np.asarray(embeddings, np.float32), k=1), labels)])


def regression_culprits(gallery: Gallery, val_x: np.ndarray, val_y: Sequence[str], right_before: np.ndarray,
                        added: set[str]) -> set[str]:
    """Sources of added rows that win a validation image the live version answered right and the new one gets wrong.

    Such an example pulls another character's look into the wrong name (a mislabel, or a style
    shared by several characters); dropping it keeps the original domain from regressing. The
    culprits are the added rows among the rows the wrong character's score averages (its best
    `Gallery.depth` rows: one for `max`, three for `top3_mean`).
    """
    right_after = top1_hits(gallery, val_x, val_y)
    broken = np.flatnonzero(right_before & ~right_after)
    if len(broken) == 0 or gallery.index is None:
        return set()
    wrong = [gallery.search(val_x[i : i + 1], k=1)[0][0][0] for i in broken]
    fetch = min(len(gallery), max(32, 4 * max(gallery.depth(c) for c in set(wrong))))
    _, ids = gallery.index.search(np.ascontiguousarray(val_x[broken], dtype=np.float32), fetch)
    culprits: set[str] = set()
    for char, row_ids in zip(wrong, ids):
        left = gallery.depth(char)
        for rid in row_ids.tolist():
            row = gallery.rows.get(int(rid))
            if row is not None and row.character == char:
                if row.source in added:
                    culprits.add(row.source)
                left -= 1
                if left == 0:
                    break
    return culprits


def gallery_with(base_dir: Path, examples: Sequence[Example]) -> Gallery:
    """The live gallery plus `examples` (one call to `Gallery.add` per character); the live characters' `balanced` depths
    are fixed first, so a few feedback rows in a new style count among a character's best instead of deepening it."""
    gallery = Gallery.load(base_dir)
    gallery.fix_reference()
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
    return float(np.mean(top1_hits(gallery, embeddings, labels)))


# -- validation set -------------------------------------------------------------------------------------
def load_eval_set(version_dir: Path, gallery: Gallery, policy: EvalPolicy) -> tuple[EvalSet, str]:
    """The pictures to judge on: ``evaluation.val_dir`` (embedded now), else the live version's evaluation set."""
    if policy.val_dir:
        return embed_val_dir(Path(policy.val_dir), gallery, policy.batch_size), str(policy.val_dir)
    stored = EvalSet.load(version_dir)
    if stored is None or not len(stored):
        return EvalSet.empty(gallery.embedder_id), ""
    if stored.embedder_id != gallery.embedder_id:
        _log.warning(f"{version_dir / VAL_EMBEDDINGS} was made with another embedder; not used for evaluation")
        return EvalSet.empty(gallery.embedder_id), ""
    return stored, f"{version_dir.name}/{VAL_EMBEDDINGS}"


def embed_val_dir(root: Path, gallery: Gallery, batch_size: int) -> EvalSet:
    """Embed a dataset folder's validation images (its ``split.json`` val part, else every image) with the gallery's embedder."""
    from ..data.layout import SPLIT_FILE, scan_dataset
    from ..imageio import content_hash, load_image
    from ..recognition.embedder import build_embedder

    records = scan_dataset(root)
    split = root / SPLIT_FILE
    if split.is_file():
        val = set(read_json(split).get("val", []))
        records = [r for r in records if r.file_name in val] or records
    if not gallery.embedder_config:
        raise GalleryError(f"the live gallery stores no embedder config, so {root} cannot be embedded; "
                           "rebuild the gallery with ard-gallery build or drop evaluation.val_dir")
    embedder = build_embedder(gallery.embedder_config)
    gallery.check_embedder(embedder.model_id, embedder.dim, "the live gallery")
    vecs = [embedder.embed([load_image(r.path(root)) for r in records[i : i + batch_size]])
            for i in range(0, len(records), batch_size)]
    paths = [r.path(root) for r in records]
    return EvalSet(np.concatenate(vecs).astype(np.float32), [r.character for r in records], embedder.model_id,
                   sha256=[content_hash(p.read_bytes()) for p in paths], paths=[str(p.resolve()) for p in paths])


def holdout_eval_set(holdout: Sequence[Example], embedder_id: str) -> EvalSet:
    """Held-back feedback as evaluation pictures (their log record stands in for the picture)."""
    if not holdout:
        return EvalSet.empty(embedder_id)
    return EvalSet(np.stack([e.embedding for e in holdout]), [e.character for e in holdout], embedder_id,
                   sha256=[e.source for e in holdout], sources=["feedback"] * len(holdout))
