"""Writing a feature-log folder: one JSON line + CRC'd embedding rows per classification, rotation, retention, verdicts.

A record's embedding rows are written *before* its JSON line, and the line carries the byte offset
and a CRC32 of those rows, so a kill at any moment loses at most the record being written.
Durability against power loss: ``fsync`` with ``fsync_interval_s=0`` syncs every record (~2 fsyncs
each); the default interval of 1 s groups them, so an OS crash can lose up to that last second, a
killed process nothing. Segments rotate at ``max_segment_bytes`` (100 MB, the inference-log policy)
and are deleted after ``retention_days`` (14).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ...confutil import dataclass_from_mapping
from ...errors import ConfigError
from ...fsutil import atomic_write_bytes
from ...imageio import content_hash, sniff
from ...recognition.schema import Answer
from .feedback import FeedbackError, FeedbackFile, check_verdict, find_key, verdict_event
from .files import FORMAT_VERSION, IMAGES, Appender, json_line, now_iso
from .reader import LogReader
from .sink import FeatureLogSink

OWN_IDS_MAX = 200_000  # ids kept in memory so feedback on recent answers needs no scan of the segments


@dataclass(frozen=True)
class LogPolicy:
    """Size and privacy controls of a feature log (defaults = the inference-log policy)."""

    max_segment_bytes: int = 100 * 1024 * 1024
    retention_days: float = 14.0
    store_images: bool = False
    fsync: bool = True
    fsync_interval_s: float = 1.0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "LogPolicy":
        """Build from a config mapping; unknown keys are a `ConfigError`."""
        pol = dataclass_from_mapping(cls, cfg, "feature log")
        if pol.max_segment_bytes < 4096 or pol.retention_days <= 0 or pol.fsync_interval_s < 0:
            raise ConfigError("feature log: max_segment_bytes must be >= 4096, retention_days > 0 and fsync_interval_s >= 0")
        return pol


def new_record_id() -> str:
    """Time-sortable unique id: ``r<ns-hex>-<random>``."""
    return f"r{time.time_ns():x}-{uuid.uuid4().hex[:8]}"


class FeatureLog(LogReader):
    """Writer (and reader) of one feature-log folder; thread-safe, one active segment per process.

    `append` is what the Recognizer's answer sink (`FeatureLogSink`) calls; `feedback` is what the
    service's feedback endpoint calls; `read` (from `LogReader`) yields complete records with feedback joined.
    """

    def __init__(self, directory: str | os.PathLike[str], policy: LogPolicy | Mapping[str, Any] | None = None,
                 embedder_id: str = "") -> None:
        super().__init__(directory)
        self.policy = policy if isinstance(policy, LogPolicy) else LogPolicy.from_mapping(policy)
        self.embedder_id = embedder_id
        self._lock = threading.Lock()
        self._seq = 0
        self._jsonl: Appender | None = None
        self._emb: Appender | None = None
        self._feedback = FeedbackFile(self.dir, self.policy.fsync)
        self._own_ids: OrderedDict[str, str] = OrderedDict()  # recent record id -> image hash (bounded), for fast feedback
        self._pid = os.getpid()
        self._local = threading.local()

    @property
    def last_record_id(self) -> str | None:
        """Id of the record this thread appended last (a server returns it with the answer, for feedback)."""
        return getattr(self._local, "last_id", None)

    # -- segments -------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self._seq += 1
        stem = f"{stamp}-{os.getpid()}-{self._seq:04d}"
        self._close_segment()
        # segment files are synced by `append`, rows before their line (see there)
        self._emb = Appender(self.segments_dir / f"{stem}.f32", False, self.policy.fsync_interval_s)
        self._jsonl = Appender(self.segments_dir / f"{stem}.jsonl", False, self.policy.fsync_interval_s)
        self._pid = os.getpid()

    def _close_segment(self) -> None:
        for app in (self._emb, self._jsonl):
            if app is not None:
                if self.policy.fsync:
                    app.sync()
                app.close()
        self._jsonl = self._emb = None

    def _need_rotation(self) -> bool:
        if self._jsonl is None or self._emb is None or self._pid != os.getpid():
            return True  # first write, or a forked worker: never share a segment between processes
        return self._jsonl.size + self._emb.size >= self.policy.max_segment_bytes

    # -- records --------------------------------------------------------------------------------
    def append(self, answer: Answer, embeddings: np.ndarray | None, image_bytes: bytes | None = None,
               embedder_id: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
        """Log one classification (one embedding row per detection); returns the record id.

        The image itself is stored only when the policy's ``store_images`` is on.
        """
        emb = np.zeros((0, 0), np.float32) if embeddings is None else np.asarray(embeddings, dtype="<f4")
        if emb.ndim == 1:
            emb = emb[None, :]
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (detections x dim), got shape {emb.shape}")
        if emb.shape[0] and emb.shape[0] != max(1, len(answer.detections)):
            raise ValueError(f"{emb.shape[0]} embedding rows for {len(answer.detections)} detections; need one row per detection")
        emb = np.ascontiguousarray(emb)
        sha = answer.image_sha256 or (content_hash(image_bytes) if image_bytes else "")
        rid = new_record_id()
        image_rel = self._store_image(sha, image_bytes) if (image_bytes and self.policy.store_images) else None
        record: dict[str, Any] = {
            "v": FORMAT_VERSION, "id": rid, "time": now_iso(), "ts": time.time(), "image_sha256": sha,
            "filename": answer.filename, "mode": answer.mode, "version": answer.version,
            "embedder": embedder_id if embedder_id is not None else self.embedder_id,
            "role": answer.role, "series": answer.series, "similarity": answer.similarity, "unknown": answer.unknown,
            "boxes": answer.boxes, "whole_image": answer.whole_image, "width": answer.width, "height": answer.height,
            "detections": [d.model_dump(include={"box", "detector_score", "role", "series", "similarity", "unknown", "topk", "tags"})
                           for d in answer.detections],
            "image": image_rel, **dict(extra or {}),
        }
        blob = emb.tobytes()
        with self._lock:
            if self._need_rotation():
                self._open_segment()
                self.apply_retention()
            assert self._emb is not None and self._jsonl is not None
            offset = self._emb.write(blob) if blob else self._emb.size
            record["emb"] = {"file": self._emb.path.name, "offset": offset, "rows": int(emb.shape[0]),
                             "dim": int(emb.shape[1]) if emb.shape[0] else 0, "crc32": zlib.crc32(blob)}
            self._jsonl.write(json_line(record))
            if self.policy.fsync and self._jsonl.due():
                self._emb.sync()  # rows reach the disk no later than the line that points at them
                self._jsonl.sync()
            self._own_ids[rid] = sha
            if len(self._own_ids) > OWN_IDS_MAX:
                self._own_ids.popitem(last=False)
        self._local.last_id = rid
        return rid

    def _store_image(self, sha: str, data: bytes) -> str:
        kind = sniff(data)
        ext = kind[1] if kind and kind[0] == "image" else "bin"
        rel = f"{IMAGES}/{sha[:2]}/{sha}.{ext}"
        target = self.dir / rel
        if target.exists():
            os.utime(target)  # retention counts from the latest record that references the image
        else:
            atomic_write_bytes(target, data)
        return rel

    def attach(self, recognizer: Any) -> Any:
        """Log `recognizer`'s answers from now on (adds a `FeatureLogSink` through its declared hook); returns it.

        Call again for each new Recognizer (e.g. after a hot reload): records carry *its* embedder id.
        """
        recognizer.add_sink(FeatureLogSink(self))
        return recognizer

    # -- verdicts -------------------------------------------------------------------------------
    def feedback(self, key: str, correct_role: str | None = None, confirmed: bool = False,
                 detection: int | None = None, series: str = "") -> dict:
        """Record a verdict for a record id or an image SHA-256: ``confirmed`` or corrected to `correct_role`.

        `detection` picks the detection (default: the best one). Raises `FeedbackError` if the key is unknown.
        """
        check_verdict(correct_role, confirmed)
        by = find_key(key, self._own_ids, self.segment_paths())
        if by is None:
            raise FeedbackError(f"no logged classification with record id or image hash {key!r} in {self.dir}; "
                                "send the record_id returned with the answer")
        event = verdict_event(by, key, correct_role, confirmed, detection, series)
        with self._lock:
            self._feedback.append(event)
        return event

    # -- retention and closing ------------------------------------------------------------------
    def apply_retention(self, now: float | None = None) -> int:
        """Delete closed segments (and stored images) older than ``retention_days``; returns files removed."""
        cutoff = (now if now is not None else time.time()) - self.policy.retention_days * 86400
        active = {a.path.name for a in (self._jsonl, self._emb) if a is not None}
        removed = 0
        for root in (self.segments_dir, self.dir / IMAGES):
            if not root.is_dir():
                continue
            for p in root.rglob("*"):
                if p.is_file() and p.name not in active:
                    try:
                        if p.stat().st_mtime < cutoff:
                            p.unlink()
                            removed += 1
                    except FileNotFoundError:
                        continue
        return removed + self._feedback.prune(cutoff)

    def close(self) -> None:
        """Close open files (appends reopen them)."""
        with self._lock:
            self._close_segment()
            self._feedback.close()

    def __enter__(self) -> "FeatureLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- entry points ---------------------------------------------------------------------------------------
def sink_from_config(cfg: Mapping[str, Any] | None) -> FeatureLogSink | None:
    """The feature-log sink an entry point adds to its recognizer (``enabled``, ``dir``, ``policy``), or None when disabled."""
    c = dict(cfg or {})
    if not c.get("enabled", False):
        return None
    if not c.get("dir"):
        raise ConfigError("feature_log.dir is empty; set a folder or feature_log.enabled=false")
    return FeatureLogSink(FeatureLog(c["dir"], c.get("policy") or {}))
