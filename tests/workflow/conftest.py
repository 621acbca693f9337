"""Workflow fixtures: a fake booru on 127.0.0.1 serving synthetic characters, fast HTTP policy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakebooru import FakeBooru, make_posts  # noqa: E402

from anime_role_detect.data.synthetic import make_characters  # noqa: E402

#: Short timeouts and backoff so fault scenarios take well under a second each.
FAST_HTTP = {"timeout_s": 0.5, "retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "rate_limit_per_s": 0}


@pytest.fixture()
def specs():
    return make_characters(3, seed=3, twin_fraction=0.0)


@pytest.fixture()
def booru(specs):
    server = FakeBooru(make_posts(specs, per_character=12, size=96, seed=1), timeout_sleep_s=1.0)
    server.start()
    yield server
    server.stop()
