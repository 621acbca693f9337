"""A gallery's rows as columns: character and series codes per row id, source texts in one buffer.

A dict of one `Row` object per row cost 183 bytes a row (1.8 GB at 10M rows; benchmarks/gallery_rows.py)
and loading its JSON list built a dict per row on top. `RowTable` keeps 4 + 4 + 8 bytes per row plus the
source's UTF-8 bytes and each character's row ids (8 bytes a row), makes `Row` objects on demand,
and saves as ``gallery.rows.npz`` (plain arrays: loading creates no object per row).
"""

from __future__ import annotations

import zipfile
from array import array
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import GalleryError
from ..fsutil import HashingWriter, atomic_path
from ..versionfiles import GALLERY_ROWS as FILE


@dataclass(slots=True)
class Row:
    """Metadata of one gallery vector."""

    id: int
    character: str
    series: str = ""
    source: str = ""


def _grown(a: np.ndarray, size: int, fill: int) -> np.ndarray:
    if len(a) >= size:
        return a
    out = np.full(max(size, 2 * len(a), 1024), fill, a.dtype)
    out[: len(a)] = a
    return out


class RowTable(MappingABC):
    """Row id -> `Row` (a read-only mapping of the live rows, ids ascending) for ids ``0 .. next_id - 1``; a removed
    row keeps its source bytes with owner -1."""

    def __init__(self) -> None:
        self.names: list[str] = []  # character code -> name
        self._code: dict[str, int] = {}
        self.owner = np.full(0, -1, np.int32)  # row id -> character code; -1: no live row (grows by doubling)
        self._series_of_row = np.zeros(0, np.int32)
        self._series_names: list[str] = [""]
        self._series_code: dict[str, int] = {"": 0}
        self._src_end = array("q")  # row id -> end of its source in `_src` (start: the previous row's end)
        self._src = bytearray()
        self.members: dict[str, array] = {}  # character -> its live row ids (int64), in id order
        self.series: dict[str, str] = {}  # character -> its series (the first row's)
        self._live = 0

    # -- editing -----------------------------------------------------------------------------------
    def add(self, first_id: int, rows: Sequence[tuple[str, str, str]]) -> None:
        """``(character, series, source)`` rows as ids `first_id`, `first_id + 1`, ... (ids follow on from the last one added)."""
        n = len(rows)
        if first_id != len(self._src_end):
            raise GalleryError(f"row id {first_id} added after {len(self._src_end)} rows; rebuild the gallery")
        end = first_id + n
        self.owner = _grown(self.owner, end, -1)
        self._series_of_row = _grown(self._series_of_row, end, 0)
        codes = np.empty(n, np.int32)
        scodes = np.empty(n, np.int32)
        for j, (c, s, src) in enumerate(rows):
            code = self._code.get(c)
            if code is None:
                code = self._code[c] = len(self.names)
                self.names.append(c)
            sc = self._series_code.get(s)
            if sc is None:
                sc = self._series_code[s] = len(self._series_names)
                self._series_names.append(s)
            codes[j], scodes[j] = code, sc
            ids = self.members.get(c)
            if ids is None:
                ids = self.members[c] = array("q")
                self.series[c] = s
            ids.append(first_id + j)
            self._src += src.encode("utf-8")
            self._src_end.append(len(self._src))
        self.owner[first_id:end] = codes
        self._series_of_row[first_id:end] = scodes
        self._live += n

    def remove(self, character: str) -> np.ndarray:
        """Drop every row of `character`; returns their ids (empty when it has none)."""
        ids = self.members.pop(character, None)
        self.series.pop(character, None)
        if ids is None:
            return np.zeros(0, np.int64)
        out = np.frombuffer(ids, np.int64).copy()
        self.owner[out] = -1
        self._live -= len(out)
        return out

    # -- reading -----------------------------------------------------------------------------------
    @property
    def next_id(self) -> int:
        return len(self._src_end)

    def __len__(self) -> int:
        return self._live

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, (int, np.integer)) and 0 <= int(row_id) < self.next_id and self.owner[int(row_id)] >= 0

    def __getitem__(self, row_id: int) -> Row:
        if row_id not in self:
            raise KeyError(row_id)
        i = int(row_id)
        start = self._src_end[i - 1] if i else 0
        return Row(i, self.names[self.owner[i]], self._series_names[self._series_of_row[i]],
                   self._src[start : self._src_end[i]].decode("utf-8"))

    def live_ids(self) -> np.ndarray:
        """Ids of the live rows, ascending."""
        return np.flatnonzero(self.owner[: self.next_id] >= 0).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.live_ids().tolist())

    def member_ids(self, character: str) -> np.ndarray:
        return np.frombuffer(self.members[character], np.int64)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> tuple[Path, str]:
        """Write ``gallery.rows.npz`` atomically; returns it and its SHA-256, hashed as it is written (no read-back)."""
        path = Path(directory) / FILE
        n = self.next_id
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            sink = HashingWriter(fh)
            np.savez(sink, owner=self.owner[:n], series=self._series_of_row[:n], names=np.array(self.names, dtype=np.str_),
                     series_names=np.array(self._series_names, dtype=np.str_), src_end=np.frombuffer(self._src_end, np.int64),
                     src=np.frombuffer(bytes(self._src), np.uint8))
        return path, sink.digest.hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "RowTable":
        """Read a saved table; a damaged file is a one-line `GalleryError`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                owner, series, src_end = z["owner"].astype(np.int32), z["series"].astype(np.int32), z["src_end"].astype(np.int64)
                names, series_names, src = [str(x) for x in z["names"]], [str(x) for x in z["series_names"]], z["src"].tobytes()
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise GalleryError(f"{path} is not a readable row table ({str(exc).splitlines()[0][:120]}); rebuild the gallery") from None
        t = cls()
        t.names, t._code = names, {c: i for i, c in enumerate(names)}
        t._series_names, t._series_code = series_names, {s: i for i, s in enumerate(series_names)}
        t.owner, t._series_of_row = owner.copy(), series.copy()
        t._src_end, t._src = array("q", src_end.tobytes()), bytearray(src)
        live = np.flatnonzero(owner >= 0)
        order = np.argsort(owner[live], kind="stable")  # ids grouped by character, in id order within one
        bounds = np.searchsorted(owner[live[order]], np.arange(len(names) + 1))
        for code, name in enumerate(names):
            ids = live[order[bounds[code] : bounds[code + 1]]]
            if len(ids):
                t.members[name] = array("q", ids.astype(np.int64).tobytes())
                t.series[name] = series_names[series[ids[0]]]
        t._live = len(live)
        return t

    def skip(self, n: int) -> None:
        """Append `n` removed rows (ids with no live row, as after `remove`)."""
        self.owner = _grown(self.owner, self.next_id + n, -1)
        self._series_of_row = _grown(self._series_of_row, self.next_id + n, 0)
        self._src_end.extend([len(self._src)] * n)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, object]], next_id: int) -> "RowTable":
        """A table from gallery.json's former row list (``id``, ``character``, ``series``, ``source``; gaps are removed rows)."""
        t = cls()
        for r in sorted(rows, key=lambda r: int(r["id"])):  # type: ignore[call-overload]
            t.skip(int(r["id"]) - t.next_id)  # type: ignore[call-overload]
            t.add(t.next_id, [(str(r["character"]), str(r.get("series", "") or ""), str(r.get("source", "") or ""))])
        t.skip(next_id - t.next_id)
        return t
