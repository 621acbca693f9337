"""Log fusion: every classification is logged with its features (`featurelog`); `fuse` builds a better version from the logs.

Modules: `featurelog/` (the log), `selection`, `evaluation`, `report`, `finetune` and `fuse` (the run).
May import the base layer, `data`, `recognition`, `training` (fine-tuning) and `registry`; only entry
points and the service import fusion.
"""

from .featurelog import FeatureLog, FeatureLogSink, Feedback, FeedbackError, LogPolicy, LogRecord

__all__ = ["FeatureLog", "FeatureLogSink", "Feedback", "FeedbackError", "LogPolicy", "LogRecord"]
