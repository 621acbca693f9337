"""`GET /api/health` and `GET /api/version`: liveness, readiness, and which version answers."""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ...log import get_logger
from ...recognition.schema import Mode
from ..deps import ServicesDep, reading
from ..live import Loaded

router = APIRouter(prefix="/api", tags=["system"])
_log = get_logger("system")


class Health(BaseModel):
    """Whether the server can answer recognition requests."""

    status: str = Field(description="'ok' when a recognizer is loaded, 'no_model' otherwise (the server still runs).")
    ready: bool = Field(description="True when /api/classify can answer.")
    version: str | None = Field(default=None, description="Registry version serving now.")
    uptime_s: float = Field(description="Seconds since start.")
    error: str | None = Field(default=None, description="Why no recognizer is loaded, or why the last reload failed.")


class RecognizerFacts(BaseModel):
    """What the live recognizer serves (`Recognizer.describe()`); keys it adds later pass through."""

    model_config = ConfigDict(extra="allow")
    version: str | None = Field(default=None, description="Registry version the recognizer was loaded from.")
    version_dir: str | None = Field(default=None, description="Its version folder on the server.")
    mode: Mode | None = Field(default=None, description="Mode used when a request names none.")
    modes: list[Mode] = Field(default_factory=list, description="Modes this version can serve (model and fusion need a classifier).")
    rerank: bool | None = Field(default=None, description="Whether tag reranking is on when a request does not say.")
    embedder: str | None = Field(default=None, description="Embedder id of the gallery (null without a gallery).")
    gallery_rows: int = Field(default=0, description="Vectors in the gallery.")
    characters: int = Field(default=0, description="Characters it can name.")
    classifier: bool = Field(default=False, description="True when the version has a trained classifier (model.ckpt).")
    tagger: str | None = Field(default=None, description="Tagger in use (model id or kind); null when none is loaded.")
    calibration: dict[str, Any] | None = Field(default=None, description="Open-set calibration: target false-accept rate, threshold per mode and the score each applies to (top: the mode's own top score; gallery_cosine: the best gallery cosine, fusion), and the fusion blend in use (gallery weight, temperature, `untrained`: how a character enrolled after training is scored, and `trained_judge`: whitened, the version's whitened gallery judging the trained characters, or classifier, once a character is enrolled or where the version has none).")
    runtime: str | None = Field(default=None, description="What runs the networks: onnx / onnx-int8 (ONNX Runtime, the version's "
                                "exported files) or torch; before the first answer, the `runtime` setting (auto).")
    device: str | None = Field(default=None, description="Device the models run on (cpu, cuda, mps).")


class VersionInfo(BaseModel):
    """The live gallery/model version and the registry it follows."""

    version: str | None = Field(default=None, description="Registry version serving now.")
    follows: str = Field(description="'latest' (hot reload on promote/rollback) or a pinned version id.")
    registry_latest: str | None = Field(default=None, description="What the registry's `latest` points to now.")
    reload_pending: bool = Field(description="True while a newer version is loading in the background.")
    reloads: int = Field(description="Hot reloads since start.")
    loaded_at: float | None = Field(default=None, description="Unix time the serving version was loaded.")
    load_s: float | None = Field(default=None, description="Seconds the load took.")
    recognizer: RecognizerFacts | None = Field(default=None, description="What the live recognizer serves; null while none is loaded.")
    last_error: str | None = Field(default=None, description="Last load/reload failure, if any.")


@router.get("/health", response_model=Health, summary="Liveness and readiness")
async def health(services: ServicesDep) -> Health:
    """Always 200 while the process serves: `ready` says whether a version is loaded to answer with. Polling it also
    starts loading the version the server follows once the registry moved it (`latest` unless pinned; checked at
    most every `reload_interval_s`)."""
    live = services.live
    live.maybe_reload()
    return Health(status="ok" if live.ready else "no_model", ready=live.ready, version=live.version_id,
                  uptime_s=round(time.time() - services.started_at, 3), error=live.last_error)


def _facts(loaded: Loaded) -> RecognizerFacts | None:
    """Blocking: the recognizer's own account of itself (read under the lease, as a gallery edit may be running)."""
    with reading(loaded) as rec:
        try:
            return RecognizerFacts.model_validate(rec.describe())
        except Exception as exc:  # noqa: BLE001 - the version endpoint must answer even when the facts cannot be read
            _log.opt(exception=exc).error(f"version {loaded.version_id}: describe() failed: {exc!r}")
            return None


@router.get("/version", response_model=VersionInfo, summary="Which gallery/model version is live")
async def version(services: ServicesDep) -> VersionInfo:
    """The version answering now, the registry's `latest` beside it (they differ while a reload is pending), and
    what the recognizer serves: modes, embedder, gallery size, calibration, device."""
    live = services.live
    live.maybe_reload()
    loaded = live.loaded
    try:
        latest = live.registry.latest_id()
    except OSError:
        latest = None
    busy = live.reloading
    facts = await anyio.to_thread.run_sync(_facts, loaded) if loaded else None
    return VersionInfo(version=live.version_id, follows=live.version, registry_latest=latest, reload_pending=busy,
                       reloads=live.reloads, loaded_at=loaded.loaded_at if loaded else None,
                       load_s=round(loaded.load_s, 3) if loaded else None,
                       recognizer=facts, last_error=live.last_error)
