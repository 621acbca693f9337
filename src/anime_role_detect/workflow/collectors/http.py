"""HTTP for collectors: a rate-limited `requests` session with timeouts and exponential backoff on 429/5xx."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import requests

from ...errors import ConfigError
from ...log import get_logger

_log = get_logger("system")


class FetchError(Exception):
    """A request failed after all retries (reported, not fatal for the run)."""


@dataclass
class HttpPolicy:
    """Timeouts, retries and rate limit for one site (all configuration)."""

    timeout_s: float = 20.0
    retries: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    rate_limit_per_s: float = 2.0
    user_agent: str = "anime_role_detect/0.1 (character dataset collector)"
    max_image_bytes: int = 50 * 1024 * 1024  # larger downloads are abandoned (same limit as decoding)


RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 524})


class HttpClient:
    """`requests` session with a rate limit, timeouts, and exponential backoff on 429/5xx/timeouts."""

    def __init__(self, policy: HttpPolicy, sleep: Callable[[float], None] = time.sleep) -> None:
        self.policy = policy
        self.session = requests.Session()
        self.session.headers["User-Agent"] = policy.user_agent
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self.requests = 0

    def _wait_rate_limit(self) -> None:
        if self.policy.rate_limit_per_s <= 0:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next_slot - now
            self._next_slot = max(now, self._next_slot) + 1.0 / self.policy.rate_limit_per_s
        if wait > 0:
            self._sleep(wait)

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.policy.backoff_max_s, self.policy.backoff_s * (2**attempt))
        if retry_after:
            try:
                delay = min(self.policy.backoff_max_s, max(delay, float(retry_after)))
            except ValueError:
                pass
        return delay

    def _read_capped(self, resp: requests.Response, limit: int) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            resp.close()
            raise FetchError(f"{resp.url}: {int(declared) / 1e6:.1f} MB is over the {limit / 1e6:.0f} MB limit")
        chunks, size = [], 0
        for chunk in resp.iter_content(1 << 16):
            size += len(chunk)
            if size > limit:
                resp.close()
                raise FetchError(f"{resp.url}: more than {limit / 1e6:.0f} MB; skipped")
            chunks.append(chunk)
        return b"".join(chunks)

    def get_bytes(self, url: str) -> bytes:
        """Download a file with the retries of `get`, refusing anything over ``max_image_bytes``."""
        return self._read_capped(self.get(url, stream=True), int(self.policy.max_image_bytes))

    def get(self, url: str, params: Mapping[str, Any] | None = None, stream: bool = False) -> requests.Response:
        """GET with retries; 4xx other than 429 fail at once (401/403 raise `ConfigError`: fix the key)."""
        last = ""
        for attempt in range(self.policy.retries + 1):
            self._wait_rate_limit()
            self.requests += 1
            retry_after = None
            try:
                resp = self.session.get(url, params=params, timeout=self.policy.timeout_s, stream=stream)
            except (requests.Timeout, requests.ConnectionError) as exc:
                last = f"{type(exc).__name__}"
            else:
                if resp.status_code < 400:
                    return resp
                if resp.status_code in (401, 403):
                    raise ConfigError(
                        f"{url}: HTTP {resp.status_code} (access denied); check collector.api_key / collector.login or the base_url"
                    )
                if resp.status_code not in RETRY_STATUS:
                    raise FetchError(f"{url}: HTTP {resp.status_code}")
                last = f"HTTP {resp.status_code}"
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.policy.retries:
                delay = self._backoff(attempt, retry_after)
                _log.warning(f"{url}: {last}; retry {attempt + 1}/{self.policy.retries} in {delay:.1f}s")
                self._sleep(delay)
        raise FetchError(f"{url}: {last} after {self.policy.retries + 1} attempts")


# -- the shared booru loop --------------------------------------------------------------------------
