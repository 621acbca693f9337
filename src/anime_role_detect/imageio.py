"""Safe decoding of untrusted images: sniff the type from content, guard size, fix orientation, RGB.

Every failure raises `ImageError` naming the file and the fix, never a PIL traceback.
"""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLarge

MediaKind = Literal["image", "video"]

#: Magic numbers of the formats we accept (content decides, never the file name).
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
_VIDEO_BRANDS = (b"ftyp",)  # MP4/MOV/3GP family at offset 4
_VIDEO_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1a\x45\xdf\xa3", "matroska"),  # MKV / WebM
    (b"RIFF", "avi?"),  # AVI or WEBP: disambiguated below
    (b"\x00\x00\x01\xba", "mpeg"),
    (b"\x00\x00\x01\xb3", "mpeg"),
)


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every decoded image."""

    max_pixels: int = 40_000_000  # decompression-bomb guard (e.g. 8000x5000)
    max_bytes: int = 50 * 1024 * 1024
    min_side: int = 8  # anything smaller carries no character


DEFAULT_LIMITS = ImageLimits()


def _pil_open():
    """PIL's own ``Image.open``: ultralytics replaces it process-wide with a wrapper that, on an unreadable
    file, tries to pip-install a HEIF plugin and then fails with ImportError instead of PIL's error."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return original if original is not None and Image.open is not original else Image.open


def sniff(data: bytes) -> tuple[MediaKind, str] | None:
    """Return ('image'|'video', format) from the first bytes, or None when unknown."""
    head = data[:32]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "avi"
    for magic, fmt in _IMAGE_MAGIC:
        if head.startswith(magic):
            return "image", fmt
    if head[4:8] in _VIDEO_BRANDS:
        return "video", "mp4"
    for magic, fmt in _VIDEO_MAGIC:
        if head.startswith(magic) and fmt != "avi?":
            return "video", fmt
    if head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*"):
        return "image", "tiff"
    return None


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of raw bytes (cache keys, dedupe, log records)."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, name: str = "<upload>", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode bytes into an RGB PIL image, applying EXIF orientation and the size limits."""
    if not data:
        raise ImageError(f"{name}: the file is empty; upload a JPEG, PNG, WEBP, GIF or BMP image")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{name}: {len(data) / 1e6:.1f} MB is over the {limits.max_bytes / 1e6:.0f} MB limit; resize or recompress it"
        )
    kind = sniff(data)
    if kind is None or kind[0] != "image":
        what = f"a {kind[1]} video" if kind else "not an image"
        raise ImageError(f"{name}: {what}; upload a JPEG, PNG, WEBP, GIF or BMP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _pil_open()(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageTooLarge(name, limits.max_pixels, (w, h))
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(name, limits.max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: the image data is corrupt or truncated ({exc}); re-export or re-download it") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture
        pass
    if min(img.size) < limits.min_side:
        raise ImageError(
            f"{name}: {img.size[0]}x{img.size[1]} pixels is too small (min side {limits.min_side}); use a larger image"
        )
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            img = bg
        else:
            img = img.convert("RGB")
    return img


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Read and decode an image file safely (see `decode_image`)."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such file; check the path")
    size = p.stat().st_size
    if size > limits.max_bytes:
        raise ImageError(f"{p}: {size / 1e6:.1f} MB is over the {limits.max_bytes / 1e6:.0f} MB limit; resize it")
    return decode_image(p.read_bytes(), name=str(p), limits=limits)


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg"})
