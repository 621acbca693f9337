"""The feature log's on-disk primitives: folder names, whole-line appends on O_APPEND, tolerant JSON-lines reading.

Shared by the writer, the reader and the feedback file; knows nothing of records or verdicts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

FORMAT_VERSION = 1
SEGMENTS = "segments"
FEEDBACK_FILE = "feedback.jsonl"
IMAGES = "images"


def now_iso() -> str:
    """UTC time with milliseconds, as records and verdicts carry it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def json_line(obj: Any) -> bytes:
    """`obj` as one compact UTF-8 JSON line (what every log file holds)."""
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class Appender:
    """Appends whole lines/blocks to one file with a single ``write`` on an O_APPEND descriptor."""

    def __init__(self, path: Path, fsync: bool, interval_s: float = 0.0) -> None:
        self.path = path
        self.fsync = fsync
        self.interval_s = interval_s
        self.synced_at = 0.0
        self.dirty = False
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self.fd).st_size
        if self.size and os.pread(self.fd, 1, self.size - 1) != b"\n" and path.suffix == ".jsonl":
            self.write(b"\n")  # end a line torn by a killed writer, so the next record starts on its own line

    def write(self, data: bytes) -> int:
        """Append `data`; returns the byte offset it starts at."""
        offset = os.lseek(self.fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.dirty = True
        if self.fsync and self.due():
            self.sync()
        self.size = offset + len(data)
        return offset

    def due(self) -> bool:
        """True when the sync interval has passed since the last sync."""
        return time.monotonic() - self.synced_at >= self.interval_s

    def sync(self) -> None:
        """Flush written bytes to the disk."""
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False
        self.synced_at = time.monotonic()

    def close(self) -> None:
        try:
            if self.fsync:
                self.sync()
            os.close(self.fd)
        except OSError:
            pass


def read_jsonl(path: Path) -> Iterator[dict]:
    """Complete, parseable JSON lines of `path`; a torn or garbled line is skipped, never fatal."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    return  # being written (or torn by a crash): not committed
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    yield obj
    except FileNotFoundError:
        return
