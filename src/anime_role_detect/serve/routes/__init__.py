"""HTTP routes, one module per resource (part of serve); `ERROR_RESPONSES` documents the shared error body in OpenAPI."""

from __future__ import annotations

from typing import Any

from ..errors import ErrorBody

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad request or configuration."},
    401: {"model": ErrorBody, "description": "A bearer token is required."},
    403: {"model": ErrorBody, "description": "The bearer token is wrong."},
    404: {"model": ErrorBody, "description": "No such character, record or job."},
    409: {"model": ErrorBody, "description": "Conflicts with the gallery or registry state."},
    413: {"model": ErrorBody, "description": "Upload too large (bytes, pixels or file count)."},
    415: {"model": ErrorBody, "description": "Not an image or video by its content."},
    422: {"model": ErrorBody, "description": "Invalid fields, or an image that cannot be decoded."},
    503: {"model": ErrorBody, "description": "No model loaded yet, or the request timed out."},
}


def json_error_responses(codes: tuple[int, ...] = (404, 422)) -> dict[int | str, dict[str, Any]]:
    """Error responses documented as JSON on a route whose success type is not JSON (e.g. an SSE stream)."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {c: {"description": ERROR_RESPONSES[c]["description"], "content": {"application/json": {"schema": ref}}} for c in codes}
