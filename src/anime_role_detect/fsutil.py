"""Crash-safe file writes: write to a temporary sibling, fsync, then rename over the target.

A reader never sees a half-written file, and a process killed mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Serialise `obj` as JSON to `target` atomically."""
    atomic_write_text(target, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_npz(target: str | os.PathLike[str], **arrays: Any) -> None:
    """Save `arrays` as an ``.npz`` at `target` atomically (``np.savez`` streamed into the temporary sibling)."""
    import numpy as np

    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Hard-link `src` to `dst` (no extra disk space; for files never edited in place), copying when linking is not possible."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only file over `fh` that SHA-256-hashes what passes through it, so a file's hash needs no read-back.
    It cannot seek, so `zipfile` (under `np.savez`) streams each member with a trailing descriptor instead of
    seeking back: the bytes hashed are the file's."""

    def __init__(self, fh: io.BufferedWriter) -> None:
        super().__init__()
        self._fh, self._pos, self.digest = fh, 0, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.digest.update(b)
        n = self._fh.write(b)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (config subsets, queries): what a resumable step was run with."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_name(name: str) -> str:
    """A folder-safe version of a name (keeps unicode, drops path separators and control chars)."""
    from .errors import ConfigError

    out = re.sub(r"[\\/:*?\"<>|\x00-\x1f]+", "_", name.strip()).strip(" .")
    if not out:
        raise ConfigError(f"character name {name!r} is empty after removing path characters; give a real name")
    return out
