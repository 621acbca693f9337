"""Every error leaves the service as JSON ``{"error", "detail"}`` with a fitting status, never an HTML traceback."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ConfigError,
    DatasetError,
    GalleryError,
    ImageError,
    ImageTooLarge,
    RegistryError,
    UserError,
    WeightsError,
)
from ..log import get_logger

_log = get_logger("system")


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="What went wrong, in one line a person can act on.")
    detail: Any = Field(default=None, description="More context: the offending field, limit or value (may be null).")


class ApiError(Exception):
    """An error with an HTTP status, a one-line message and optional detail."""

    def __init__(self, status_code: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.headers = headers


#: UserError subclass -> HTTP status (most specific first; the first isinstance match wins).
USER_ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ImageTooLarge, 413),  # the one place a pixel-limit refusal becomes 413 (single requests and batch items alike)
    (LookupError, 404),  # e.g. fusion's FeedbackError: the record/character named does not exist
    (ImageError, 422),
    (DatasetError, 422),
    (GalleryError, 409),
    (RegistryError, 409),
    (WeightsError, 503),
    (ConfigError, 400),
    (UserError, 400),
)

_STATUS_TEXT = {
    400: "bad request", 401: "authentication required", 403: "forbidden", 404: "not found",
    405: "method not allowed", 406: "not acceptable", 409: "conflict", 413: "upload too large",
    415: "unsupported media type", 422: "invalid request", 429: "too many requests",
}


def error_response(status_code: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response in the service's one shape."""
    return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(mode="json"), status_code=status_code, headers=headers)


def status_for_user_error(exc: UserError) -> int:
    """HTTP status for a `UserError` (the problem is in the request or the deployed data)."""
    return next(code for cls, code in USER_ERROR_STATUS if isinstance(exc, cls))


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        out.append({"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"), "message": str(err.get("msg", "")).removeprefix("Value error, ")})
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers that turn every exception into an `ErrorBody` response."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.error, exc.detail, exc.headers)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, exc: UserError) -> JSONResponse:
        return error_response(status_for_user_error(exc), str(exc), getattr(exc, "detail", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        first = detail[0] if detail else {"field": "", "message": "invalid request"}
        where = f"{first['field']}: " if first["field"] else ""
        return error_response(422, f"invalid request: {where}{first['message']}", detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        text = exc.detail if isinstance(exc.detail, str) and exc.detail else _STATUS_TEXT.get(exc.status_code, "error")
        if text.istitle():  # Starlette's stock reason phrases ("Not Found") -> our lower-case one-liners
            text = _STATUS_TEXT.get(exc.status_code, text.lower())
        return error_response(exc.status_code, text, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.opt(exception=exc).error(f"unhandled error in {request.method} {request.url.path}: {exc!r}")
        return error_response(500, "internal error; the server log has the details", type(exc).__name__)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a JSON 413: at once from Content-Length, else while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (f"upload too large: the request body is over the server's {self.max_bytes / 2**20:.3g} MB limit; "
                "send a smaller file or fewer files")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(413, self._message(), {"limit_bytes": self.max_bytes})(scope, receive, send)
            return
        total = 0

        async def limited_receive() -> Any:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


class AccessLogMiddleware:
    """One inference-log line per API request (method, path, status, ms) and an ``X-Request-ID`` header."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._log = get_logger("inference")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import time
        import uuid

        rid = uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        status = 0

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"].startswith("/api/"):
                self._log.info(f"{rid} {scope['method']} {scope['path']} {status} {(time.perf_counter() - t0) * 1e3:.1f}ms")
