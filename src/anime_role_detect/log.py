"""Global logging with loguru: four file sinks plus the console, and a bridge for stdlib `logging`.

Channels: ``system`` (everything), ``inference`` and ``training`` (records bound to that channel)
and ``error`` (level ERROR and above from any channel). Sizes, retention and compression come
from config (`conf/log/default.yaml`); the defaults are the product's policy.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from loguru import logger

CHANNELS = ("system", "inference", "training", "error")


@dataclass
class SinkPolicy:
    """Rotation/retention of one sink (loguru syntax: '100 MB', '7 days')."""

    rotation: str
    retention: str


DEFAULT_POLICIES: dict[str, SinkPolicy] = {
    "system": SinkPolicy("100 MB", "7 days"),
    "inference": SinkPolicy("100 MB", "14 days"),
    "training": SinkPolicy("200 MB", "30 days"),
    "error": SinkPolicy("50 MB", "30 days"),
}


@dataclass
class LogConfig:
    """Where and how to log; mirrors `conf/log/default.yaml`."""

    dir: str = "logs"
    level: str = "INFO"
    console_level: str = "INFO"
    compression: str | None = "zip"
    sinks: dict[str, SinkPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    intercept_stdlib: bool = True
    enqueue: bool = False

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "LogConfig":
        """Build from a (Hydra/OmegaConf or plain) mapping, keeping defaults for absent keys."""
        if cfg is None:
            return cls()
        cfg = dict(cfg)
        sinks = dict(DEFAULT_POLICIES)
        for name, pol in dict(cfg.pop("sinks", {}) or {}).items():
            if name not in CHANNELS:
                from .errors import ConfigError

                raise ConfigError(f"log.sinks.{name}: unknown sink; choose from {', '.join(CHANNELS)}")
            pol = dict(pol)
            sinks[name] = SinkPolicy(str(pol.get("rotation", sinks[name].rotation)), str(pol.get("retention", sinks[name].retention)))
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        return cls(sinks=sinks, **known)


class InterceptHandler(logging.Handler):
    """Send stdlib `logging` records (Lightning, uvicorn, ultralytics...) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - exercised via libraries
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        channel = "training" if record.name.startswith(("lightning", "pytorch_lightning", "torch")) else "system"
        message = record.getMessage()
        chatter = record.levelno < logging.WARNING and (record.name.startswith(_CHATTER_LOGGERS)
                                                        or message.startswith(_CHATTER_PREFIXES))
        logger.bind(channel=channel, source=record.name, file_only=chatter).opt(depth=depth, exception=record.exc_info).log(
            level, message
        )


#: stdlib loggers whose records below WARNING go to the log files only: faiss reports each SIMD build it could not
#: load as an INFO line holding a ModuleNotFoundError, which reads like a failure on a user's console
_CHATTER_LOGGERS = ("faiss.loader",)
#: the same for records that start so: Lightning's advertisement for an add-on package at every fit
_CHATTER_PREFIXES = ("💡 Tip:",)


_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level:<7} | {extra[channel]:<9} | {name}:{function}:{line} - {message}"
_configured: dict[str, Any] = {}


def _channel_filter(channel: str):
    def _filter(record: dict) -> bool:
        return record["extra"].get("channel", "system") == channel

    return _filter


#: ``logger.bind(**FILE_ONLY)``: a record for the log files, not the console (a line per batch would break up the
#: progress bar of a folder of 100,000 pictures and bury the warnings)
FILE_ONLY = {"file_only": True}


def _console_filter(record: dict) -> bool:
    return not record["extra"].get("file_only", False)


def setup_logging(cfg: Mapping[str, Any] | LogConfig | None = None) -> Path:
    """Install the console and four file sinks (idempotent per log dir). Returns the log folder."""
    conf = cfg if isinstance(cfg, LogConfig) else LogConfig.from_mapping(cfg)
    log_dir = Path(conf.dir).expanduser().resolve()
    key = f"{log_dir}|{conf}"
    if _configured.get("key") == key:
        return log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.configure(extra={"channel": "system"})
    logger.add(sys.stderr, level=conf.console_level, format="<level>{level:<7}</level> | {message}", colorize=None,
               filter=_console_filter)
    common = dict(format=_FORMAT, compression=conf.compression, enqueue=conf.enqueue, encoding="utf-8", backtrace=False)
    sysp, errp = conf.sinks["system"], conf.sinks["error"]
    logger.add(log_dir / "system.log", level=conf.level, rotation=sysp.rotation, retention=sysp.retention, **common)
    for channel in ("inference", "training"):
        pol = conf.sinks[channel]
        logger.add(
            log_dir / f"{channel}.log",
            level=conf.level,
            rotation=pol.rotation,
            retention=pol.retention,
            filter=_channel_filter(channel),
            **common,
        )
    logger.add(log_dir / "error.log", level="ERROR", rotation=errp.rotation, retention=errp.retention, **common)
    if conf.intercept_stdlib:
        logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "uvicorn", "uvicorn.error", "uvicorn.access"):
            lg = logging.getLogger(name)
            lg.handlers = [InterceptHandler()]
            lg.propagate = False
    _configured["key"], _configured["conf"] = key, conf
    return log_dir


def current_log_config() -> LogConfig | None:
    """The settings `setup_logging` last installed (a child process of this one logs the same way), or None."""
    return _configured.get("conf")


def get_logger(channel: str = "system"):
    """A loguru logger bound to one channel ('system', 'inference', 'training')."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown log channel {channel!r}; choose from {CHANNELS}")
    return logger.bind(channel=channel)


system_log = get_logger("system")
training_log = get_logger("training")
