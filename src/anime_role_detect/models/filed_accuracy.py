"""`FiledAccuracy`: top-1 / top-5 accuracy where an answer is right when it names any character the picture is filed under.

A booru group picture is collected once per character it shows; scored on each copy's own label, naming another
character it shows counts as wrong, and a validation side holding such copies understates (and, for checkpoint choice,
mis-ranks) what the version will answer. The recognition side reads them the same way (`recognition.build`).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def filed_targets(y: torch.Tensor, n_classes: int, filed: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [batch, classes]: the characters each picture is filed under (`filed`), its own label always among them."""
    mask = torch.zeros(len(y), n_classes, dtype=torch.bool, device=y.device) if filed is None else filed.to(y.device).bool().clone()
    mask[torch.arange(len(y), device=y.device), y] = True
    return mask


class FiledAccuracy(Metric):
    """Per-character counts of pictures and of right answers (top-1 and top-`k`), summed across DDP ranks."""

    full_state_update = False

    def __init__(self, num_classes: int, top_k: int = 5) -> None:
        super().__init__()
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
