"""Identity embedding head: an L2-normalised projection trained with a margin loss (sub-center ArcFace or CosFace).

A softmax head only has to put each character on the right side of a boundary; a margin loss asks every
character's pictures to sit closer to their own centre than to any other character's by a margin, which is
what a gallery search (and few-shot enrolment of a character the model never trained on) needs. Sub-centres
(Deng et al., 2020) let one character keep a few looks (outfits) and absorb label noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class EmbeddingSpec:
    """``model.embedding`` in conf/model/: ``dim: 0`` turns the head off (the gallery then uses pooled features)."""

    dim: int = 0                    # embedding size; 0: no identity head
    loss: str = "subcenter_arcface"  # subcenter_arcface | arcface | cosface
    margin: float = 0.2             # additive angular (arcface) or cosine (cosface) margin
    scale: float = 30.0             # logit scale s
    subcenters: int = 3             # centres per character (arcface/cosface with 1 = the plain loss)
    weight: float = 1.0             # loss weight beside the softmax (and tag) losses

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "EmbeddingSpec":
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"model.embedding: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        spec = cls(**cfg)
        if spec.dim and spec.loss not in MARGIN_LOSSES:
            raise ConfigError(f"model.embedding.loss={spec.loss!r}: choose one of {', '.join(MARGIN_LOSSES)}")
        if spec.dim < 0 or spec.subcenters < 1 or spec.scale <= 0:
            raise ConfigError(f"model.embedding: dim >= 0, subcenters >= 1 and scale > 0 are required, got {asdict(spec)}")
        return spec


def _arcface(cos: torch.Tensor, onehot: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(theta + m) on the target column (kept monotonic past pi - m, as in the ArcFace paper)."""
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-7))
    target = cos * math.cos(margin) - sin * math.sin(margin)
    target = torch.where(cos > math.cos(math.pi - margin), target, cos - math.sin(math.pi - margin) * margin)
    return torch.where(onehot, target, cos)


def _cosface(cos: torch.Tensor, onehot: torch.Tensor, margin: float) -> torch.Tensor:
    return cos - onehot * margin


#: loss name -> (cosine [N, C], target one-hot [N, C] bool, margin) -> margin-adjusted cosine
MARGIN_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "subcenter_arcface": _arcface,
    "arcface": _arcface,
    "cosface": _cosface,
}


class IdentityHead(nn.Module):
    """Pooled features -> unit embedding (``forward``); ``loss`` scores it against per-character (sub-)centres."""

    def __init__(self, in_dim: int, n_classes: int, spec: EmbeddingSpec) -> None:
        super().__init__()
        self.spec = spec
        self.project = nn.Linear(in_dim, spec.dim)  # no BatchNorm: a last training batch of one picture must not fail
        k = spec.subcenters if spec.loss == "subcenter_arcface" else 1
        self.centres = nn.Parameter(torch.empty(n_classes * k, spec.dim))
        nn.init.xavier_uniform_(self.centres)
        self.k = k

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(feats), dim=1)

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine to each character [N, C]: the closest of its sub-centres."""
        cos = emb @ F.normalize(self.centres, dim=1).t()
        return cos.view(emb.shape[0], -1, self.k).amax(dim=2)

    def loss(self, emb: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosines(emb).clamp(-1 + 1e-6, 1 - 1e-6)
        onehot = F.one_hot(y, cos.shape[1]).bool()
        logits = self.spec.scale * MARGIN_LOSSES[self.spec.loss](cos, onehot, self.spec.margin)
        return F.cross_entropy(logits, y, weight=class_weights)

    def warm_start(self, state: Mapping[str, torch.Tensor], prefix: str, old_names: list[str], new_names: list[str]) -> int:
        """Load an earlier checkpoint's projection and the centres of the characters it knew (by name); returns how many."""
        w, b, c = (state.get(f"{prefix}.{k}") for k in ("project.weight", "project.bias", "centres"))
        if w is None or w.shape != self.project.weight.shape or c is None or c.shape[1] != self.centres.shape[1]:
            return 0
        old_k = c.shape[0] // max(1, len(old_names))
        if old_k != self.k:
            return 0
        index = {n: i for i, n in enumerate(old_names)}
        n = 0
        with torch.no_grad():
            self.project.weight.copy_(w)
            if b is not None:
                self.project.bias.copy_(b)
            for j, name in enumerate(new_names):
                if (i := index.get(name)) is not None:
                    self.centres[j * self.k : (j + 1) * self.k].copy_(c[i * self.k : (i + 1) * self.k])
                    n += 1
        return n
