"""Decode image files in DataLoader worker processes: for Lightning ``predict`` (gallery embedding) and ``infer.py`` folders.

Lightning is not imported here (its import is seconds of an ``infer.py`` start): the predict DataModule over these
loaders is `data.predict_module.ImageFolderPredictData`.

`DecodeDataset` reads and decodes one file per ``__getitem__`` (`imageio.decode_image`, the one safe decode path),
so with ``num_workers > 0`` decoding runs in other processes and overlaps the forward pass. An unreadable file
is an item with ``error`` set, never an exception: one bad file does not stop the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageError
from ..imageio import DEFAULT_LIMITS, ImageLimits, content_hash, decode_image


@dataclass
class Decoded:
    """One file after decoding: its id and path, the RGB image (None when unreadable), sha256, bytes, error."""

    id: str
    path: str
    image: Image.Image | None = None
    sha256: str = ""
    data: bytes | None = None
    error: str = ""


def decode_file(item_id: str, path: str | Path, keep_bytes: bool = False, limits: ImageLimits = DEFAULT_LIMITS) -> Decoded:
    """Read and decode one file under `limits`; a read or decode failure becomes ``error`` (the one-line message), not
    an exception."""
    p = Path(path)
    try:
        data = p.read_bytes()
        img = decode_image(data, str(p), limits)
    except ImageError as exc:
        return Decoded(item_id, str(p), error=str(exc))
    except OSError as exc:
        return Decoded(item_id, str(p), error=f"{p}: cannot read ({exc.strerror}); check permissions")
    return Decoded(item_id, str(p), img, content_hash(data), data if keep_bytes else None)


class DecodeDataset(Dataset):
    """``(id, path)`` items decoded on access (in a worker process when the loader has workers)."""

    def __init__(self, items: Sequence[tuple[str, str | Path]], keep_bytes: bool = False, limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.items = [(str(i), str(p)) for i, p in items]
        self.keep_bytes = bool(keep_bytes)
        self.limits = limits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        return decode_file(*self.items[i], keep_bytes=self.keep_bytes, limits=self.limits)


def collate_decoded(batch: list[Decoded]) -> list[Decoded]:
    """Keep a batch as a list: PIL images and errors stay as they are (the embedder preprocesses)."""
    return list(batch)


def decode_loader(items: Sequence[tuple[str, str | Path]], batch_size: int = 16, num_workers: int = 2,
                  keep_bytes: bool = False, prefetch_factor: int = 2, limits: ImageLimits = DEFAULT_LIMITS) -> DataLoader:
    """An ordered DataLoader of `Decoded` batches (``num_workers=0``: decode in this process, as before), each file
    decoded under `limits` (recognition passes its own: big JPEGs drafted)."""
    workers = max(0, int(num_workers))
    extra: dict[str, Any] = {"prefetch_factor": max(1, int(prefetch_factor)), "persistent_workers": False} if workers else {}
    return DataLoader(DecodeDataset(items, keep_bytes, limits), batch_size=max(1, int(batch_size)), shuffle=False,
                      num_workers=workers, collate_fn=collate_decoded, **extra)
