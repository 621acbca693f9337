"""Log fusion: every classification is logged with its features; `fuse` builds a better version from the logs."""

from .featurelog import FeatureLog, Feedback, FeedbackError, LogPolicy, LogRecord

__all__ = ["FeatureLog", "Feedback", "FeedbackError", "LogPolicy", "LogRecord"]
