"""Append-only, crash-safe feature log: one JSON line per classification plus an embedding shard.

Layout of ``DIR`` (one writer process per segment, so concurrent writers never interleave)::

    DIR/segments/<stamp>-<pid>-<seq>.jsonl   one record per line, the line is the commit point
    DIR/segments/<stamp>-<pid>-<seq>.f32     raw little-endian float32 rows referenced by offset
    DIR/feedback.jsonl                       confirm / correct events, joined to records on read
    DIR/images/<sha[:2]>/<sha>.<fmt>          uploaded images, only when ``store_images`` is on

A record's embedding rows are written *before* its JSON line, and the line carries the byte offset
and a CRC32 of those rows, so a kill at any moment loses at most the record being written (a torn
last line is ignored by readers, rows failing their CRC drop only their record). Durability against
power loss: ``fsync`` with ``fsync_interval_s=0`` syncs every record (~2 fsyncs each); the default
interval of 1 s groups them, so an OS crash can lose up to that last second, a killed process nothing. Segments rotate at ``max_segment_bytes``
(100 MB, the inference-log policy) and are deleted after ``retention_days`` (14).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from ..confutil import dataclass_from_mapping
from ..errors import ConfigError, UserError
from ..fsutil import atomic_write_bytes
from ..imageio import content_hash, sniff
from ..recognition.schema import Answer

FORMAT_VERSION = 1
SEGMENTS = "segments"
FEEDBACK_FILE = "feedback.jsonl"
IMAGES = "images"
OWN_IDS_MAX = 200_000  # ids kept in memory so feedback on recent answers needs no scan of the segments


class FeedbackError(UserError, LookupError):
    """Feedback names a record or image that is not in the feature log."""


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


@dataclass(frozen=True)
class Feedback:
    """A user's verdict on one logged detection: confirmed as logged, or corrected to `role`."""

    role: str
    confirmed: bool
    series: str = ""
    time: float = 0.0


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


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_record_id() -> str:
    """Time-sortable unique id: ``r<ns-hex>-<random>``."""
    return f"r{time.time_ns():x}-{uuid.uuid4().hex[:8]}"


def best_detection_index(detections: list[dict]) -> int | None:
    """Index of the detection the answer's ``role`` comes from (highest similarity), or None."""
    if not detections:
        return None
    return max(range(len(detections)), key=lambda i: float(detections[i].get("similarity", 0.0)))


class _Appender:
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


class FeatureLog:
    """Writer and reader of one feature-log folder; thread-safe, one active segment per process.

    `append` is what the Recognizer's ``feature_sink`` calls; `feedback` is what the service's
    feedback endpoint calls; `read` yields complete records with feedback joined.
    """

    def __init__(self, directory: str | os.PathLike[str], policy: LogPolicy | Mapping[str, Any] | None = None,
                 embedder_id: str = "") -> None:
        self.dir = Path(directory)
        self.policy = policy if isinstance(policy, LogPolicy) else LogPolicy.from_mapping(policy)
        self.embedder_id = embedder_id
        self.segments_dir = self.dir / SEGMENTS
        self._lock = threading.Lock()
        self._seq = 0
        self._jsonl: _Appender | None = None
        self._emb: _Appender | None = None
        self._feedback: _Appender | None = None
        self._own_ids: OrderedDict[str, str] = OrderedDict()  # recent record id -> image hash (bounded), for fast feedback
        self._pid = os.getpid()
        self._local = threading.local()

    @property
    def last_record_id(self) -> str | None:
        """Id of the record this thread appended last (a server returns it with the answer, for feedback)."""
        return getattr(self._local, "last_id", None)

    # -- writing --------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self._seq += 1
        stem = f"{stamp}-{os.getpid()}-{self._seq:04d}"
        self._close_segment()
        # segment files are synced by `append`, rows before their line (see there)
        self._emb = _Appender(self.segments_dir / f"{stem}.f32", False, self.policy.fsync_interval_s)
        self._jsonl = _Appender(self.segments_dir / f"{stem}.jsonl", False, self.policy.fsync_interval_s)
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
            "v": FORMAT_VERSION, "id": rid, "time": _now_iso(), "ts": time.time(), "image_sha256": sha,
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
            self._jsonl.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
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

    def feedback(self, key: str, correct_role: str | None = None, confirmed: bool = False,
                 detection: int | None = None, series: str = "") -> dict:
        """Record a verdict for a record id or an image SHA-256: ``confirmed`` or corrected to `correct_role`.

        `detection` picks the detection (default: the best one). Raises `FeedbackError` if the key is unknown.
        """
        if not confirmed and not correct_role:
            raise FeedbackError("feedback needs confirmed=true or a correct_role (the character it really is)")
        if correct_role is not None and not str(correct_role).strip():
            raise FeedbackError("correct_role is empty; give the character's name")
        by = self._key_kind(key)
        if by is None:
            raise FeedbackError(f"no logged classification with record id or image hash {key!r} in {self.dir}; "
                                "send the record_id returned with the answer")
        event = {"time": _now_iso(), "ts": time.time(), by: key, "confirmed": bool(confirmed) and not correct_role,
                 "correct_role": (correct_role or "").strip() or None, "series": series, "detection": detection}
        with self._lock:
            if self._feedback is None or self._pid != os.getpid():
                self.dir.mkdir(parents=True, exist_ok=True)
                self._feedback = _Appender(self.dir / FEEDBACK_FILE, self.policy.fsync)  # verdicts are rare: always synced
            self._feedback.write((json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
        return event

    def _key_kind(self, key: str) -> str | None:
        """'id' or 'image_sha256' when `key` names a logged record: this process's recent ids, else a scan.

        The scan goes newest segment first and parses only lines containing the key's bytes, so
        feedback on an answer another worker logged stays cheap on a large log.
        """
        if not key:
            return None
        if key in self._own_ids:
            return "id"
        if key in self._own_ids.values():
            return "image_sha256"
        needle = key.encode("utf-8")
        for seg in reversed(self.segment_paths()):
            try:
                blob = seg.read_bytes()
            except FileNotFoundError:
                continue
            start = blob.find(needle)
            while start != -1:
                line_start = blob.rfind(b"\n", 0, start) + 1
                line_end = blob.find(b"\n", start)
                if line_end == -1:
                    break  # an uncommitted last line
                try:
                    d = json.loads(blob[line_start:line_end])
                except ValueError:
                    d = {}
                if d.get("id") == key:
                    return "id"
                if d.get("image_sha256") == key:
                    return "image_sha256"
                start = blob.find(needle, line_end)
        return None

    def close(self) -> None:
        """Close open files (appends reopen them)."""
        with self._lock:
            self._close_segment()
            if self._feedback is not None:
                self._feedback.close()
                self._feedback = None

    def __enter__(self) -> "FeatureLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- retention ------------------------------------------------------------------------------
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
        removed += self._prune_feedback(cutoff)
        return removed

    def _prune_feedback(self, cutoff: float) -> int:
        """Rewrite ``feedback.jsonl`` without events older than the cutoff (atomic; rare)."""
        path = self.dir / FEEDBACK_FILE
        events = list(_read_jsonl(path))
        keep = [e for e in events if float(e.get("ts", 0)) >= cutoff]
        if len(keep) == len(events):
            return 0
        if self._feedback is not None:
            self._feedback.close()
            self._feedback = None
        atomic_write_bytes(path, "".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n" for e in keep).encode())
        return len(events) - len(keep)

    # -- reading --------------------------------------------------------------------------------
    def segment_paths(self) -> list[Path]:
        """JSON-lines segments, oldest first."""
        if not self.segments_dir.is_dir():
            return []
        return sorted(self.segments_dir.glob("*.jsonl"))

    def _iter_json(self) -> Iterator[dict]:
        for seg in self.segment_paths():
            yield from _read_jsonl(seg)

    def read_feedback(self) -> list[dict]:
        """All feedback events, oldest first (a torn last line is skipped)."""
        return list(_read_jsonl(self.dir / FEEDBACK_FILE))

    def read(self, embeddings: bool = True, since: float | None = None, embedder: str | None = None) -> Iterator[LogRecord]:
        """Yield complete records, oldest first, with feedback joined (by record id, else image hash).

        With `embedder` given, rows are loaded only for that embedder's records (others come without).
        Safe while writers append: lines without their newline yet are not yielded, and a record
        whose embedding rows fail their CRC is skipped (counted in `corrupt`).
        """
        joined = join_feedback(self.read_feedback())
        self.corrupt = 0
        for seg in self.segment_paths():
            for data in _read_jsonl(seg):
                if since is not None and float(data.get("ts", 0)) < since:
                    continue
                wanted = embeddings and (embedder is None or data.get("embedder") == embedder)
                emb = self._load_embeddings(seg.parent, data) if wanted else np.zeros((0, 0), np.float32)
                if emb is None:
                    self.corrupt += 1
                    continue
                yield LogRecord(data=data, embeddings=emb, feedback=feedback_for(data, joined), segment=seg.name)

    @staticmethod
    def _load_embeddings(folder: Path, data: dict) -> np.ndarray | None:
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

    def image_path(self, record: LogRecord) -> Path | None:
        """Stored image of a record, when images were stored and are still retained."""
        rel = record.data.get("image")
        p = self.dir / rel if rel else None
        return p if p is not None and p.is_file() else None


def _read_jsonl(path: Path) -> Iterator[dict]:
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


def join_feedback(events: Iterable[dict]) -> dict[str, dict[int | None, Feedback]]:
    """Latest verdict per (record id or ``sha:<hash>``, detection index)."""
    out: dict[str, dict[int | None, Feedback]] = {}
    for e in events:
        key = e.get("id") or (f"sha:{e['image_sha256']}" if e.get("image_sha256") else None)
        if key is None:
            continue
        fb = Feedback(role=e.get("correct_role") or "", confirmed=bool(e.get("confirmed")), series=e.get("series") or "",
                      time=float(e.get("ts", 0.0)))
        out.setdefault(key, {})[e.get("detection")] = fb
    return out


def feedback_for(data: dict, joined: Mapping[str, Mapping[int | None, Feedback]]) -> dict[int, Feedback]:
    """Verdicts of one record per detection index; record-id feedback overrides image-hash feedback."""
    dets = data.get("detections", [])
    best = best_detection_index(dets)
    out: dict[int, Feedback] = {}
    for key in (f"sha:{data.get('image_sha256')}" if data.get("image_sha256") else None, data.get("id")):
        for det, fb in (joined.get(key, {}) if key else {}).items():
            idx = best if det is None else int(det)
            if idx is None or idx >= len(dets):
                continue
            if fb.confirmed and not fb.role:
                fb = Feedback(role=dets[idx].get("role", ""), confirmed=True, series=dets[idx].get("series", ""), time=fb.time)
            out[idx] = fb
    return out


class FeatureLogSink:
    """The Recognizer's answer sink that appends to a `FeatureLog` (`recognition.sinks.AnswerSink`).

    Bound to one recognizer, whose embedder id it records; uploads are stored when the policy says
    ``store_images``. A write that fails (disk full) is logged and never fails the answer.
    """

    def __init__(self, log: FeatureLog) -> None:
        self.log = log
        self._embedder_id: Callable[[], str] | None = None

    def bind(self, recognizer: Any) -> None:
        self._embedder_id = lambda: str(recognizer.embedder.model_id)

    def __call__(self, answer: Answer, embeddings: np.ndarray, image_bytes: bytes | None = None) -> None:
        embedder_id = self._embedder_id() if self._embedder_id is not None else None
        try:
            self.log.append(answer, embeddings, image_bytes=image_bytes, embedder_id=embedder_id)
        except OSError as exc:
            from ..log import system_log

            system_log.error(f"feature log {self.log.dir}: could not append ({exc})")

    def close(self) -> None:
        self.log.close()


def sink_from_config(cfg: Mapping[str, Any] | None) -> FeatureLogSink | None:
    """The feature-log sink an entry point adds to its recognizer (``enabled``, ``dir``, ``policy``), or None when disabled."""
    c = dict(cfg or {})
    if not c.get("enabled", False):
        return None
    if not c.get("dir"):
        raise ConfigError("feature_log.dir is empty; set a folder or feature_log.enabled=false")
    return FeatureLogSink(FeatureLog(c["dir"], c.get("policy") or {}))


def attach_from_config(cfg: Mapping[str, Any] | None) -> Callable[[Any], Callable[[], None] | None]:
    """Hook for entry points: add the feature-log sink of ``cfg`` to a Recognizer; returns the log's closer (None when disabled)."""

    def hook(recognizer: Any) -> Callable[[], None] | None:
        sink = sink_from_config(cfg)
        if sink is None:
            return None
        recognizer.add_sink(sink)
        return sink.close

    return hook
