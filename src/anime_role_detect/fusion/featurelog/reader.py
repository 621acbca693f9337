"""Reading a feature-log folder back: complete records in order, their CRC-checked embedding rows, verdicts joined.

Safe while writers append: a line without its newline yet is not yielded, and a record whose
rows fail their CRC is skipped and counted in `corrupt`.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .feedback import Feedback, feedback_for, join_feedback
from .files import FEEDBACK_FILE, SEGMENTS, read_jsonl


@dataclass
class LogRecord:
    """One logged classification as read back: the JSON fields, its embeddings and joined feedback."""

    data: dict
    embeddings: np.ndarray
    feedback: dict[int, Feedback] = field(default_factory=dict)  # detection index -> latest verdict
    segment: str = ""

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def image_sha256(self) -> str:
        return self.data.get("image_sha256", "")

    @property
    def embedder(self) -> str:
        return self.data.get("embedder", "")

    @property
    def detections(self) -> list[dict]:
        return self.data.get("detections", [])

    @property
    def time(self) -> float:
        return float(self.data.get("ts", 0.0))


class LogReader:
    """Reader of one feature-log folder (what fusion needs); `FeatureLog` adds the writing side."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.segments_dir = self.dir / SEGMENTS
        self.corrupt = 0  # records of the last `read` skipped because their rows failed the CRC

    def segment_paths(self) -> list[Path]:
        """JSON-lines segments, oldest first."""
        if not self.segments_dir.is_dir():
            return []
        return sorted(self.segments_dir.glob("*.jsonl"))

    def read_feedback(self) -> list[dict]:
        """All feedback events, oldest first (a torn last line is skipped)."""
        return list(read_jsonl(self.dir / FEEDBACK_FILE))

    def read(self, embeddings: bool = True, since: float | None = None, embedder: str | None = None) -> Iterator[LogRecord]:
        """Yield complete records, oldest first, with feedback joined (by record id, else image hash).

        With `embedder` given, rows are loaded only for that embedder's records (others come without).
        """
        joined = join_feedback(self.read_feedback())
        self.corrupt = 0
        for seg in self.segment_paths():
            for data in read_jsonl(seg):
                if since is not None and float(data.get("ts", 0)) < since:
                    continue
                wanted = embeddings and (embedder is None or data.get("embedder") == embedder)
                emb = load_embeddings(seg.parent, data) if wanted else np.zeros((0, 0), np.float32)
                if emb is None:
                    self.corrupt += 1
                    continue
                yield LogRecord(data=data, embeddings=emb, feedback=feedback_for(data, joined), segment=seg.name)

    def image_path(self, record: LogRecord) -> Path | None:
        """Stored image of a record, when images were stored and are still retained."""
        rel = record.data.get("image")
        p = self.dir / rel if rel else None
        return p if p is not None and p.is_file() else None


def load_embeddings(folder: Path, data: dict) -> np.ndarray | None:
    """A record's embedding rows from its segment's ``.f32`` file; None when missing or failing the CRC."""
    meta = data.get("emb") or {}
    rows, dim = int(meta.get("rows", 0)), int(meta.get("dim", 0))
    if rows == 0:
        return np.zeros((0, dim), np.float32)
    nbytes = rows * dim * 4
    try:
        with open(folder / meta["file"], "rb") as fh:
            fh.seek(int(meta["offset"]))
            blob = fh.read(nbytes)
    except (OSError, KeyError):
        return None
    if len(blob) != nbytes or zlib.crc32(blob) != int(meta.get("crc32", -1)):
        return None
    return np.frombuffer(blob, dtype="<f4").reshape(rows, dim).astype(np.float32)
