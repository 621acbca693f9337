"""A folder of images as a Lightning predict DataModule (gallery embedding on one process or a DDP cluster).

Kept apart from `data.predict` so that decoding a folder for ``infer.py`` never imports Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from .predict import decode_loader


class ImageFolderPredictData(L.LightningDataModule):
    """A list of ``(id, path)`` images as a predict DataModule; under DDP Lightning gives each rank its own slice."""

    def __init__(self, items: Sequence[tuple[str, str | Path]], batch_size: int = 32, num_workers: int = 2) -> None:
        super().__init__()
        self.items = [(str(i), str(p)) for i, p in items]
        self.batch_size = max(1, int(batch_size))
        self.num_workers = max(0, int(num_workers))

    def predict_dataloader(self) -> DataLoader:
        return decode_loader(self.items, self.batch_size, self.num_workers)
