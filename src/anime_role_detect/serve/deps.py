"""Dependency-injected singletons: settings, the live recognizer, the feature log, workflow jobs, auth.

`create_app` builds one `Services` and keeps it on ``app.state.services``; routes ask for what they
need with ``Depends(...)``, so tests and other apps can hand in their own instances.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..log import get_logger
from .batching import MicroBatcher
from .errors import ApiError
from .live import LiveRecognizer, Loaded
from .settings import ServeSettings
from .workflows import WorkflowManager

_log = get_logger("inference")
T = TypeVar("T")


@dataclass
class Services:
    """The process-wide objects one app instance uses."""

    settings: ServeSettings
    live: LiveRecognizer
    workflows: WorkflowManager | None
    feature_log: Any | None = None
    limiter: anyio.CapacityLimiter | None = None
    #: gathers concurrent single-image classify requests into one recognizer call; None = batching off
    batcher: MicroBatcher | None = None
    decode_limiter: anyio.CapacityLimiter | None = None
    started_at: float = 0.0
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "answers": 0, "errors": 0})

    def capacity(self) -> anyio.CapacityLimiter:
        """Threads allowed to run model work at once (created lazily inside the event loop)."""
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(self.settings.limits.inference_threads)
        return self.limiter

    def decode_capacity(self) -> anyio.CapacityLimiter:
        """Threads decoding uploads for the batcher: apart from the model threads, so images are ready to join
        the next batch while a batch runs; as many as one batch holds (bounds decoded pixels in memory)."""
        if self.decode_limiter is None:
            self.decode_limiter = anyio.CapacityLimiter(max(self.settings.limits.inference_threads, self.settings.batching.max_batch))
        return self.decode_limiter

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking model work in the model worker threads (no timeout of its own; see `run_model`)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.capacity(), abandon_on_cancel=True)


def get_services(request: Request) -> Services:
    """The app's `Services` (settings are `services.settings`)."""
    return request.app.state.services


def get_live(services: Annotated[Services, Depends(get_services)]) -> Loaded:
    """The recognizer serving this request; 503 with the reason when none is loaded."""
    loaded = services.live.current()
    if loaded is None:
        raise ApiError(503, "no recognizer is loaded yet", services.live.last_error, headers={"Retry-After": "10"})
    return loaded


def get_workflows(services: Annotated[Services, Depends(get_services)]) -> WorkflowManager:
    if services.workflows is None:
        raise ApiError(404, "the workflow API is disabled on this server", "set workflow.enabled=true in serve.yaml")
    return services.workflows


def get_feature_log(services: Annotated[Services, Depends(get_services)]) -> Any:
    if services.feature_log is None:
        raise ApiError(404, "feedback is disabled: this server keeps no feature log", "set feature_log.enabled=true in serve.yaml")
    return services.feature_log


_bearer = HTTPBearer(auto_error=False, description="Bearer token from `auth.token` in serve.yaml (only when one is set).")


def require_token(
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Guard for mutating endpoints: when `auth.token` is set, demand ``Authorization: Bearer <token>``."""
    token = services.settings.auth.token
    if not token:
        return
    if credentials is None:
        raise ApiError(401, "this endpoint needs a token: send 'Authorization: Bearer <token>'", None,
                       headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(403, "the bearer token is wrong; use the token from the server's auth.token", None)


@contextlib.contextmanager
def request_deadline(services: Services) -> Iterator[None]:
    """Bound everything awaited inside by the request timeout: past it the work is dropped and the answer is 503."""
    timeout = services.settings.limits.request_timeout_s
    try:
        with anyio.fail_after(timeout):
            yield
    except TimeoutError:
        _log.warning(f"model work over the {timeout:.0f}s request timeout")
        raise ApiError(503, f"the request took longer than {timeout:.0f}s and was stopped; retry with a smaller file",
                       {"timeout_s": timeout}, headers={"Retry-After": "5"}) from None


async def run_model(services: Services, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking model work in the worker threads, bounded by the request timeout (503 after it)."""
    with request_deadline(services):
        return await services.to_thread(fn, *args)


@contextlib.contextmanager
def reading(loaded: Loaded) -> Iterator[Any]:
    """Use the recognizer for reading (searching); many at once."""
    with loaded.lock.read():
        yield loaded.recognizer


@contextlib.contextmanager
def writing(loaded: Loaded) -> Iterator[Any]:
    """Use the recognizer for changing its gallery; alone."""
    with loaded.lock.write():
        yield loaded.recognizer


ServicesDep = Annotated[Services, Depends(get_services)]
LiveDep = Annotated[Loaded, Depends(get_live)]
WorkflowsDep = Annotated[WorkflowManager, Depends(get_workflows)]
FeatureLogDep = Annotated[Any, Depends(get_feature_log)]
