"""`FiledAccuracy` and `filed_cross_entropy`: accuracy and loss where naming any character a picture is filed under is right.

A booru group picture is collected once per character it shows; scored on each copy's own label, naming another
character it shows counts as wrong, and a validation side holding such copies understates (and, for checkpoint choice,
mis-ranks) what the version will answer. The recognition side reads them the same way (`recognition.build`).
Trained on each copy's own label the same picture pulls towards several answers at once; the partial-label loss asks
only that the answer be one of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def filed_targets(y: torch.Tensor, n_classes: int, filed: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [batch, classes]: the characters each picture is filed under (`filed`), its own label always among them."""
    mask = torch.zeros(len(y), n_classes, dtype=torch.bool, device=y.device) if filed is None else filed.to(y.device).bool().clone()
    mask[torch.arange(len(y), device=y.device), y] = True
    return mask


def filed_cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    filed: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy whose own-label term, for a picture filed under several characters, is -log of the probability on
    all of them (partial-label learning); a batch without such pictures gets exactly `F.cross_entropy`."""
    loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
    if filed is None:
        return loss
    mask = filed_targets(y, logits.shape[1], filed)
    several = mask.sum(1) > 1
    if not bool(several.any()):
        return loss
    logp = logits.float().log_softmax(-1)
    own = logp.gather(1, y[:, None]).squeeze(1)
    any_filed = logp.masked_fill(~mask, float("-inf")).logsumexp(1)
    w = weight[y].float() if weight is not None else torch.ones_like(own)
    relief = ((any_filed - own) * w)[several].sum() / w.sum()  # F.cross_entropy's mean divides by the labels' weights
    return loss - (1.0 - float(label_smoothing)) * relief.to(loss.dtype)


class FiledAccuracy(Metric):
    """Per-character counts of pictures and of right answers (top-1 and top-`k`), summed across DDP ranks."""

    full_state_update = False

    def __init__(self, num_classes: int, top_k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # torchmetrics' own options (sync_on_compute, ...)
        self.num_classes, self.top_k = int(num_classes), max(1, min(int(top_k), int(num_classes)))
        for name in ("total", "right", "right_k"):
            self.add_state(name, default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, y: torch.Tensor, filed: torch.Tensor | None = None) -> None:  # type: ignore[override]
        mask = filed_targets(y, self.num_classes, filed)
        top = logits.topk(self.top_k, dim=1).indices
        hit = mask.gather(1, top)  # [batch, k]: is each of the k best answers a filed character
        self.total += torch.bincount(y, minlength=self.num_classes)
        self.right += torch.bincount(y, weights=hit[:, 0].float(), minlength=self.num_classes).long()
        self.right_k += torch.bincount(y, weights=hit.any(1).float(), minlength=self.num_classes).long()

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``acc`` and ``acc_top_k`` over every picture, ``per_class`` top-1 by the picture's own label (NaN: none)."""
        n = self.total.sum().clamp(min=1).float()
        per_class = self.right.float() / self.total.float()  # 0/0 -> NaN for a character with no picture
        return {"acc": self.right.sum() / n, "acc_top_k": self.right_k.sum() / n, "per_class": per_class}
