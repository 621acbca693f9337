"""A saved gallery's files: the Faiss index, the row table and ``gallery.json``, written and read back with checks.

``gallery.json`` is written last and records the SHA-256 of the index and of the row file, so a save that died
half-way, or a file edited by hand, is a one-line `GalleryError` at load instead of a wrong answer later.
`Gallery.save` / `Gallery.load` assemble the gallery; this module owns the bytes on disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import faiss

from ..errors import GalleryError
from ..fsutil import HashingWriter, atomic_path, file_sha256, read_json
from ..versionfiles import GALLERY_INDEX, GALLERY_META
from .rows import FILE as ROWS_FILE
from .rows import RowTable

INDEX_FILE = GALLERY_INDEX  # the names a version folder's contract gives them (versionfiles)
META_FILE = GALLERY_META
FORMAT_VERSION = 1


def write_index(index: faiss.Index, path: Path) -> str:
    """Write `index` to `path` (write-then-rename, streamed: no second copy of a big index in memory); its SHA-256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        sink = HashingWriter(fh)
        faiss.write_index(index, faiss.PyCallbackIOWriter(sink.write))
    return sink.digest.hexdigest()


def read_meta(d: Path) -> tuple[dict[str, Any], Path, Path]:
    """``gallery.json`` of the gallery in `d` with its path and the index's; a missing or unreadable one is a `GalleryError`."""
    meta_p, index_p = d / META_FILE, d / INDEX_FILE
    if not meta_p.is_file() or not index_p.is_file():
        raise GalleryError(f"no gallery in {d} ({META_FILE} + {INDEX_FILE} expected); build one with `ard-gallery build`")
    try:
        meta = read_json(meta_p)
        emb = meta["embedder"]
        if not isinstance(emb, Mapping) or "id" not in emb or int(emb["dim"]) <= 0:
            raise ValueError("no embedder id and dimension")
    except (ValueError, KeyError, TypeError) as exc:
        raise GalleryError(f"{meta_p} is corrupt ({exc}); rebuild the gallery") from None
    return meta, meta_p, index_p


def read_rows(d: Path, meta: Mapping[str, Any], meta_p: Path) -> RowTable:
    """The rows `gallery.json` names: its row file (checked against the recorded hash), or the row list it held before."""
    entry = meta.get("rows")
    if isinstance(entry, list):  # saved before the row file: one JSON object per row
        return RowTable.from_rows(entry, int(meta.get("next_id", max((int(r["id"]) for r in entry), default=-1) + 1)))
    if not isinstance(entry, Mapping):
        raise GalleryError(f"{meta_p} lists no rows; rebuild the gallery")
    path = d / str(entry.get("file", ROWS_FILE))
    if not path.is_file():
        raise GalleryError(f"{path} is missing but {meta_p} names it; copy the whole gallery folder or rebuild it")
    if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
        raise GalleryError(f"{path} does not match {meta_p} (interrupted save or edited file); rebuild the gallery")
    table = RowTable.load(path)
    next_id = int(meta.get("next_id", table.next_id))
    if table.next_id != next_id or len(table) != int(entry.get("rows", len(table))):
        raise GalleryError(f"{path} holds {len(table)} of {table.next_id} row ids but {meta_p} lists {entry.get('rows')} of {next_id}; rebuild the gallery")
    return table


def read_index(index_p: Path, meta_p: Path, sha256: str | None) -> faiss.Index:
    """Read `index_p` once from one open file: check its hash (when recorded), then let Faiss parse it."""
    with open(index_p, "rb") as fh:
        if sha256:
            digest = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            if digest.hexdigest() != sha256:
                raise GalleryError(f"{index_p} does not match {meta_p} (interrupted save or edited file); rebuild the gallery")
            fh.seek(0)
        try:
            return faiss.read_index(faiss.PyCallbackIOReader(fh.read))
        except RuntimeError as exc:
            raise GalleryError(f"{index_p} is not a readable Faiss index ({str(exc).splitlines()[0][:120]}); rebuild the gallery") from None
