"""The trained characters' gallery rows in a within-character whitened space: fusion's judge among trained characters.

A fine-tuned network's embedding of a trained character still varies along directions shared by every character
(pose, framing, background), and a look-alike's rows can sit nearer a picture than its own along them. Whitening by
the trained characters' within-character covariance (``x -> M x``, ``M = (S_w + shrinkage I)^-1/2`` with ``S_w``
scaled to a mean eigenvalue of 1; speaker recognition's WCCN) shrinks those directions, so the rows of one character
gather and a picture is compared on what tells characters apart. Scored like the gallery (the mean of a character's
best rows, as many as `Gallery.depth`), it named more set-aside pictures than the raw gallery on every real set, and
as many as the classifier or more (docs/accuracy.md "The whitened gallery as fusion's judge of trained characters").

It judges only the characters it was fitted on. A character enrolled later would be compared along directions fitted
to others, and the space scatters its rows: 5-shot enrolment fell from 46 to 14-24% on `newgame_full` when the whole
gallery was whitened. So the version's gallery stays raw (enrolment, the open-set gate and clip mode use it), and
fusion takes this judge in place of the classifier only while every gallery character is a trained one
(`Recognizer._trained_probabilities`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import GalleryError, reading_file
from ..fsutil import atomic_write_npz
from ..versionfiles import WHITENED_GALLERY
from .aggregate import BALANCED_TOP
from .gallery import COPY_COSINE  # a query's own row (or a byte-identical copy): left out when scored against itself

#: ``S_w`` (scaled to a mean eigenvalue of 1) + this x I before the inverse square root: 1 named the most set-aside
#: pictures of 0.1 / 0.3 / 1 / 3 on the four real sets (docs/accuracy.md); 0 would blow up directions no row varies in.
DEFAULT_SHRINKAGE = 1.0
#: Above this many trained rows no whitened gallery is built (it is a copy of them, float16): fusion uses the classifier.
MAX_ROWS = 50_000


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_whitening(vectors: np.ndarray, characters: Sequence[str], shrinkage: float = DEFAULT_SHRINKAGE) -> np.ndarray:
    """``[D, D]`` matrix ``(S_w / mean eigenvalue + shrinkage I)^-1/2`` of the rows' within-character covariance ``S_w``.

    Pass each picture filed under one character only: a group picture filed under two would count the difference
    between those characters as variation within each (on `newgame_full`, whose rows are 43% such copies, the fit
    then shrank the directions that separate its characters and named 35% of pictures instead of 85%)."""
    x = np.asarray(vectors, np.float64)
    labels = np.asarray(list(characters))
    if len(x) != len(labels):
        raise GalleryError(f"{len(x)} vectors but {len(labels)} character names; give one name per vector")
    names, counts = np.unique(labels, return_counts=True)
    if (counts >= 2).sum() < 2:
        raise GalleryError("whitening needs 2 or more characters with 2 or more pictures each")
    resid = np.empty_like(x)
    for name in names:
        m = labels == name
        resid[m] = x[m] - x[m].mean(0)
    sw = resid.T @ resid / len(x)
    scale = float(np.trace(sw)) / len(sw)
    if not scale > 0.0:
        raise GalleryError("the pictures of each character are identical: there is no within-character variation to whiten")
    ev, vecs = np.linalg.eigh(sw / scale + float(shrinkage) * np.eye(len(sw)))
    return ((vecs / np.sqrt(np.maximum(ev, 1e-12))) @ vecs.T).astype(np.float32)


@dataclass
class WhitenedGallery:
    """Whitened unit rows of the trained characters, each character scored as the gallery scores it: the mean of its
    best `depths` rows (`Gallery.depth`, fixed when the gallery was built)."""

    matrix: np.ndarray  # [D, D], symmetric: x -> x @ matrix
    rows: np.ndarray  # [N, D] whitened unit rows
    owners: np.ndarray  # [N] index into `names`
    names: list[str]
    depths: np.ndarray  # [C] rows averaged per character
    shrinkage: float = DEFAULT_SHRINKAGE
    _order: np.ndarray = field(init=False, repr=False)
    _bounds: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = np.ascontiguousarray(self.rows, np.float32)
        self.owners = np.asarray(self.owners, np.int64)
        self.depths = np.maximum(np.asarray(self.depths, np.int64), 1)
        self._order = np.argsort(self.owners, kind="stable")
        self._bounds = np.searchsorted(self.owners[self._order], np.arange(len(self.names) + 1))

    @classmethod
    def fit(cls, vectors: np.ndarray, characters: Sequence[str], single: Sequence[bool] | None = None,
            depths: Mapping[str, int] | None = None, shrinkage: float = DEFAULT_SHRINKAGE) -> "WhitenedGallery":
        """From raw gallery rows and their characters; `single` marks the rows whose picture is filed under one character
        (the covariance is fitted on those; every row is kept); `depths` per character (default `BALANCED_TOP`)."""
        chars = list(characters)
        keep = np.ones(len(chars), bool) if single is None else np.asarray(single, bool)
        matrix = fit_whitening(np.asarray(vectors)[keep], [c for c, k in zip(chars, keep) if k], shrinkage)
        names = sorted(set(chars))
        owners = np.searchsorted(np.array(names), np.array(chars)).astype(np.int64)
        d = np.array([int((depths or {}).get(n, BALANCED_TOP)) for n in names])
        return cls(matrix, _unit(np.asarray(vectors, np.float32) @ matrix), owners, names, d, float(shrinkage))

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Raw embeddings -> whitened unit vectors."""
        return _unit(np.asarray(vectors, np.float32) @ self.matrix)

    def scores(self, embeddings: np.ndarray, leave_out_copies: bool = False) -> np.ndarray:
        """``[N, C]`` per-character scores (columns: `names`) of raw `embeddings`. `leave_out_copies` drops each
        query's rows at cosine >= `COPY_COSINE` (itself, when it is one of the rows)."""
        sims = self.transform(embeddings) @ self.rows[self._order].T
        if leave_out_copies:
            sims[sims >= COPY_COSINE] = -np.inf
        out = np.full((len(sims), len(self.names)), -1.0, np.float32)
        for i in range(len(self.names)):
            part = sims[:, self._bounds[i] : self._bounds[i + 1]]
            if part.shape[1]:
                d = min(int(self.depths[i]), part.shape[1])
                best = -np.partition(-part, d - 1, axis=1)[:, :d]
                best = np.where(np.isfinite(best), best, np.nan)
                with np.errstate(all="ignore"):
                    mean = np.nanmean(best, axis=1)
                out[:, i] = np.where(np.isnan(mean), -1.0, mean)
        return out

    def _laid_out(self, matrix: np.ndarray, names: Sequence[str], fill: float) -> np.ndarray:
        """``[N, C]`` columns of `names` -> ``[N, len(names)]`` in the order of `names`, `fill` for a name it lacks."""
        col = {n: i for i, n in enumerate(self.names)}
        out = np.full((len(matrix), len(names)), fill, matrix.dtype)
        for j, n in enumerate(names):
            if n in col:
                out[:, j] = matrix[:, col[n]]
        return out

    def scores_for(self, embeddings: np.ndarray, names: Sequence[str], leave_out_copies: bool = False) -> np.ndarray:
        """`scores` laid out as `names` (-1 for a name it was not fitted on): what a temperature is fitted on."""
        return self._laid_out(self.scores(embeddings, leave_out_copies), names, -1.0)

    def probabilities(self, embeddings: np.ndarray, names: Sequence[str], temperature: float,
                      leave_out_copies: bool = False) -> np.ndarray:
        """``[N, len(names)]``: softmax(scores / temperature) over its characters, laid out as `names` (0 for a name it
        was not fitted on)."""
        s = self.scores(embeddings, leave_out_copies).astype(np.float64) / float(temperature)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return self._laid_out(p, names, 0.0)

    # -- files -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """``<directory>/whitened_gallery.npz``, written atomically (rows in float16)."""
        target = Path(directory) / WHITENED_GALLERY
        atomic_write_npz(target, matrix=self.matrix.astype(np.float32), rows=self.rows.astype(np.float16),
                         owners=self.owners.astype(np.int32), names=np.array(self.names, dtype=str),
                         depths=self.depths.astype(np.int32), shrinkage=np.array(self.shrinkage))
        return target

    @classmethod
    def load(cls, directory: str | Path) -> "WhitenedGallery | None":
        """The version's whitened gallery, or None when it has none (versions built before 2026-12-07)."""
        path = Path(directory) / WHITENED_GALLERY
        if not path.is_file():
            return None
        with reading_file(path, "whitened gallery", "rebuild the version", "rebuild the version (or delete the file: fusion then uses the classifier)"):
            with np.load(path) as z:
                return cls(z["matrix"], z["rows"].astype(np.float32), z["owners"], [str(n) for n in z["names"]], z["depths"],
                           float(z["shrinkage"]))
