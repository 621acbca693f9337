"""The embedding shards a Lightning predict writes (`recognition.predict`), read without holding every vector.

A rank writes atomic parts ``rank-00003-part-0000.npz`` (ids + unit vectors) and, when it is done,
``rank-00003.done.json``. `ShardSet.open` checks that every rank finished and reads only the ids;
`ShardSet.gather` copies the vectors of chosen rows into any array, one part at a time. Into an
``np.memmap`` scratch file (`predict.gallery_from_shards`) a merge of 10M rows holds the ids and one
part, not 51 GB of vectors twice; `merge_shards` is the small in-memory form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import GalleryError
from ..fsutil import atomic_write_npz, read_json

PART_GLOB, DONE_GLOB = "rank-*-part-*.npz", "rank-*.done.json"


def part_name(rank: int, part: int) -> str:
    return f"rank-{rank:05d}-part-{part:04d}.npz"


def done_name(rank: int) -> str:
    return f"rank-{rank:05d}.done.json"


#: What an embedding run was started with (embedder, images, world size): parts written under another are not reused.
RUN_FILE = "run.json"


def rank_parts(shard_dir: str | Path, rank: int) -> list[Path]:
    """One rank's finished parts, in order."""
    return sorted(Path(shard_dir).glob(f"rank-{int(rank):05d}-part-*.npz"))


def not_embedded(shard_dir: str | Path, ids: Sequence[str]) -> np.ndarray:
    """Which of `ids` no finished part of a folder (any rank) holds, as a mask; the parts' ids are read as UTF-8 bytes,
    as `ShardSet` reads them (a quarter of numpy text), without their vectors."""
    held = []
    for p in sorted(Path(shard_dir).glob(PART_GLOB)):
        with np.load(p) as z:
            held.append(_utf8(z["ids"]))
    wanted = _utf8(np.asarray(ids, dtype=np.str_))
    return ~np.isin(wanted, np.concatenate(held)) if held else np.ones(len(wanted), bool)


def save_part(path: Path, ids: Sequence[str] | np.ndarray, vectors: np.ndarray) -> None:
    """Write one shard part atomically (a killed rank never leaves a torn part)."""
    atomic_write_npz(path, ids=np.asarray(ids, dtype=np.str_), vectors=np.asarray(vectors, np.float32))


@dataclass
class ShardSet:
    """Every rank's finished parts in a folder: the ids of all their rows (in part order) and the run's info."""

    directory: Path
    parts: list[Path]
    ids: np.ndarray       # every row's id as UTF-8 bytes (a quarter of numpy text), part after part; a resumed rank's repeats included
    offsets: np.ndarray   # where each part's rows start in `ids`; offsets[-1] = len(ids)
    info: dict[str, Any]  # embedder_id, dim, world_size, seconds (the slowest rank's), errors [(id, message)], skipped (resumed)

    @classmethod
    def open(cls, shard_dir: str | Path) -> "ShardSet":
        """Check the done markers and part counts, then read the parts' ids (not their vectors).

        Raises `GalleryError` when a rank's marker or parts are missing (a rank died, or two runs' shards mix).
        """
        d = Path(shard_dir)
        done = [read_json(p) for p in sorted(d.glob(DONE_GLOB))]
        if not done:
            raise GalleryError(f"{d} has no finished embedding shards (rank-*.done.json); run `python -m anime_role_detect.cli.embed` first")
        world = {int(x["world_size"]) for x in done}
        if len(world) != 1 or len(done) != next(iter(world)) or {int(x["rank"]) for x in done} != set(range(len(done))):
            raise GalleryError(f"{d}: {len(done)} rank marker(s) for world size(s) {sorted(world)}; a rank failed or two runs mixed, embed again")
        parts: list[Path] = []
        for x in done:
            mine = rank_parts(d, int(x["rank"]))
            if len(mine) != int(x["parts"]):
                raise GalleryError(f"{d}: rank {x['rank']} wrote {x['parts']} part(s) but {len(mine)} are there; embed again")
            parts.extend(mine)
        ids: list[np.ndarray] = []
        for p in parts:
            with np.load(p) as z:  # an .npz member is read when asked for: the ids only
                ids.append(_utf8(z["ids"]))
        sizes = np.array([0] + [len(i) for i in ids], np.int64)
        info = {"embedder_id": done[0]["embedder_id"], "dim": int(done[0]["dim"]), "world_size": len(done),
                "seconds": max(float(x.get("seconds", 0.0)) for x in done), "skipped": int(done[0].get("skipped", 0)),
                "errors": sorted((e for x in done for e in x.get("errors", [])), key=lambda e: e[0])}
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.bytes_)
        return cls(d, parts, all_ids, np.cumsum(sizes), info)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def n_unique(self) -> int:
        """How many distinct ids the ranks embedded."""
        return len(np.unique(self.ids))

    def unique_ids(self) -> list[str]:
        """Every embedded id once, sorted (the order 1 and N processes agree on; UTF-8 bytes sort as the text does)."""
        return [i.decode("utf-8") for i in np.unique(self.ids).tolist()]

    def locate(self, wanted: Sequence[str] | np.ndarray) -> np.ndarray:
        """The row (index into `ids`) holding each wanted id, its first copy; -1 for an id no rank embedded."""
        w = _utf8(np.asarray(wanted, dtype=np.str_))
        if not len(self.ids) or not len(w):
            return np.full(len(w), -1, np.int64)
        order = np.argsort(self.ids, kind="stable")
        ranked = self.ids[order]
        at = np.minimum(np.searchsorted(ranked, w, side="left"), len(ranked) - 1)
        return np.where(ranked[at] == w, order[at], -1).astype(np.int64)

    def gather(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[i] = vector of row rows[i]`` for rows from `locate` (all >= 0), reading one part at a time.

        `out` may be an ``np.memmap``: only one part's vectors are ever in memory.
        """
        rows = np.asarray(rows, np.int64)
        if len(rows) != len(out) or (len(rows) and (rows.min() < 0 or rows.max() >= len(self.ids))):
            raise GalleryError(f"{self.directory}: {len(rows)} shard rows asked for {len(out)} outputs, or a row is not in the shards; embed again")
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        by_part = np.argsort(part_of, kind="stable")
        bounds = np.searchsorted(part_of[by_part], np.arange(len(self.parts) + 1))
        for p, path in enumerate(self.parts):
            dest = by_part[bounds[p] : bounds[p + 1]]
            if not len(dest):
                continue
            with np.load(path) as z:
                vectors = z["vectors"]
            if vectors.shape[1:] != (self.dim,):
                raise GalleryError(f"{path} holds vectors of shape {vectors.shape}, not dim {self.dim}; embed again")
            out[dest] = vectors[rows[dest] - self.offsets[p]]
        return out


def _utf8(ids: np.ndarray) -> np.ndarray:
    """Numpy text (4 bytes a character) as UTF-8 bytes; file names hold no NUL, which numpy bytes would drop."""
    return np.char.encode(ids, "utf-8") if len(ids) else np.zeros(0, np.bytes_)


def merge_shards(shard_dir: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Every rank's shards in memory -> (ids sorted by name, their vectors, info); an id embedded twice counts once.

    For small galleries and tests; `predict.gallery_from_shards` builds a gallery of millions without this copy.
    """
    shards = ShardSet.open(shard_dir)
    ids = shards.unique_ids()
    vectors = shards.gather(shards.locate(ids), np.empty((len(ids), shards.dim), np.float32))
    return ids, vectors, shards.info
