"""Users' verdicts on logged answers: ``feedback.jsonl`` (append, read, prune) and their join onto records.

A verdict names a record id or an image SHA-256 (then it applies to every logged answer of that
picture) and a detection (default: the best one); the latest verdict wins and record-id feedback
beats image-hash feedback.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ...errors import UserError
from ...fsutil import atomic_write_bytes
from .files import FEEDBACK_FILE, Appender, json_line, now_iso, read_jsonl


class FeedbackError(UserError, LookupError):
    """Feedback names a record or image that is not in the feature log."""


@dataclass(frozen=True)
class Feedback:
    """A user's verdict on one logged detection: confirmed as logged, or corrected to `role`."""

    role: str
    confirmed: bool
    series: str = ""
    time: float = 0.0


def best_detection_index(detections: list[dict]) -> int | None:
    """Index of the detection the answer's ``role`` comes from (highest similarity), or None."""
    if not detections:
        return None
    return max(range(len(detections)), key=lambda i: float(detections[i].get("similarity", 0.0)))


def verdict_event(by: str, key: str, correct_role: str | None, confirmed: bool, detection: int | None, series: str) -> dict:
    """The line ``feedback.jsonl`` records for one verdict (`by` = 'id' or 'image_sha256')."""
    return {"time": now_iso(), "ts": time.time(), by: key, "confirmed": bool(confirmed) and not correct_role,
            "correct_role": (correct_role or "").strip() or None, "series": series, "detection": detection}


def check_verdict(correct_role: str | None, confirmed: bool) -> None:
    """A verdict is a confirmation or a non-empty correction; anything else is a `FeedbackError`."""
    if not confirmed and not correct_role:
        raise FeedbackError("feedback needs confirmed=true or a correct_role (the character it really is)")
    if correct_role is not None and not str(correct_role).strip():
        raise FeedbackError("correct_role is empty; give the character's name")


def find_key(key: str, own_ids: Mapping[str, str], segments: Sequence[Path]) -> str | None:
    """'id' or 'image_sha256' when `key` names a logged record: this process's recent ids, else a scan.

    The scan goes newest segment first and parses only lines containing the key's bytes, so
    feedback on an answer another worker logged stays cheap on a large log.
    """
    if not key:
        return None
    if key in own_ids:
        return "id"
    if key in own_ids.values():
        return "image_sha256"
    needle = key.encode("utf-8")
    for seg in reversed(segments):
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


class FeedbackFile:
    """``DIR/feedback.jsonl``, shared by every writer process: small single appends, always synced (verdicts are rare)."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.path = Path(directory) / FEEDBACK_FILE
        self.fsync = fsync
        self._app: Appender | None = None
        self._pid = os.getpid()

    def append(self, event: dict) -> None:
        """Append one verdict line (the caller holds the log's lock)."""
        if self._app is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._app = Appender(self.path, self.fsync)
            self._pid = os.getpid()
        self._app.write(json_line(event))

    def prune(self, cutoff: float) -> int:
        """Rewrite the file without events older than the cutoff (atomic; rare); returns events removed."""
        events = list(read_jsonl(self.path))
        keep = [e for e in events if float(e.get("ts", 0)) >= cutoff]
        if len(keep) == len(events):
            return 0
        self.close()
        atomic_write_bytes(self.path, b"".join(json_line(e) for e in keep))
        return len(events) - len(keep)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None


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
