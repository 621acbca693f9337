"""Open-set rejection: a per-mode score threshold calibrated on validation data for a target false-accept rate.

Unseen characters are simulated leave-one-character-out: for a validation image of character c,
the best score among the *other* characters is what the system would report if c were not
enrolled (an impostor score; the classifier's probabilities renormalised without c). The threshold is
the (1 - FAR) quantile of impostor scores, so about FAR of unseen characters still get a name, unless
that would refuse more than `DEFAULT_MAX_FALSE_REJECT` (2%) of the known images the system answers
*right* (refusing a wrong answer costs nothing; near-twins), in which case the achieved FAR is recorded
instead; with few calibration pictures that share is placed by a normal prediction bound (`genuine_floor`).
Fusion's threshold applies to the best gallery cosine (`GALLERY_COSINE`), not to its blended probability: a
probability says which known character is likeliest, not whether the picture is one of them. Saved as
``calibration.json`` next to the gallery.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import numpy as np

from ..errors import ConfigError, GalleryError, reading_file
from ..fsutil import atomic_write_json, read_json
from ..versionfiles import CALIBRATION as CALIBRATION_FILE

#: `ModeThreshold.score` kinds: the mode's own top score, or the best gallery cosine of the picture.
TOP, GALLERY_COSINE = "top", "gallery_cosine"
#: Share of the known pictures answered right that a threshold may refuse (issue 11: known characters are rarely
#: refused); a stricter false-accept target is given up first and the rate achieved is recorded instead.
DEFAULT_MAX_FALSE_REJECT = 0.02


def check_max_false_reject(value: float) -> float:
    """`value` as a share of right answers a threshold may refuse, or a one-line error naming the setting."""
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"max_false_reject={value} must be in [0, 1) (the share of right answers open-set may refuse; "
                          f"default {DEFAULT_MAX_FALSE_REJECT})")
    return float(value)


@dataclass
class ModeThreshold:
    """One mode's threshold and what it achieved on validation data."""

    threshold: float
    false_accept_rate: float  # measured on impostors
    true_accept_rate: float  # genuine scores kept
    n_genuine: int
    n_impostor: int
    score: str = TOP  # what the threshold applies to: TOP or GALLERY_COSINE (files before it: TOP)


@dataclass
class OpenSetCalibration:
    """Thresholds per mode; a score below its mode's threshold answers 'unknown'."""

    target_far: float = 0.05
    modes: dict[str, ModeThreshold] = field(default_factory=dict)
    stale: dict[str, str] | None = None  # {since, reason}: the gallery changed after the thresholds were measured
    gallery_temperature: float | None = None  # fusion: softmax temperature of gallery cosines (`fit_temperature`)
    gallery_weight: float | None = None  # fusion: the gallery's share of the blend (`fit_gallery_weight`); None: 0.5
    whitened_temperature: float | None = None  # fusion: softmax temperature of the whitened gallery's scores (`whitened`)

    def mark_stale(self, reason: str) -> None:
        """Record that the gallery changed since calibration (kept from the first change until a rebuild recalibrates)."""
        if self.stale is None:
            self.stale = {"since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "reason": reason}
        else:
            self.stale = {**self.stale, "reason": f"{self.stale['reason']}; {reason}"[-500:]}

    def threshold(self, mode: str) -> float | None:
        m = self.modes.get(mode)
        return None if m is None else m.threshold

    def is_known(self, mode: str, top: float, gallery_cosine: float | None = None) -> bool:
        """True when the picture passes `mode`'s threshold (always True for an uncalibrated mode): its top score, or its
        best gallery cosine where the threshold was calibrated on that (`ModeThreshold.score`)."""
        t = self.threshold(mode)
        return t is None or self.gate_score(mode, top, gallery_cosine) >= t

    def gate_score(self, mode: str, top: float, gallery_cosine: float | None = None) -> float:
        """The score `mode`'s threshold is compared with (`is_known`)."""
        m = self.modes.get(mode)
        if m is not None and m.score == GALLERY_COSINE:
            if gallery_cosine is None:
                raise GalleryError(f"the {mode} open-set threshold applies to the best gallery cosine, which was not computed")
            return float(gallery_cosine)
        return float(top)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p = p / CALIBRATION_FILE
        obj = {"target_far": self.target_far, "modes": {k: asdict(v) for k, v in self.modes.items()}}
        if self.stale:
            obj["stale"] = self.stale
        if self.gallery_temperature is not None:
            obj["gallery_temperature"] = self.gallery_temperature
        if self.gallery_weight is not None:
            obj["gallery_weight"] = self.gallery_weight
        if self.whitened_temperature is not None:
            obj["whitened_temperature"] = self.whitened_temperature
        atomic_write_json(p, obj)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "OpenSetCalibration":
        p = Path(path)
        if p.is_dir():
            p = p / CALIBRATION_FILE
        with reading_file(p, "open-set calibration", "rebuild with ard-gallery build --val-fraction 0.2 or set openset.enabled=false",
                          "rebuild it with ard-gallery build"):
            obj = read_json(p)
            t, w, wt = obj.get("gallery_temperature"), obj.get("gallery_weight"), obj.get("whitened_temperature")
            return cls(float(obj["target_far"]), {k: ModeThreshold(**v) for k, v in obj["modes"].items()}, obj.get("stale"),
                       None if t is None else float(t), None if w is None else float(w), None if wt is None else float(wt))


def filed_mask(labels: Sequence[int], n_classes: int, filed: np.ndarray | None = None) -> np.ndarray:
    """``[N, C]`` booleans: the characters each picture is filed under (`filed`, a picture of several), else its label."""
    if filed is not None:
        return np.asarray(filed, bool)
    mask = np.zeros((len(labels), n_classes), bool)
    mask[np.arange(len(labels)), np.asarray(labels, int)] = True
    return mask


def fit_temperature(scores: np.ndarray, labels: Sequence[int], grid: Sequence[float] | None = None,
                    filed: np.ndarray | None = None) -> float:
    """Temperature scaling (Guo et al. 2017) of gallery cosines ``[N, C]``: the T whose ``softmax(cos / T)`` gives the
    true characters the highest mean log-probability (a picture of several: their summed probability, `filed_mask`).
    Fusion mixes that probability with the classifier's.

    Where every picture is named and the fit would sharpen towards T = 0 (every probability 1, a wrong answer's too:
    on 5 of the 24 real-set versions of docs/accuracy.md's tables a temperature ran to the grid's floor and each
    answer scored 1.0, or 0.5 where the two sources disagreed), it stops at the largest T whose mean log-probability
    reaches Laplace's rule of succession, log((n + 1) / (n + 2)) for n pictures: after n named, the next is named
    with about that chance."""
    s = np.asarray(scores, np.float64)
    mask = filed_mask(labels, s.shape[1], filed)
    grid = np.geomspace(1e-3, 1.0, 61) if grid is None else np.asarray(grid, np.float64)

    def logsumexp(z: np.ndarray) -> np.ndarray:  # per row, -inf entries left out
        top = z.max(1, keepdims=True)
        return top[:, 0] + np.log(np.exp(z - top).sum(1))

    def nll(t: float) -> float:  # -log of the probability the filed characters hold together
        z = s / t
        return float(np.mean(logsumexp(z) - logsumexp(np.where(mask, z, -np.inf))))

    losses = np.array([nll(t) for t in grid])
    bound = float(np.log((len(s) + 2) / (len(s) + 1)))  # -log((n + 1) / (n + 2))
    if len(s) and losses.min() < bound:
        return float(grid[losses <= bound].max())
    return float(grid[int(losses.argmin())])


def fit_gallery_weight(gallery_probs: np.ndarray, model_probs: np.ndarray, labels: Sequence[int],
                       grid: Sequence[float] | None = None, filed: np.ndarray | None = None) -> float:
    """Fusion's blend, fitted like the temperature: the w whose ``w * gallery + (1 - w) * classifier`` probability
    ``[N, C]`` gives the true characters the highest mean log-probability (a picture of several: their summed
    probability, `filed_mask`; ties go to the w nearest 0.5). A gallery that is sharper than the classifier on the
    version's held-out pictures gets more say, and a weaker one less, instead of a fixed half each."""
    g, m = np.asarray(gallery_probs, np.float64), np.asarray(model_probs, np.float64)
    mask = filed_mask(labels, g.shape[1], filed)
    g_true, m_true = np.where(mask, g, 0.0).sum(1), np.where(mask, m, 0.0).sum(1)
    grid = np.linspace(0.0, 1.0, 21) if grid is None else np.asarray(grid, np.float64)

    def nll(w: float) -> float:
        p = w * g_true + (1.0 - w) * m_true
        return float(-np.mean(np.log(np.clip(p, 1e-12, None))))

    return float(min(grid, key=lambda w: (round(nll(w), 9), abs(w - 0.5))))


def gallery_probabilities(cosines: Sequence[float], temperature: float | None) -> np.ndarray:
    """``softmax(cosines / temperature)`` over one picture's characters; the cosines themselves when there is no
    temperature (a version calibrated before fusion used one)."""
    c = np.asarray(cosines, np.float64)
    if temperature is None or not len(c):
        return c
    e = np.exp((c - c.max()) / float(temperature))
    return e / e.sum()


def leave_one_out_scores(scores: np.ndarray, labels: Sequence[int], renormalise: bool = False,
                         filed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor scores from a ``[N, C]`` score matrix and true class indices.

    With ``renormalise`` (softmax probabilities) the impostor is ``max_{j!=c} p_j / (1 - p_c)``: what
    the classifier would say if class c did not exist. A picture filed under several characters (`filed`,
    `filed_mask`) scores its best of them as genuine, and as impostor what is left when none of them exists: with only
    its own label left out, a character it also shows would count as an unseen one named.
    """
    s = np.asarray(scores, np.float64)
    mask = filed_mask(labels, s.shape[1], filed)
    genuine = np.where(mask, s, -np.inf).max(1)
    impostor = np.where(mask, -np.inf, s).max(1)
    if renormalise:
        impostor = impostor / np.maximum(1.0 - np.where(mask, s, 0.0).sum(1), 1e-9)
    return genuine, np.clip(impostor, -1.0, 1.0) if not renormalise else np.minimum(impostor, 1.0)


#: Fewer genuine scores than this below the order statistic a threshold would take: too few to place the share of
#: right answers refused, so the normal prediction bound may lower it (`genuine_floor`).
ORDER_STATISTIC_MIN = 5


def genuine_floor(genuine_sorted: np.ndarray, min_tar: float) -> float:
    """The highest threshold expected to pass `min_tar` of *new* right answers, from sorted genuine scores.

    The order statistic keeps `min_tar` of the calibration pictures; where fewer than `ORDER_STATISTIC_MIN` scores lie
    below it (under 250 pictures at 98%) it rests on the few lowest, and it refused 3.8% of right answers on
    pictures set aside before training (docs/accuracy.md "Few calibration pictures"), so the lower of it and the normal
    prediction bound ``mean - z sd sqrt(1 + 1/n)`` is taken."""
    g = np.asarray(genuine_sorted, np.float64)
    k = int(np.floor((1.0 - min_tar) * len(g)))
    t = float(g[k])
    if k < ORDER_STATISTIC_MIN and len(g) > 2:
        z = NormalDist().inv_cdf(min_tar)
        t = min(t, float(g.mean() - z * g.std(ddof=1) * np.sqrt(1.0 + 1.0 / len(g))))
    return t


def calibrate(genuine: Sequence[float], impostor: Sequence[float], target_far: float = 0.05,
              min_tar: float = 1.0 - DEFAULT_MAX_FALSE_REJECT, score: str = TOP) -> ModeThreshold:
    """Threshold with at most `target_far` of impostor scores at or above it, lowered if needed so at least
    `min_tar` of genuine scores still pass (near-twins make some impostors as strong as genuine matches:
    rejecting most known images to meet the FAR would be worse than a higher FAR, which is then reported).
    `score` records what the scores were (`ModeThreshold.score`)."""
    g = np.sort(np.asarray(genuine, np.float64))
    imp = np.sort(np.asarray(impostor, np.float64))
    if len(imp) == 0:
        raise GalleryError("no validation images to calibrate the open-set threshold; use a validation split with 2+ characters")
    k = int(np.floor(target_far * len(imp)))  # impostors allowed through
    t = float(np.nextafter(imp[len(imp) - k - 1], np.inf)) if k < len(imp) else float(imp[0])
    if len(g) and min_tar > 0:
        t = min(t, genuine_floor(g, min_tar))
    far = float((imp >= t).mean())
    tar = float((g >= t).mean()) if len(g) else 0.0
    return ModeThreshold(threshold=t, false_accept_rate=round(far, 4), true_accept_rate=round(tar, 4),
                         n_genuine=int(len(g)), n_impostor=int(len(imp)), score=score)
