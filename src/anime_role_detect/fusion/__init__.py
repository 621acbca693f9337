"""Log fusion — every answer logged with its features, `fuse` builds a better version from the logs; imports base, registry, data, training, recognition.

Modules: `featurelog/` (the log), `selection`, `evaluation`, `report`, `finetune` and `fuse` (the run).
May import the base layer, `data`, `recognition`, `training` (fine-tuning) and `registry`; only entry
points and the service import fusion.
"""

from .featurelog import FeatureLog, FeatureLogSink, Feedback, FeedbackError, LogPolicy, LogRecord

__all__ = ["FeatureLog", "FeatureLogSink", "Feedback", "FeedbackError", "LogPolicy", "LogRecord"]
