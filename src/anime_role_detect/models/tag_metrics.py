"""`TagMeanAveragePrecision`: the validation tag mAP over the tags that have a positive picture in the set.

torchmetrics scores a tag no validation picture carries as AP 0 (warning that its recall is undefined), so every tag
absent from a small validation side pulled ``val/tag_map`` down, and it disagreed with the report's ``tag_map``
(`training.evaluation.tag_map`, which leaves such tags out). Positives are counted per tag and summed over DDP ranks.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.classification import MultilabelAveragePrecision


class TagMeanAveragePrecision(MultilabelAveragePrecision):
    """Mean AP over tags with at least one positive target; NaN when no tag has one."""

    def __init__(self, num_labels: int) -> None:
        super().__init__(num_labels=num_labels, average=None)
        self.add_state("positives", default=torch.zeros(num_labels), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds, target)
        self.positives += (target > 0).sum(0).to(self.positives)

    def compute(self) -> torch.Tensor:
        with warnings.catch_warnings():  # the tags it warns about are the ones left out below
            warnings.filterwarnings("ignore", message="No positive samples found in target")
            ap = super().compute()
        keep = (self.positives > 0) & ~torch.isnan(ap)
        return ap[keep].mean() if bool(keep.any()) else torch.tensor(float("nan"))
