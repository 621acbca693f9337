"""The two web pages (static HTML/CSS/JS, no build step): `/` recognise uploads, `/workflow` train new characters."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)


#: The pages load only their own scripts/styles and talk only to this server.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page(request: Request, name: str) -> FileResponse:
    static: Path = request.app.state.static_dir
    return FileResponse(static / name, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/")
async def index(request: Request) -> FileResponse:
    return _page(request, "index.html")


@router.get("/workflow")
async def workflow_page(request: Request) -> FileResponse:
    return _page(request, "workflow.html")
