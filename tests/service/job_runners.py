"""Workflow runners for `test_job_process`: importable by name, so a job's own process can load them."""

from __future__ import annotations

import multiprocessing
import os
import time
from types import SimpleNamespace

from anime_role_detect.errors import ConfigError


def finish(cfg, progress):
    """Two stages of progress, then an outcome naming this process and the characters it was given."""
    for i in range(3):
        progress.emit("collect", i, 2, f"image {i}")
    progress.emit("train", 1, 1, "done")
    names = [c["name"] for c in cfg.characters]
    return SimpleNamespace(version_id="v-test", metrics={"accuracy": 0.5}, summary={"pid": os.getpid(), "names": names,
                                                                                "start_method": multiprocessing.get_start_method(),
                                                                                "nice": os.nice(0)})


def refuse(cfg, progress):
    progress.emit("collect", 0, 1)
    raise ConfigError("collector.root is not a folder; set it in serve.yaml")


def crash(cfg, progress):
    progress.emit("train", 0, 1)
    os._exit(3)


def forever(cfg, progress):
    """Emits progress until cancelled."""
    i = 0
    while True:
        progress.emit("train", i, 10**6, f"pid {os.getpid()}")
        i += 1
        time.sleep(0.05)


def deaf(cfg, progress):
    """Never looks at its cancel flag."""
    progress.emit("train", 0, 1, "started")
    time.sleep(600)
