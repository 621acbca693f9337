"""Exact and near-duplicate detection (content hash + perceptual hash) for cleaning and leak-free splits.

Near-duplicates (resized, recompressed, slightly cropped copies) share a group so a split cannot put
one copy in train and another in val: the leak that inflated the seed system's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import imagehash
import numpy as np
from PIL import Image

from ..fsutil import file_sha256
from ..imageio import ImageError, load_image
from .layout import ImageRecord


def perceptual_hash(img: Image.Image) -> int:
    """64-bit pHash as an int (robust to resize and recompression; mirrored copies hash apart)."""
    return int(str(imagehash.phash(img)), 16)


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_clusters(hashes: Sequence[int], max_distance: int = 8) -> list[int]:
    """Cluster id per item: items within `max_distance` bits (transitively) share an id."""
    n = len(hashes)
    arr = np.array([h & ((1 << 64) - 1) for h in hashes], dtype=np.uint64)
    uf = _UnionFind(n)
    for i in range(n):
        if i + 1 >= n:
            break
        d = _popcount(np.bitwise_xor(arr[i + 1 :], arr[i]))
        for j in np.nonzero(d <= max_distance)[0]:
            uf.union(i, i + 1 + int(j))
    return [uf.find(i) for i in range(n)]


@dataclass
class DuplicateReport:
    """What grouping found: exact duplicate and near-duplicate cluster counts, unreadable files."""

    exact_duplicates: int
    near_duplicate_groups: int
    unreadable: list[str]


def assign_duplicate_groups(
    records: list[ImageRecord], root: str | Path, max_distance: int = 8
) -> DuplicateReport:
    """Fill each record's ``group`` so exact and near-duplicates share one (existing groups are merged in).

    Unreadable images are listed in the report and left ungrouped (the loader skips them later).
    """
    root = Path(root)
    hashes: list[int] = []
    idx: list[int] = []
    unreadable: list[str] = []
    sha_seen: dict[str, int] = {}
    exact = 0
    uf = _UnionFind(len(records))
    for i, r in enumerate(records):
        p = r.path(root)
        try:
            sha = file_sha256(p)
            if sha in sha_seen:
                exact += 1
                uf.union(sha_seen[sha], i)
                continue
            sha_seen[sha] = i
            img = load_image(p)
        except (ImageError, OSError):
            unreadable.append(r.file_name)
            continue
        hashes.append(perceptual_hash(img))
        idx.append(i)
    clusters = near_duplicate_clusters(hashes, max_distance)
    first: dict[int, int] = {}
    for k, c in enumerate(clusters):
        if c in first:
            uf.union(first[c], idx[k])
        else:
            first[c] = idx[k]
    by_group: dict[str, int] = {}
    for i, r in enumerate(records):  # records that already share an explicit group stay together
        if r.group:
            if r.group in by_group:
                uf.union(by_group[r.group], i)
            else:
                by_group[r.group] = i
    sizes: dict[int, int] = {}
    for i in range(len(records)):
        sizes[uf.find(i)] = sizes.get(uf.find(i), 0) + 1
    for i, r in enumerate(records):
        root_i = uf.find(i)
        r.group = r.group if sizes[root_i] == 1 else f"dup:{records[root_i].file_name}"
    near = sum(1 for s in sizes.values() if s > 1)
    return DuplicateReport(exact_duplicates=exact, near_duplicate_groups=near, unreadable=unreadable)
