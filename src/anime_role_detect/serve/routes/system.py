"""`GET /api/health` and `GET /api/version`: liveness, readiness, and which version answers."""

from __future__ import annotations

import time

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..deps import ServicesDep

router = APIRouter(prefix="/api", tags=["system"])


class Health(BaseModel):
    """Whether the server can answer recognition requests."""

    status: str = Field(description="'ok' when a recognizer is loaded, 'no_model' otherwise (the server still runs).")
    ready: bool = Field(description="True when /api/classify can answer.")
    version: str | None = Field(default=None, description="Registry version serving now.")
    uptime_s: float = Field(description="Seconds since start.")
    error: str | None = Field(default=None, description="Why no recognizer is loaded, or why the last reload failed.")


class VersionInfo(BaseModel):
    """The live gallery/model version and the registry it follows."""

    version: str | None = Field(default=None, description="Registry version serving now.")
    follows: str = Field(description="'latest' (hot reload on promote/rollback) or a pinned version id.")
    registry_latest: str | None = Field(default=None, description="What the registry's `latest` points to now.")
    reload_pending: bool = Field(description="True while a newer version is loading in the background.")
    reloads: int = Field(description="Hot reloads since start.")
    loaded_at: float | None = Field(default=None, description="Unix time the serving version was loaded.")
    load_s: float | None = Field(default=None, description="Seconds the load took.")
    recognizer: dict = Field(default_factory=dict, description="Model facts reported by the recognizer (embedder, modes...).")
    last_error: str | None = Field(default=None, description="Last load/reload failure, if any.")


@router.get("/health", response_model=Health, summary="Liveness and readiness")
async def health(services: ServicesDep) -> Health:
    live = services.live
    live.maybe_reload()
    return Health(status="ok" if live.ready else "no_model", ready=live.ready, version=live.version_id,
                  uptime_s=round(time.time() - services.started_at, 3), error=live.last_error)


def _describe(rec: object) -> dict:
    info = getattr(rec, "describe", None)
    if callable(info):
        try:
            return dict(info())
        except Exception:  # noqa: BLE001 - facts are optional
            return {}
    return {"version": str(getattr(rec, "version", ""))}


@router.get("/version", response_model=VersionInfo, summary="Which gallery/model version is live")
async def version(services: ServicesDep) -> VersionInfo:
    live = services.live
    live.maybe_reload()
    loaded = live.loaded
    try:
        latest = live.registry.latest_id()
    except OSError:
        latest = None
    busy = live.reloading
    return VersionInfo(version=live.version_id, follows=live.version, registry_latest=latest, reload_pending=busy,
                       reloads=live.reloads, loaded_at=loaded.loaded_at if loaded else None,
                       load_s=round(loaded.load_s, 3) if loaded else None,
                       recognizer=_describe(loaded.recognizer) if loaded else {}, last_error=live.last_error)
