"""Append-only, crash-safe feature log (part of fusion; imports base and recognition.schema/sinks): one JSON line per answer plus embeddings.

Layout of ``DIR`` (one writer process per segment, so concurrent writers never interleave)::

    DIR/segments/<stamp>-<pid>-<seq>.jsonl   one record per line, the line is the commit point
    DIR/segments/<stamp>-<pid>-<seq>.f32     raw little-endian float32 rows referenced by offset
    DIR/feedback.jsonl                       confirm / correct events, joined to records on read
    DIR/images/<sha[:2]>/<sha>.<fmt>          uploaded images, only when ``store_images`` is on

Modules: `files` (on-disk primitives), `feedback` (verdicts), `reader` (records back), `writer`
(`FeatureLog`, `LogPolicy`, the entry points' `sink_from_config`), `sink` (the Recognizer's answer
sink). May import the base layer (errors, fsutil, confutil, imageio, log) and `recognition.schema`.
"""

from .feedback import Feedback, FeedbackError, best_detection_index, feedback_for, join_feedback
from .files import FEEDBACK_FILE, FORMAT_VERSION, IMAGES, SEGMENTS
from .reader import LogReader, LogRecord
from .sink import FeatureLogSink
from .writer import FeatureLog, LogPolicy, new_record_id, sink_from_config

__all__ = [
    "FEEDBACK_FILE", "FORMAT_VERSION", "IMAGES", "SEGMENTS", "FeatureLog", "FeatureLogSink", "Feedback", "FeedbackError",
    "LogPolicy", "LogReader", "LogRecord", "best_detection_index", "feedback_for", "join_feedback",
    "new_record_id", "sink_from_config",
]
