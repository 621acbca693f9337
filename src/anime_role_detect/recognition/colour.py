"""A colour descriptor beside the network's embedding: hair and eye colour are much of an anime character's identity.

A network fine-tuned on some characters maps a character it never saw onto the nearest one it knows, so
a character enrolled from a few pictures, or one that should be refused as unknown, scores like a known
look-alike. A hue x saturation x value histogram of the picture needs no training and separates such
characters by colour. `ColourModel` appends it to any embedder's unit embedding, each part weighted so the
inner product is ``(1 - weight) * embedding cosine + weight * histogram similarity`` (Hellinger: the square
roots of the bin shares). Faiss, calibration and fusion use the joined vector unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .shared import l2_normalise

#: What a colour model id adds to its network's id (`ColourModel.model_id`, `views.base_model_id`).
COLOUR_ID_SUFFIX = "+colour"


@dataclass(frozen=True)
class ColourSpec:
    """How much the colour histogram weighs in a similarity (0: off) and its bins (hue, saturation, value)."""

    weight: float = 0.0
    bins: tuple[int, int, int] = (12, 4, 4)
    size: int = 96  # pictures are resized to size x size before counting (the histogram ignores layout)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | float | None) -> "ColourSpec":
        """From a config mapping (unknown keys: one-line error), a number (the weight) or None (off)."""
        if cfg is None or isinstance(cfg, (int, float)):
            cfg = {"weight": float(cfg or 0.0)}
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"embedder.colour={cfg!r}: give a weight such as 0.3, a mapping {{weight: 0.3}}, or null (off)")
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - {"weight", "bins", "size"})
        if unknown:
            raise ConfigError(f"embedder.colour: unknown key(s) {', '.join(unknown)}; choose from weight, bins, size")
        weight = float(cfg.get("weight", 0.0))
        if not 0.0 <= weight < 1.0:
            raise ConfigError(f"embedder.colour.weight={weight} must be in [0, 1) (the histogram's share of a similarity; 0 = off)")
        bins = tuple(int(b) for b in cfg.get("bins", (12, 4, 4)))
        if len(bins) != 3 or not all(1 <= b <= 64 for b in bins):
            raise ConfigError(f"embedder.colour.bins={list(bins)} must be three counts (hue, saturation, value) from 1 to 64")
        size = int(cfg.get("size", 96))
        if size < 8:
            raise ConfigError(f"embedder.colour.size={size} is too small; use 32 or more")
        return cls(weight, bins, size)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self.weight > 0.0

    @property
    def n_bins(self) -> int:
        return int(np.prod(self.bins))

    @property
    def key(self) -> str:
        """The spec in a model id: galleries built with another spec are refused, not silently mixed."""
        return f"{self.weight:g}:{'x'.join(map(str, self.bins))}@{self.size}"


def colour_histograms(images: Sequence[Image.Image], spec: ColourSpec) -> np.ndarray:
    """``[N, n_bins]`` unit vectors: the square roots of each picture's share of pixels per HSV bin."""
    hb, sb, vb = spec.bins
    out = np.zeros((len(images), spec.n_bins), np.float32)
    for i, im in enumerate(images):
        hsv = np.asarray(im.convert("RGB").resize((spec.size, spec.size), Image.BILINEAR).convert("HSV"), np.int32)
        idx = ((hsv[..., 0] * hb >> 8) * sb + (hsv[..., 1] * sb >> 8)) * vb + (hsv[..., 2] * vb >> 8)
        counts = np.bincount(idx.ravel(), minlength=spec.n_bins).astype(np.float64)
        out[i] = np.sqrt(counts / counts.sum())  # unit norm: the shares sum to 1
    return out


class ColourModel:
    """Any embedder (torch or ONNX Runtime) whose embedding carries the picture's colour histogram after it.

    Exposes what the wrapped object does (`embed`, `embed_with_heads`, `heads`; every other attribute is the
    wrapped one's), so galleries, recognition, export and cluster embedding use it unchanged.
    """

    def __init__(self, inner: Any, spec: ColourSpec) -> None:
        self.inner, self.spec = inner, spec
        self.model_id = f"{inner.model_id}{COLOUR_ID_SUFFIX}{spec.key}"
        self.dim = int(inner.dim) + spec.n_bins

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _joined(self, emb: np.ndarray, images: Sequence[Image.Image]) -> np.ndarray:
        w = self.spec.weight
        hist = colour_histograms(images, self.spec)
        return np.concatenate([np.sqrt(1.0 - w) * l2_normalise(emb), np.sqrt(w) * hist], axis=1).astype(np.float32)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._joined(self.inner.embed(images), images)

    def embed_with_heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        emb, probs, tags = self.inner.embed_with_heads(images)
        return self._joined(emb, images), probs, tags


def with_colour(obj: Any, setting: Mapping[str, Any] | float | None) -> Any:
    """`obj` with the colour histogram joined to its embedding when `setting` turns it on (never twice), else `obj`."""
    spec = ColourSpec.from_mapping(setting)
    if not spec.enabled or isinstance(obj, ColourModel):
        return obj
    return ColourModel(obj, spec)
