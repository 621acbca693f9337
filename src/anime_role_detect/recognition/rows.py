"""A gallery's rows as columns: character and series codes per row id, source texts in one buffer.

A dict of one `Row` object per row cost 183 bytes a row (1.8 GB at 10M rows; benchmarks/gallery_rows.py)
and loading its JSON list built a dict per row on top. `RowTable` keeps 4 + 4 bytes per row (character and
series codes) plus each character's row ids (4 bytes a row) and the sources' UTF-8 bytes with their ends,
makes `Row` objects on demand, and saves as ``gallery.rows.npz`` (plain arrays: loading creates no object per
row). A big table (`MAP_MIN_ROWS`) maps the saved sources from the file instead of reading them: they are
read only for the rows an answer shows, so a 10M-row gallery does not hold 0.3 GB of file names.
"""

from __future__ import annotations

import struct
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


#: Tables of at least this many rows map their sources from gallery.rows.npz (`RowTable.load`); smaller ones read them.
MAP_MIN_ROWS = 1_000_000
_MAX_ROWS = 2**31 - 1  # member ids are int32


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """Array `name` of an uncompressed .npz, memory-mapped read-only; None when it is compressed or empty."""
    info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)  # the member's local header: its name and extra field follow, then the .npy bytes
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran or len(shape) != 1 or not shape[0] or dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _grown(a: np.ndarray, size: int, fill: int) -> np.ndarray:
    if len(a) >= size:
        return a
    out = np.full(max(size, 2 * len(a), 1024), fill, a.dtype)
    out[: len(a)] = a
    return out


class RowTable(MappingABC):
    """Row id -> `Row` (a read-only mapping of the live rows, ids ascending) for ids ``0 .. next_id - 1``; a removed
    row keeps its source bytes with owner -1. Sources of the rows loaded from a file stay in the arrays read (or
    mapped) from it; rows added since go to an in-memory tail."""

    def __init__(self) -> None:
        self.names: list[str] = []  # character code -> name
        self._code: dict[str, int] = {}
        self.owner = np.full(0, -1, np.int32)  # row id -> character code; -1: no live row (grows by doubling)
        self._series_of_row = np.zeros(0, np.int32)
        self._series_names: list[str] = [""]
        self._series_code: dict[str, int] = {"": 0}
        self._base_end = np.zeros(0, np.int64)  # loaded rows: row id -> end of its source in `_base_src`
        self._base_src = np.zeros(0, np.uint8)  # (both mapped from the file for a big table)
        self._src_end = array("q")  # rows added after loading: end of each source in `_src` (start: the previous end)
        self._src = bytearray()
        self.members: dict[str, array] = {}  # character -> its live row ids (int32), in id order
        self.series: dict[str, str] = {}  # character -> its series (the first row's)
        self._live = 0

    # -- editing -----------------------------------------------------------------------------------
    def add(self, first_id: int, rows: Sequence[tuple[str, str, str]]) -> None:
        """``(character, series, source)`` rows as ids `first_id`, `first_id + 1`, ... (ids follow on from the last one added)."""
        n = len(rows)
        if first_id != self.next_id:
            raise GalleryError(f"row id {first_id} added after {self.next_id} rows; rebuild the gallery")
        end = first_id + n
        if end > _MAX_ROWS:
            raise GalleryError(f"{end:,} rows is over the {_MAX_ROWS:,} one gallery holds; split it into several galleries")
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
                ids = self.members[c] = array("i")
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
        out = np.frombuffer(ids, np.int32).astype(np.int64)
        self.owner[out] = -1
        self._live -= len(out)
        return out

    # -- reading -----------------------------------------------------------------------------------
    @property
    def next_id(self) -> int:
        return len(self._base_end) + len(self._src_end)

    def __len__(self) -> int:
        return self._live

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, (int, np.integer)) and 0 <= int(row_id) < self.next_id and self.owner[int(row_id)] >= 0

    def __getitem__(self, row_id: int) -> Row:
        if row_id not in self:
            raise KeyError(row_id)
        i = int(row_id)
        return Row(i, self.names[self.owner[i]], self._series_names[self._series_of_row[i]], self._source(i))

    def _source(self, i: int) -> str:
        b = len(self._base_end)
        if i < b:
            start = int(self._base_end[i - 1]) if i else 0
            return bytes(self._base_src[start : int(self._base_end[i])]).decode("utf-8")
        j = i - b
        return self._src[self._src_end[j - 1] if j else 0 : self._src_end[j]].decode("utf-8")

    def live_ids(self) -> np.ndarray:
        """Ids of the live rows, ascending."""
        return np.flatnonzero(self.owner[: self.next_id] >= 0).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.live_ids().tolist())

    def member_ids(self, character: str) -> np.ndarray:
        return np.frombuffer(self.members[character], np.int32).astype(np.int64)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> tuple[Path, str]:
        """Write ``gallery.rows.npz`` atomically; returns it and its SHA-256, hashed as it is written (no read-back)."""
        path = Path(directory) / FILE
        n = self.next_id
        src_end, src = self._base_end, self._base_src  # as loaded (mapped or read): no copy unless rows were added
        if len(self._src_end):
            base_len = int(self._base_end[-1]) if len(self._base_end) else 0
            src_end = np.concatenate([src_end, np.frombuffer(self._src_end, np.int64) + base_len])
            src = np.concatenate([src, np.frombuffer(bytes(self._src), np.uint8)])
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            sink = HashingWriter(fh)
            np.savez(sink, owner=self.owner[:n], series=self._series_of_row[:n], names=np.array(self.names, dtype=np.str_),
                     series_names=np.array(self._series_names, dtype=np.str_), src_end=src_end, src=src)
        return path, sink.digest.hexdigest()

    @classmethod
    def load(cls, path: str | Path, map_min_rows: int | None = None) -> "RowTable":
        """Read a saved table (its sources mapped from the file from `map_min_rows` rows, default `MAP_MIN_ROWS`); a
        damaged file is a one-line `GalleryError`."""
        map_min_rows = MAP_MIN_ROWS if map_min_rows is None else map_min_rows
        try:
            with np.load(path, allow_pickle=False) as z:
                owner, series = z["owner"].astype(np.int32, copy=False), z["series"].astype(np.int32, copy=False)
                names, series_names = [str(x) for x in z["names"]], [str(x) for x in z["series_names"]]
                src_end = src = None
                if len(owner) >= map_min_rows:
                    src_end, src = _npz_member(Path(path), z.zip, "src_end"), _npz_member(Path(path), z.zip, "src")
                if src_end is None or src is None:  # small, compressed or empty: read
                    src_end, src = z["src_end"], z["src"]
                src_end, src = src_end.astype(np.int64, copy=False), src.astype(np.uint8, copy=False)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise GalleryError(f"{path} is not a readable row table ({str(exc).splitlines()[0][:120]}); rebuild the gallery") from None
        if len(src_end) != len(owner) or len(series) != len(owner) or (len(src_end) and int(src_end[-1]) != len(src)):
            raise GalleryError(f"{path} is not a readable row table (its columns disagree in length); rebuild the gallery")
        t = cls()
        t.names, t._code = names, {c: i for i, c in enumerate(names)}
        t._series_names, t._series_code = series_names, {s: i for i, s in enumerate(series_names)}
        t.owner, t._series_of_row = owner, series
        t._base_end, t._base_src = src_end, src
        live = np.flatnonzero(owner >= 0)
        order = np.argsort(owner[live], kind="stable")  # ids grouped by character, in id order within one
        bounds = np.searchsorted(owner[live[order]], np.arange(len(names) + 1))
        for code, name in enumerate(names):
            ids = live[order[bounds[code] : bounds[code + 1]]]
            if len(ids):
                t.members[name] = array("i", ids.astype(np.int32).tobytes())
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
