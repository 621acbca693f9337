"""Identity embedding head: an L2-normalised projection trained with a margin loss (sub-center ArcFace or CosFace)
or a supervised contrastive loss (SupCon).

A softmax head only has to put each character on the right side of a boundary; a margin loss asks every
character's pictures to sit closer to their own centre than to any other character's by a margin, which is
what a gallery search (and few-shot enrolment of a character the model never trained on) needs. Sub-centres
(Deng et al., 2020) let one character keep a few looks (outfits) and absorb label noise. SupCon (Khosla et al.,
2020) has no centres: it pulls each picture towards the other pictures of its character in the batch and away
from the rest, so it needs batches with several pictures per character (`data.balance=pk`).
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
    loss: str = "subcenter_arcface"  # subcenter_arcface | arcface | cosface | supcon
    margin: float = 0.2             # additive angular (arcface) or cosine (cosface) margin
    scale: float = 30.0             # logit scale s
    subcenters: int = 3             # centres per character (arcface/cosface with 1 = the plain loss)
    weight: float = 1.0             # loss weight beside the softmax (and tag) losses
    temperature: float = 0.1        # supcon only: softmax temperature over in-batch cosines

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "EmbeddingSpec":
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"model.embedding: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        spec = cls(**cfg)
        if spec.dim and spec.loss not in EMBEDDING_LOSSES:
            raise ConfigError(f"model.embedding.loss={spec.loss!r}: choose one of {', '.join(EMBEDDING_LOSSES)}")
        if spec.dim < 0 or spec.subcenters < 1 or spec.scale <= 0 or spec.temperature <= 0:
            raise ConfigError(
                f"model.embedding: dim >= 0, subcenters >= 1, scale > 0 and temperature > 0 are required, got {asdict(spec)}"
            )
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
#: every `model.embedding.loss`: the margin losses (per-character centres) and the in-batch contrastive one
EMBEDDING_LOSSES: tuple[str, ...] = (*MARGIN_LOSSES, "supcon")


def supcon_loss(emb: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of unit embeddings [N, D] with labels [N].

    Each picture is an anchor: minus the mean log-probability of its positives (same label, not itself) under a
    softmax over its cosines to every other picture / temperature. Anchors with no positive in the batch are left
    out; a batch with none at all gives 0 (that is why SupCon wants P x K batches, `data.balance=pk`)."""
    n = emb.shape[0]
    logits = emb @ emb.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=emb.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return emb.sum() * 0.0  # keeps the graph (DDP) with no gradient
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has])
    return per_anchor.mean()


class IdentityHead(nn.Module):
    """Pooled features -> unit embedding (``forward``); ``loss`` scores it against per-character (sub-)centres
    (margin losses) or against the other pictures of the batch (supcon, which has no centres)."""

    def __init__(self, in_dim: int, n_classes: int, spec: EmbeddingSpec) -> None:
        super().__init__()
        self.spec = spec
        self.project = nn.Linear(in_dim, spec.dim)  # no BatchNorm: a last training batch of one picture must not fail
        k = spec.subcenters if spec.loss == "subcenter_arcface" else 1
        # supcon keeps no centres: an unused parameter would stall DDP's gradient sync
        self.centres = nn.Parameter(torch.empty(n_classes * k, spec.dim)) if spec.loss in MARGIN_LOSSES else None
        if self.centres is not None:
            nn.init.xavier_uniform_(self.centres)
        self.k = k

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(feats), dim=1)

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine to each character [N, C]: the closest of its sub-centres (margin losses only)."""
        if self.centres is None:
            raise ValueError("a supcon identity head has no per-character centres")
        cos = emb @ F.normalize(self.centres, dim=1).t()
        return cos.view(emb.shape[0], -1, self.k).amax(dim=2)

    def loss(self, emb: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss of unit embeddings `emb` with labels `y` (class weights apply to the margin losses)."""
        if self.centres is None:
            return supcon_loss(emb, y, self.spec.temperature)
        cos = self.cosines(emb).clamp(-1 + 1e-6, 1 - 1e-6)
        onehot = F.one_hot(y, cos.shape[1]).bool()
        logits = self.spec.scale * MARGIN_LOSSES[self.spec.loss](cos, onehot, self.spec.margin)
        return F.cross_entropy(logits, y, weight=class_weights)

    def warm_start(self, state: Mapping[str, torch.Tensor], prefix: str, old_names: list[str], new_names: list[str]) -> int:
        """Load an earlier checkpoint's projection and the centres of the characters it knew (by name); returns how many."""
        w, b, c = (state.get(f"{prefix}.{k}") for k in ("project.weight", "project.bias", "centres"))
        if w is None or w.shape != self.project.weight.shape:
            return 0
        centres_fit = self.centres is not None and c is not None and c.shape[1] == self.centres.shape[1]
        if centres_fit and c.shape[0] // max(1, len(old_names)) != self.k:
            return 0  # another number of sub-centres: start the head afresh
        index = {n: i for i, n in enumerate(old_names)}
        n = 0
        with torch.no_grad():
            self.project.weight.copy_(w)
            if b is not None:
                self.project.bias.copy_(b)
            if not centres_fit:
                return 0  # the projection alone carries over (supcon on either side)
            for j, name in enumerate(new_names):
                if (i := index.get(name)) is not None:
                    self.centres[j * self.k : (j + 1) * self.k].copy_(c[i * self.k : (i + 1) * self.k])
                    n += 1
        return n
