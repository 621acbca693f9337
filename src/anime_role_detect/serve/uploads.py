"""Uploads: size per file, count and type sniffed from content before any decoder sees them, then the one decode."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import UploadFile
from PIL import Image

from ..imageio import MediaKind, decode_image, sniff
from .errors import ApiError
from .settings import Limits

_CHUNK = 1024 * 1024
_UNSAFE = re.compile(r"[^\w.\- ()\[\]@=+,]")

ACCEPTED = "JPEG, PNG, WEBP, GIF, BMP or TIFF images, or MP4, MOV, MKV, WEBM, AVI or MPEG videos"


@dataclass(frozen=True)
class Upload:
    """One uploaded file, read into memory and identified by its bytes."""

    filename: str
    data: bytes
    kind: MediaKind
    fmt: str


def client_filename(name: str | None, index: int = 0) -> str:
    """The client's file name reduced to a display name (no folders, no control characters)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = _UNSAFE.sub("_", base)[:120]
    return base or f"upload-{index}"


def fmt_mb(n: int) -> str:
    """Bytes as a short MB figure: '20 MB', '0.05 MB'."""
    return f"{n / 2**20:.3g} MB"


async def read_upload(file: UploadFile, limits: Limits, index: int = 0, allow_video: bool = True) -> Upload:
    """Read one upload within the limits; 413 when too big, 415 when not an image/video by content.

    The type is sniffed from the first chunk, so the per-type size limit applies while streaming.
    """
    name = client_filename(file.filename, index)
    first = await file.read(_CHUNK)
    if not first:
        raise ApiError(422, f"{name}: the file is empty; choose an image or video file", {"filename": name})
    found = sniff(first)
    if found is None:
        raise ApiError(415, f"{name}: not an image or video by its content; upload {ACCEPTED}", {"filename": name})
    kind, fmt = found
    if kind == "video" and not allow_video:
        raise ApiError(415, f"{name}: a {fmt} video, but this endpoint takes images only; upload an image", {"filename": name})
    limit = limits.max_upload_bytes if kind == "image" else limits.max_video_bytes
    chunks, size = [first], len(first)
    while size <= limit:
        chunk = await file.read(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        chunks.append(chunk)
    if size > limit:
        fix = "resize or recompress it" if kind == "image" else "cut or re-encode it"
        raise ApiError(413, f"{name}: over the {fmt_mb(limit)} {kind} limit; {fix}", {"filename": name, "limit_bytes": limit})
    return Upload(filename=name, data=b"".join(chunks), kind=kind, fmt=fmt)


def check_count(files: list[UploadFile], limits: Limits, what: str = "files") -> None:
    """413 when a request carries more files than allowed, 422 when it carries none."""
    if not files:
        raise ApiError(422, f"no {what} uploaded; send at least one as multipart field 'files'")
    if len(files) > limits.max_files:
        raise ApiError(413, f"{len(files)} {what} in one request is over the limit of {limits.max_files}; split the request",
                       {"limit_files": limits.max_files})


def decode_upload(up: Upload, limits: Limits) -> Image.Image:
    """Blocking: the service's image decode, `imageio.decode_image` under the server's limits (`ImageTooLarge` -> 413)."""
    return decode_image(up.data, up.filename, limits.image_limits)
