"""`create_app(cfg)`: the FastAPI application — REST API under /api, web pages at / and /workflow.

Models load once at start-up (lifespan) and run in worker threads, never on the event loop; a
newer registry version is swapped in while in-flight requests finish on the old one. Concurrent
single-image classify requests share recognizer calls through the micro-batcher (serve/batching.py),
started and stopped with the app.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from .. import __version__
from ..log import get_logger
from .batching import MicroBatcher
from .deps import Services
from .errors import AccessLogMiddleware, BodyLimitMiddleware, install_error_handlers
from .live import LiveRecognizer, RecognizerLoader, load_from_version
from .routes import characters, classify, feedback, pages, system, workflow
from .settings import ServeSettings
from .workflows import WorkflowManager, WorkflowRunner

_log = get_logger("system")
STATIC_DIR = Path(__file__).resolve().parent / "static"

DESCRIPTION = """
Names anime/game characters in images and videos.

* `POST /api/classify` takes one image or video (multipart field `file`) and answers the seed's
  `{filename, role, similarity, boxes}` plus every detection's top-k, tags and timings.
* `/api/characters` lists, enrols (from a few images, no retraining) and removes characters.
* `/api/workflow` runs collect -> train -> gallery and streams its progress.

Errors are always JSON `{"error": "...", "detail": ...}`. Mutating endpoints need
`Authorization: Bearer <token>` when the server sets `auth.token`.
"""


def build_services(settings: ServeSettings, recognizer_loader: RecognizerLoader | None = None,
                   workflow_runner: WorkflowRunner | None = None,
                   workflow_config_factory: Callable[[], Any] | None = None) -> Services:
    """The app's singletons from settings (injectable parts for embedding the service elsewhere)."""
    feature_log = None
    if settings.feature_log.enabled:
        from ..fusion.featurelog import FeatureLog

        feature_log = FeatureLog(settings.feature_log.dir, settings.feature_log.policy)

    def on_load(rec: Any) -> None:
        if feature_log is not None and hasattr(rec, "add_sink"):
            feature_log.attach(rec)  # answers + embeddings (tagged with this recognizer's embedder) feed log fusion

    # the recognizer's own safe decode uses the server's limits unless the config sets its own
    rec_cfg = {"limits": asdict(settings.limits.image_limits),
               **settings.recognizer}
    live = LiveRecognizer(settings.registry_path, settings.version, rec_cfg, settings.reload_interval_s,
                          loader=recognizer_loader or load_from_version, on_load=on_load)
    workflows = None
    if settings.workflow.enabled:
        workflows = WorkflowManager(settings.workflow, str(settings.registry_path.resolve()), runner=workflow_runner,
                                    config_factory=workflow_config_factory)
    svc = Services(settings=settings, live=live, workflows=workflows, feature_log=feature_log)
    if settings.batching.enabled:  # one batch per model thread at a time; batches run in those threads
        svc.batcher = MicroBatcher(settings.batching, svc.to_thread, slots=settings.limits.inference_threads)
    return svc


def create_app(cfg: Mapping[str, Any] | ServeSettings | None = None, *, services: Services | None = None,
               recognizer_loader: RecognizerLoader | None = None, workflow_runner: WorkflowRunner | None = None) -> FastAPI:
    """The service for `cfg` (conf/serve.yaml or `ServeSettings`); the recognizer loads when the app starts."""
    settings = services.settings if services is not None else ServeSettings.from_config(cfg)
    svc = services or build_services(settings, recognizer_loader, workflow_runner)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.started_at = time.time()
        if not svc.live.ready:
            await anyio.to_thread.run_sync(svc.live.load_now)
        if svc.batcher is not None:
            svc.batcher.start()
        _log.info(f"service ready on version {svc.live.version_id or '(none)'}")
        try:
            yield
        finally:
            if svc.batcher is not None:
                await svc.batcher.aclose()
                _log.info(f"micro-batching: {svc.batcher.stats.as_dict()}")
            if svc.workflows is not None:
                svc.workflows.shutdown()
            if svc.feature_log is not None:
                svc.feature_log.close()

    # FastAPIOffline = FastAPI whose /docs and /redoc load Swagger UI / ReDoc from the app, not a CDN
    app = FastAPIOffline(
        static_url="/docs-static",
        title="anime_role_detect",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        form_limits={"max_files": settings.limits.max_files, "max_fields": 32, "max_part_size": 64 * 1024},
    )
    app.state.services = svc
    app.state.static_dir = Path(settings.static_dir) if settings.static_dir else STATIC_DIR
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(AccessLogMiddleware)
    if settings.cors.allow_origins:  # added last = outermost, so even a 413 carries the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors.allow_origins,
                           allow_credentials=settings.cors.allow_credentials,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    for module in (classify, characters, feedback, workflow, system, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=app.state.static_dir), name="static")
    return app
