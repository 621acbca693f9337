"""How a character's pictures become gallery rows (`PrototypeSpec`) and how its rows' scores become one score.

A gallery search scores rows; `AGGREGATES` name the rules that turn a character's row scores into its score
(the best row, the mean of its best three or five, or `balanced`: the same share of every character's rows).
`Gallery` owns the rows and applies the rule; the rules and their settings live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import faiss
import numpy as np

from ..errors import ConfigError


@dataclass
class PrototypeSpec:
    """How a character's images become gallery rows: ``all`` samples, ``kmeans`` centres (``k`` each) or one ``mean``."""

    method: str = "all"
    k: int = 8


def prototype_rows(vectors: np.ndarray, spec: PrototypeSpec, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A character's sample vectors -> its prototype rows and a label per row (which samples it stands for)."""
    if spec.method == "all" or len(vectors) <= 1:
        return vectors, [""] * len(vectors)
    if spec.method == "mean":
        m = vectors.mean(0, keepdims=True)
        return m / max(float(np.linalg.norm(m)), 1e-12), [f"mean of {len(vectors)}"]
    if spec.method == "kmeans":
        k = max(1, min(int(spec.k), len(vectors)))
        if k == len(vectors):
            return vectors, [""] * len(vectors)
        km = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(vectors, dtype=np.float32))
        _, assign = km.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        counts = np.bincount(assign[:, 0], minlength=k)
        keep = counts > 0
        c = km.centroids[keep]
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        return c.astype(np.float32), [f"kmeans centre of {n}" for n in counts[keep]]
    raise ConfigError(f"gallery.prototypes.method={spec.method!r}: choose all, kmeans or mean")


def topm_mean(scores: list[float], m: int = 3) -> float:
    """The mean of the `m` best scores (all of them when fewer)."""
    top = sorted(scores, reverse=True)[:m]
    return float(sum(top) / len(top))


#: `balanced`: the mean of a character's best ``max(1, round(3 n / n_ref))`` rows, ``n`` its row count and ``n_ref`` the
#: smallest character's when the gallery was built (`Gallery.reference_rows`). Every character is scored on the same
#: share of its rows, so one enrolled from 5 pictures is not outscored by the best of another's 300 rows; a gallery of
#: equal characters scores as `top3_mean` (docs/accuracy.md "Why an enrolled character is rarely named"). A character's
#: depth is fixed once the gallery is built (`Gallery.fix_reference`, which log fusion also calls before it adds): rows
#: added later, e.g. a few feedback pictures in a new style, are not averaged away among the old rows.
BALANCED = "balanced"
BALANCED_TOP = 3  # the smallest character's depth: `balanced` is `top3_mean` on a gallery of equal characters
#: What a gallery built from a config without `aggregate` uses: `balanced` named more pictures right than `top3_mean` on
#: newgame_full (79.7 vs 77.2) and enrolled unseen characters far better (56.5 vs 38.9), the other sets within a picture
#: (docs/accuracy.md "`balanced` as the default"). Files without one load as `max`, as they were built.
DEFAULT_AGGREGATE = BALANCED
#: How many of a character's best rows each aggregate averages (`balanced`: per character, `Gallery.depth`).
AGGREGATE_DEPTH: dict[str, int] = {"max": 1, "top3_mean": 3, "top5_mean": 5}
AGGREGATES = (*AGGREGATE_DEPTH, BALANCED)
#: Row scores of one character -> its score (the fixed-depth aggregates: the mean of its best `AGGREGATE_DEPTH` rows).
AGGREGATORS: dict[str, Callable[[list[float]], float]] = {name: partial(topm_mean, m=d) for name, d in AGGREGATE_DEPTH.items()}
