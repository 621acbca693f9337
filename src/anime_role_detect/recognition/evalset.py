"""A version's evaluation set: the held-out pictures it is judged on, and the figures it scores there.

Stored in the version folder as ``val_embeddings.npz``: per picture its embedding under the version's
embedder, its label, its content hash, where the picture lives and where it came from (``val`` split,
``feedback``, ``enrol``). Versions derived from another inherit and extend it, so fusion and the workflow
always have something to compare a candidate with the live version on, and ``registry compare`` can put
any two versions side by side on the same pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..data.layout import characters_per_key
from ..errors import GalleryError
from ..fsutil import atomic_write_npz
from ..versionfiles import CALIBRATION, VAL_EMBEDDINGS


@dataclass
class EvalSet:
    """Held-out pictures of known characters with their embeddings under one embedder."""

    embeddings: np.ndarray
    labels: list[str]
    embedder_id: str
    sha256: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.labels)
        self.embeddings = np.asarray(self.embeddings, np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
        self.sha256 = list(self.sha256) or [""] * n
        self.paths = list(self.paths) or [""] * n
        self.sources = list(self.sources) or ["val"] * n
        if not (len(self.sha256) == len(self.paths) == len(self.sources) == n):
            raise ValueError("evaluation set columns differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def characters(self) -> list[str]:
        return sorted(set(self.labels))

    @classmethod
    def empty(cls, embedder_id: str = "") -> "EvalSet":
        return cls(np.zeros((0, 0), np.float32), [], embedder_id)

    def subset(self, keep: Sequence[int] | np.ndarray) -> "EvalSet":
        idx = [int(i) for i in keep]
        return EvalSet(self.embeddings[idx] if idx else np.zeros((0, 0), np.float32), [self.labels[i] for i in idx], self.embedder_id,
                       [self.sha256[i] for i in idx], [self.paths[i] for i in idx], [self.sources[i] for i in idx])

    def only(self, characters: Iterable[str]) -> "EvalSet":
        """The pictures of `characters` only (e.g. those two versions both know)."""
        wanted = set(characters)
        return self.subset([i for i, y in enumerate(self.labels) if y in wanted])

    def extend(self, other: "EvalSet") -> "EvalSet":
        """This set plus `other`'s pictures not already in it (same content hash and label); embedders must match."""
        if not len(other):
            return self
        if len(self) and other.embedder_id != self.embedder_id:
            raise GalleryError(f"evaluation sets of two embedders ({self.embedder_id} vs {other.embedder_id}) cannot be merged; re-embed one")
        seen = {(h, y) for h, y in zip(self.sha256, self.labels) if h}
        new = [i for i, (h, y) in enumerate(zip(other.sha256, other.labels)) if not h or (h, y) not in seen]
        add = other.subset(new)
        if not len(add):
            return self
        if not len(self):
            return EvalSet(add.embeddings, add.labels, other.embedder_id, add.sha256, add.paths, add.sources)
        return EvalSet(np.concatenate([self.embeddings, add.embeddings]), self.labels + add.labels, self.embedder_id,
                       self.sha256 + add.sha256, self.paths + add.paths, self.sources + add.sources)

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/val_embeddings.npz`` atomically."""
        target = Path(directory) / VAL_EMBEDDINGS
        atomic_write_npz(target, embeddings=self.embeddings.astype(np.float32), labels=np.array(self.labels, dtype=str),
                         embedder=np.array(self.embedder_id), sha256=np.array(self.sha256, dtype=str),
                         paths=np.array(self.paths, dtype=str), sources=np.array(self.sources, dtype=str))
        return target

    @classmethod
    def load(cls, directory: str | Path) -> "EvalSet | None":
        """The version's evaluation set, or None when it has none."""
        path = Path(directory) / VAL_EMBEDDINGS
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                labels = [str(x) for x in z["labels"]]
                cols = {k: [str(x) for x in z[k]] for k in ("sha256", "paths", "sources") if k in z.files}
                return cls(z["embeddings"].astype(np.float32), labels, str(z["embedder"]), **cols)
        except (OSError, ValueError, KeyError) as exc:
            raise GalleryError(f"evaluation set {path} is unreadable ({exc}); rebuild the version or delete the file") from None


def gallery_scores(gallery: Any, embeddings: np.ndarray) -> list[tuple[str, float]]:
    """Best character and its score per query (``("", 0.0)`` for an empty gallery)."""
    if not len(embeddings):
        return []
    hits = gallery.search(np.asarray(embeddings, np.float32), k=1)
    return [(h[0][0], float(h[0][2])) if h else ("", 0.0) for h in hits]


def score_answers(labels: Sequence[str], answers: Sequence[tuple[str, float]], threshold: float | None = None,
                  sha256: Sequence[str] | None = None) -> dict[str, Any]:
    """top-1, per-character top-1 and open-set false rejects (known pictures scored below `threshold`). With the
    pictures' `sha256`, an answer naming any character a picture's copies are filed under is right (a group picture's
    copies carry one hash and several labels: `data.layout.characters_per_key`)."""
    n = len(labels)
    if not n:
        return {"n": 0, "top1": None, "per_character": {}, "false_reject": None}
    filed = characters_per_key(labels, sha256) if sha256 is not None else [frozenset((y,)) for y in labels]
    right = np.array([a in f for (a, _), f in zip(answers, filed)])
    per: dict[str, list[bool]] = {}
    for y, r in zip(labels, right):
        per.setdefault(y, []).append(bool(r))
    rejected = np.array([s < threshold for _, s in answers]) if threshold is not None else np.zeros(n, bool)
    return {"n": n, "top1": round(float(right.mean()), 4),
            "per_character": {c: round(float(np.mean(v)), 4) for c, v in sorted(per.items())},
            "false_reject": round(float(rejected.mean()), 4) if threshold is not None else None,
            "top1_open_set": round(float((right & ~rejected).mean()), 4)}


def score_gallery(gallery: Any, evalset: EvalSet, threshold: float | None = None) -> dict[str, Any]:
    """Clip-mode figures of `gallery` on `evalset` (embedded with the gallery's embedder)."""
    if len(evalset) and evalset.embedder_id != gallery.embedder_id:
        raise GalleryError(f"the evaluation set was embedded by {evalset.embedder_id}, the gallery by {gallery.embedder_id}; "
                           "re-embed its pictures with the gallery's embedder")
    return score_answers(evalset.labels, gallery_scores(gallery, evalset.embeddings), threshold, evalset.sha256)


def pictures(*sets: EvalSet | None) -> list[tuple[str, str, str]]:
    """``(path, label, sha256)`` of every picture of `sets` that still exists on disk, each once."""
    out: dict[tuple[str, str], tuple[str, str, str]] = {}
    for s in sets:
        if s is None:
            continue
        for p, y, h in zip(s.paths, s.labels, s.sha256):
            if p and Path(p).is_file():
                out.setdefault((h or p, y), (p, y, h))
    return sorted(out.values())


def score_recognizer(recognizer: Any, items: Sequence[tuple[str, str, str]], modes: Sequence[str], batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Figures of `recognizer` in each of `modes` on pictures ``(path, label, sha)``: what a user gets, open-set included."""
    from ..imageio import load_image

    images = [(load_image(p), y) for p, y, _ in items]
    out = {}
    for mode in modes:
        answers: list[tuple[str, float]] = []
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            got = recognizer.recognize_batch([(img, f"eval{i + j}") for j, (img, _) in enumerate(batch)], mode=mode)
            answers += [(a.role, a.similarity) for a in got]
        labels = [y for _, y in images]
        res = score_answers(labels, answers, sha256=[h for _, _, h in items])
        res["false_reject"] = round(float(np.mean([a == "unknown" for a, _ in answers])), 4) if answers else None
        out[mode] = res
    return out


def supported_modes(version_dir: str | Path) -> list[str]:
    """The recognition modes a version folder can serve (clip needs a gallery, model a classifier, fusion both)."""
    from ..versionfiles import GALLERY_META, MODEL
    from .config import modes_for

    d = Path(version_dir)
    return modes_for((d / GALLERY_META).is_file(), (d / MODEL).is_file())


#: order of `best_mode`: the mode that uses the most evidence first
MODE_PREFERENCE = ("fusion", "model", "clip")


def noise_margin(p: float, pictures: int | None) -> float:
    """How far a top-1 must rise above `p`, measured on `pictures` pictures, to be more than noise: two binomial
    standard errors and more than one picture (0 when the count is unknown)."""
    if not pictures:
        return 0.0
    return max(2.0 * math.sqrt(max(p, 0.0) * max(1.0 - p, 0.0) / pictures), 1.5 / pictures)


def best_mode(modes: Sequence[str], top1: Mapping[str, float] | None, rerank: bool, pictures: int | None = None) -> str:
    """The mode `auto` answers in: fusion > model > clip (the first that `modes` has), unless a later one measured a
    better top-1 on the version's evaluation set (with reranking when it is on and was measured).

    With the set's size (`pictures`), "better" must be more than noise: above the preferred mode's figure by two
    binomial standard errors and by at least two pictures. On 40-50 held-out pictures one picture decided, and on
    pictures set aside from the version (benchmarks/accuracy.py) fusion was then as good as the best mode in every
    run while the strict maximum had chosen a mode up to 5.6 points worse."""
    ranked = [m for m in MODE_PREFERENCE if m in modes]
    if not ranked:
        return "clip"
    figures = dict(top1 or {})

    def score(m: str) -> float:
        return float(figures.get(f"{m}+rerank", figures.get(m, -1.0)) if rerank else figures.get(m, -1.0))

    chosen = ranked[0]
    for m in ranked[1:]:
        if score(m) > score(chosen) + noise_margin(score(chosen), pictures):
            chosen = m
    return chosen


def compare_versions(dir_a: str | Path, dir_b: str | Path, recognizer_cfg: Any = None) -> dict[str, Any]:
    """Both versions on the same pictures: the union of their evaluation sets, per mode they both support.

    With the pictures on disk every mode runs end to end through each version's `Recognizer`; without
    them, clip mode is scored on the stored embeddings when both galleries use the set's embedder.
    """
    from .gallery import Gallery
    from .openset import OpenSetCalibration
    from .pipeline import Recognizer

    a, b = Path(dir_a), Path(dir_b)
    sets = [EvalSet.load(a), EvalSet.load(b)]
    if not any(s is not None and len(s) for s in sets):
        raise GalleryError(f"neither {a.name} nor {b.name} carries an evaluation set ({VAL_EMBEDDINGS}); "
                           "versions made by train.py register=true, the workflow, enrolment or fusion carry one")
    items = pictures(*sets)
    modes = [m for m in supported_modes(a) if m in supported_modes(b)]
    report: dict[str, Any] = {"a": a.name, "b": b.name, "modes": modes, "pictures": len(items), "by": "images"}
    cfg = {"cache_size": 0, "rerank": True, **dict(recognizer_cfg or {})}
    if items:
        for key, d in (("a", a), ("b", b)):
            report[key + "_scores"] = score_recognizer(Recognizer.from_version(d, cfg), items, modes)
        return report
    base = next(s for s in sets if s is not None and len(s))
    report.update(by="stored embeddings", pictures=len(base), modes=["clip"])
    for key, d in (("a", a), ("b", b)):
        calib = OpenSetCalibration.load(d) if (d / CALIBRATION).is_file() else None
        report[key + "_scores"] = {"clip": score_gallery(Gallery.load(d), base, calib.threshold("clip") if calib else None)}
    return report


@dataclass
class Verdict:
    """Whether a candidate version may replace the live one, and the figures that decided it."""

    promote: bool
    reason: str
    mode: str | None = None
    characters: list[str] = field(default_factory=list)
    pictures: int = 0
    candidate: dict[str, Any] | None = None
    live: dict[str, Any] | None = None
    margin: float = 0.0
    live_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def known_characters(version_dir: str | Path) -> set[str]:
    """Characters a version folder can name: its gallery's, else its classifier's classes."""
    from .pipeline import Recognizer

    return {c["name"] for c in Recognizer.from_version(version_dir).characters()}


def judge(candidate_dir: str | Path, live_dir: str | Path | None, margin: float = 0.0, mode: str | None = None,
          recognizer_cfg: Any = None, candidate_set: EvalSet | None = None) -> Verdict:
    """Compare a candidate with the live version on the pictures of the characters both know (both versions'
    evaluation sets), end to end in `mode` (default: the recognizer's default mode, else one both support).

    Promote when the candidate's top-1 is not below the live one's by more than `margin`. With a live
    version but no picture to compare on, the verdict is *not* to promote, saying why.
    """
    from .config import RecognizerConfig
    from .pipeline import Recognizer

    if live_dir is None:
        return Verdict(True, "no live version yet")
    cand, live = Path(candidate_dir), Path(live_dir)
    shared = sorted(known_characters(cand) & known_characters(live))
    if not shared:
        return Verdict(True, "no character in common with the live version: nothing it could get worse at", live_id=live.name)
    sets = [EvalSet.load(live), candidate_set if candidate_set is not None else EvalSet.load(cand)]
    items = [it for it in pictures(*sets) if it[1] in set(shared)]
    if not items:
        return Verdict(False, f"nothing to compare on: neither version has pictures of {', '.join(shared[:5])} in its evaluation set; "
                              "make it live with promote=always (or `registry promote ID`)", characters=shared, live_id=live.name)
    common = [m for m in supported_modes(cand) if m in supported_modes(live)]
    wanted = mode or RecognizerConfig().mode
    if wanted == "auto":  # compare in the mode the candidate would answer in, if the live version has it too
        wanted = Recognizer.from_version(cand, {"cache_size": 0, **dict(recognizer_cfg or {})}).mode
    use = wanted if wanted in common else (common[0] if common else None)
    if use is None:
        return Verdict(False, "the two versions share no recognition mode to compare in", characters=shared, live_id=live.name)
    cfg = {"cache_size": 0, **dict(recognizer_cfg or {})}
    c_scores = score_recognizer(Recognizer.from_version(cand, cfg), items, [use])[use]
    l_scores = score_recognizer(Recognizer.from_version(live, cfg), items, [use])[use]
    ok = c_scores["top1"] >= l_scores["top1"] - margin
    reason = (f"{use} top-1 on {len(items)} pictures of {len(shared)} shared characters: candidate {100 * c_scores['top1']:.1f}% "
              f"vs live {100 * l_scores['top1']:.1f}% ({'not worse' if ok else 'worse'} than the live version by the margin {margin})")
    return Verdict(ok, reason, use, shared, len(items), c_scores, l_scores, margin, live.name)
