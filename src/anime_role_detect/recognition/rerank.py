"""Tag-assisted reranking: character tag profiles from training tags, a naive-Bayes score from the image's tags.

Profile: ``p(tag | character)`` and ``p(tag)`` (Laplace-smoothed) from the training metadata. For an
image with tag probabilities ``s_t`` a candidate gets the log-likelihood ratio
``sum_t s_t log(p_ct / p_t) + (1 - s_t) log((1 - p_ct) / (1 - p_t))`` over the profile tags the tagger
knows: presence *and* absence count, so near-twins that differ only in glasses or eye colour
separate. A probability (model and fusion modes, `PROBABILITY_MODES`) is multiplied by ``exp(weight * LLR_c)``, as
Bayes' rule weighs evidence, and the candidates renormalised to the mass they held, so the answer's similarity stays a
probability; a cosine (clip mode) orders the candidates by ``cosine + weight * (LLR_c - mean LLR)`` and each keeps its
own cosine. Before, every mode added the shift to the score and clipped it at 1, and on a tagged version nearly every
answer read 1.0 (docs/recognition.md "Reranking on near-twins"). The weight is tuned per mode on validation data
(`tune_weight`). Saved as ``tag_profiles.json``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GalleryError, reading_file
from ..fsutil import atomic_write_json, read_json
from .evalset import noise_margin
from ..versionfiles import TAG_PROFILES as PROFILE_FILE
from .schema import Rerank

Candidate = tuple[str, str, float]  # (character, series, score)

#: modes whose candidate scores are probabilities: tag evidence multiplies them (the log scale). A profile file
#: written before this rule (no ``log_modes`` in it) keeps the additive rule in every mode, as the weights it was
#: tuned with expect.
PROBABILITY_MODES: frozenset[str] = frozenset({"model", "fusion"})


@dataclass
class RerankResult:
    """Reordered candidates plus what reranking did."""

    candidates: list[Candidate]
    info: Rerank


class TagReranker:
    """Per-character tag probabilities and the weight that turns tag evidence into a score change."""

    def __init__(self, tags: Sequence[str], characters: Sequence[str], p_tag_given_char: np.ndarray, p_tag: np.ndarray,
                 weight: float = 0.02, min_evidence: float = 0.05, mode_weights: dict[str, float] | None = None,
                 log_modes: Sequence[str] = PROBABILITY_MODES) -> None:
        self.tags = list(tags)
        self.characters = list(characters)
        self.char_index = {c: i for i, c in enumerate(self.characters)}
        p_ct = np.clip(np.asarray(p_tag_given_char, np.float64), 1e-4, 1 - 1e-4)
        p_t = np.clip(np.asarray(p_tag, np.float64), 1e-4, 1 - 1e-4)
        self.p_ct, self.p_t = p_ct, p_t
        self.w_present = np.log(p_ct / p_t)  # [C, T]
        self.w_absent = np.log((1 - p_ct) / (1 - p_t))
        self.weight = float(weight)
        self.mode_weights = {k: float(v) for k, v in (mode_weights or {}).items()}  # tuned per mode (scores differ in scale)
        self.log_modes = frozenset(log_modes)  # modes reranked on the log scale (`PROBABILITY_MODES`)
        self.min_evidence = float(min_evidence)
        self.noise: dict[str, np.ndarray] | None = None  # tagger noise model per tag (fit_tagger_noise)
        self.noise_tagger_id = ""

    def weight_for(self, mode: str) -> float:
        """The tuned weight for `mode`, else that mode's default."""
        if mode in self.mode_weights:
            return self.mode_weights[mode]
        return DEFAULT_LOG_WEIGHT if mode in self.log_modes else DEFAULT_WEIGHTS.get(mode, self.weight)

    # -- learning -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, records: Sequence, smoothing: float = 1.0, min_tag_count: int = 2, weight: float = 0.02,
            ignore: Sequence[str] = ("1girl", "1boy", "solo")) -> "TagReranker":
        """Profiles from records with ``.character`` and ``.tags`` (the dataset metadata)."""
        per_char: dict[str, Counter] = defaultdict(Counter)
        n_char: Counter = Counter()
        tag_count: Counter = Counter()
        for r in records:
            n_char[r.character] += 1
            tags = set(r.tags) - set(ignore)
            per_char[r.character].update(tags)
            tag_count.update(tags)
        tags = sorted(t for t, c in tag_count.items() if c >= min_tag_count)
        if not tags:
            raise GalleryError("no tags in the training metadata (metadata.jsonl 'tags'); tag profiles need tagged images, or set rerank=false")
        chars = sorted(n_char)
        a = float(smoothing)
        p_ct = np.array([[(per_char[c][t] + a) / (n_char[c] + 2 * a) for t in tags] for c in chars])
        n = sum(n_char.values())
        p_t = np.array([(tag_count[t] + a) / (n + 2 * a) for t in tags])
        return cls(tags, chars, p_ct, p_t, weight=weight)

    # -- scoring ------------------------------------------------------------------------------
    def tag_columns(self, tagger_tags: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Indices (profile, tagger) of the tags both know."""
        pos = {t: i for i, t in enumerate(tagger_tags)}
        pairs = [(i, pos[t]) for i, t in enumerate(self.tags) if t in pos]
        if not pairs:
            return np.zeros(0, int), np.zeros(0, int)
        a, b = zip(*pairs)
        return np.array(a), np.array(b)

    def fit_tagger_noise(self, tag_probs: np.ndarray, truth: np.ndarray, min_examples: int = 3, tagger_id: str = "") -> int:
        """Learn how the tagger's scores behave when a tag is really present/absent (validation images + their metadata tags).

        Scores are modelled as Gaussians on the logit scale per tag and class; a tag the tagger cannot
        see (same distribution either way) then contributes nothing, instead of noise. Tags with fewer
        than `min_examples` positives or negatives are switched off. Returns how many tags stay usable.
        """
        x = _logit(np.asarray(tag_probs, np.float64))
        truth = np.asarray(truth, bool)
        known = ~np.isnan(x)
        mu1, sd1, mu0, sd0 = (np.zeros(len(self.tags)) for _ in range(4))
        usable = np.zeros(len(self.tags), bool)
        for t in range(len(self.tags)):
            pos, neg = x[known[:, t] & truth[:, t], t], x[known[:, t] & ~truth[:, t], t]
            if len(pos) < min_examples or len(neg) < min_examples:
                continue
            usable[t] = True
            mu1[t], mu0[t] = pos.mean(), neg.mean()
            pooled = np.sqrt((pos.var() * len(pos) + neg.var() * len(neg)) / (len(pos) + len(neg)))
            sd1[t] = sd0[t] = max(float(pooled), 0.25)  # shared spread: a likelihood ratio that is monotone in the score
        self.noise = {"mu1": mu1, "sd1": sd1, "mu0": mu0, "sd0": sd0, "usable": usable}
        self.noise_tagger_id = tagger_id
        return int(usable.sum())

    def use_tagger(self, tagger_id: str) -> bool:
        """Keep the noise model only if it was learned for this tagger; returns whether it is kept."""
        if self.noise is not None and self.noise_tagger_id and self.noise_tagger_id != tagger_id:
            self.noise = None
        return self.noise is not None

    def contributions(self, character: str, tag_probs: np.ndarray) -> np.ndarray:
        """Per-profile-tag log-likelihood-ratio terms for `character` (zeros if it has no profile)."""
        ci = self.char_index.get(character)
        if ci is None:
            return np.zeros(len(self.tags))
        s = np.asarray(tag_probs, np.float64)
        if self.noise is None:  # tagger scores taken as calibrated probabilities
            return s * self.w_present[ci] + (1 - s) * self.w_absent[ci]
        n = self.noise
        x = _logit(s)
        l1 = -0.5 * ((x - n["mu1"]) / np.where(n["usable"], n["sd1"], 1.0)) ** 2 - np.log(np.where(n["usable"], n["sd1"], 1.0))
        l0 = -0.5 * ((x - n["mu0"]) / np.where(n["usable"], n["sd0"], 1.0)) ** 2 - np.log(np.where(n["usable"], n["sd0"], 1.0))
        p_ct, p_t = self.p_ct[ci], self.p_t
        ll_c = np.logaddexp(np.log(p_ct) + l1, np.log1p(-p_ct) + l0)
        ll_ref = np.logaddexp(np.log(p_t) + l1, np.log1p(-p_t) + l0)
        return np.where(n["usable"], ll_c - ll_ref, 0.0)

    def rerank(self, candidates: Sequence[Candidate], tag_probs: np.ndarray, weight: float | None = None, max_tags: int = 5,
               mode: str | None = None) -> RerankResult:
        """Reorder `candidates` with tag evidence; `tag_probs` are aligned with ``self.tags`` (NaN = tag unknown to the
        tagger). `mode` picks the scale (multiplied for `log_modes`, added otherwise) and, without `weight`, its weight."""
        w = (self.weight if mode is None else self.weight_for(mode)) if weight is None else float(weight)
        if not candidates:
            return RerankResult([], Rerank())
        s = np.asarray(tag_probs, np.float64)
        known = ~np.isnan(s)
        s = np.where(known, s, 0.5)
        contrib = [self.contributions(c, s) * known for c, _, _ in candidates]
        has_profile = [c in self.char_index for c, _, _ in candidates]
        llr = np.array([x.sum() for x in contrib])
        ref = float(llr[has_profile].mean()) if any(has_profile) else 0.0
        shift = np.where(has_profile, w * (llr - ref), 0.0)
        scores = np.array([sc for _, _, sc in candidates], np.float64)
        log_scale = mode in self.log_modes
        ranked = _evidence_times(scores, shift) if log_scale else scores + shift
        adj = ranked - scores
        # a probability is reported as moved (still a probability); a cosine stays the candidate's own cosine, the
        # order alone saying what the tags did (a shifted cosine ran past 1 and every answer read 1.0)
        new = [(c, se, float(v)) for (c, se, _), v in zip(candidates, ranked if log_scale else scores)]
        order = sorted(range(len(new)), key=lambda i: -ranked[i])
        top, old_top = order[0], 0
        rival = old_top if top != old_top else (order[1] if len(order) > 1 else top)
        diff = contrib[top] - contrib[rival]
        moved = [i for i in np.argsort(-diff) if diff[i] > self.min_evidence][:max_tags]
        used = [self.tags[i] if s[i] >= 0.5 else f"-{self.tags[i]}" for i in moved]
        info = Rerank(tags_used=used, delta=round(float(adj[top]), 4), changed=top != old_top)
        return RerankResult([(c, se, float(np.clip(sc, 0.0, 1.0))) for c, se, sc in (new[i] for i in order)], info)

    def align(self, tag_probs: np.ndarray, tagger_tags: Sequence[str]) -> np.ndarray:
        """Tagger outputs ``[N, T_tagger]`` -> ``[N, T_profile]`` (NaN where the tagger lacks a profile tag)."""
        tag_probs = np.atleast_2d(tag_probs)
        out = np.full((len(tag_probs), len(self.tags)), np.nan, np.float64)
        a, b = self.tag_columns(tagger_tags)
        if len(a):
            out[:, a] = tag_probs[:, b]
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``tag_profiles.json`` atomically."""
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p = p / PROFILE_FILE
        atomic_write_json(p, {
            "format": 1, "weight": self.weight, "mode_weights": self.mode_weights, "min_evidence": self.min_evidence, "tags": self.tags,
            "log_modes": sorted(self.log_modes),
            "p_tag": [round(float(x), 6) for x in self.p_t],
            "characters": {c: [round(float(x), 6) for x in self.p_ct[i]] for i, c in enumerate(self.characters)},
            "tagger_noise": None if self.noise is None else {k: v.tolist() for k, v in self.noise.items()},
            "tagger_id": self.noise_tagger_id,
        }, indent=None)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "TagReranker":
        p = Path(path)
        if p.is_dir():
            p = p / PROFILE_FILE
        with reading_file(p, "tag profiles", "build them with ard-gallery build (needs tagged metadata) or set rerank=false",
                          "rebuild them with ard-gallery build"):
            obj = read_json(p)
            chars = list(obj["characters"])
            rr = cls(obj["tags"], chars, np.array([obj["characters"][c] for c in chars]), np.array(obj["p_tag"]),
                       weight=float(obj.get("weight", 0.02)), min_evidence=float(obj.get("min_evidence", 0.05)),
                       mode_weights=obj.get("mode_weights"), log_modes=obj.get("log_modes", ()))
            if obj.get("tagger_noise"):
                rr.noise = {k: np.asarray(v, bool if k == "usable" else np.float64) for k, v in obj["tagger_noise"].items()}
                rr.noise_tagger_id = str(obj.get("tagger_id") or "")
            return rr


def _evidence_times(probs: np.ndarray, log_shift: np.ndarray) -> np.ndarray:
    """``probs * exp(log_shift)``, renormalised to the mass the candidates held: Bayes' rule for a probability."""
    held = float(probs.sum())
    moved = np.clip(probs, 0.0, None) * np.exp(log_shift - log_shift.max())
    total = float(moved.sum())
    return probs.copy() if total <= 0.0 or held <= 0.0 else moved * (held / total)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p) - np.log1p(-p)


#: Starting weights per mode (score scales differ: cosine gaps are small, probability gaps large); the additive rule's.
DEFAULT_WEIGHTS = {"clip": 0.03, "model": 0.1, "fusion": 0.05}
#: The log scale's starting weight and grid: 1 trusts the tags as independent evidence (naive Bayes), less discounts
#: what they share with each other and with the picture's embedding.
DEFAULT_LOG_WEIGHT = 0.3
LOG_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
ADDITIVE_GRID = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5)


def tune_weight(reranker: TagReranker, candidates: Sequence[Sequence[Candidate]], tag_probs: np.ndarray, labels: Sequence[str],
                grid: Sequence[float] | None = None, default: float | None = None,
                mode: str | None = None, beat_noise: bool = False) -> tuple[float, dict[float, float]]:
    """Pick the weight with the best validation top-1 for `mode`'s scale (its grid and default unless given); ties go
    to the one nearest `default` (a small validation set at ceiling accuracy cannot tell weights apart, and should not
    switch reranking off). With `beat_noise` reranking must beat no reranking by more than noise on these pictures
(`evalset.noise_margin`, the rule a mode clears to become the default), or its weight is 0."""
    log_scale = mode in reranker.log_modes
    grid = grid if grid is not None else LOG_GRID if log_scale else ADDITIVE_GRID
    default = default if default is not None else DEFAULT_LOG_WEIGHT if log_scale else DEFAULT_WEIGHTS.get(mode or "", 0.03)
    acc: dict[float, float] = {}
    for w in grid:
        hits = 0
        for cands, s, y in zip(candidates, tag_probs, labels):
            res = reranker.rerank(cands, s, weight=w, mode=mode)
            hits += bool(res.candidates) and res.candidates[0][0] == y
        acc[float(w)] = hits / max(1, len(labels))
    best = max(acc.items(), key=lambda kv: (round(kv[1], 9), -abs(np.log((kv[0] + 1e-3) / (default + 1e-3)))))[0]
    if beat_noise and 0.0 in acc and acc[best] <= acc[0.0] + noise_margin(acc[0.0], len(labels)):
        best = 0.0
    return best, acc
