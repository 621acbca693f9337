"""Safe decoding of untrusted images: sniff the type from content, guard size, fix orientation, RGB.

Every failure raises `ImageError` naming the file and the fix, never a PIL traceback. With
`ImageLimits.draft_side` a big JPEG is decoded at a reduced DCT scale (PIL's ``draft``: 1/2, 1/4 or 1/8, several
times faster than every pixel); `original_size` gives its full size, so answers can report boxes in the
picture's own pixels (`scale_to_original`).
"""

from __future__ import annotations

import hashlib
import io
import math
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
    draft_side: int = 0  # > 0: a JPEG decodes at the smallest DCT scale keeping its shorter side >= this (0: every pixel)


DEFAULT_LIMITS = ImageLimits()
#: Recognition's decode (the service, ``infer.py``, `Recognizer.recognize_bytes`): every model reads a picture at
#: 224 px, the head view a 60% x 50% region of it, so a shorter side of 768 keeps every crop above the input size.
RECOGNITION_DRAFT_SIDE = 768
RECOGNITION_LIMITS = ImageLimits(draft_side=RECOGNITION_DRAFT_SIDE)
#: ``Image.info`` key of a drafted picture: its full (width, height), after EXIF orientation.
ORIGINAL_SIZE = "ard_original_size"


def original_size(img: Image.Image) -> tuple[int, int]:
    """The picture's full (width, height): its own size, or the size it had before a drafted decode reduced it."""
    got = img.info.get(ORIGINAL_SIZE)
    return (int(got[0]), int(got[1])) if got else img.size


def scale_to_original(img: Image.Image) -> tuple[float, float]:
    """(x, y) factors from `img`'s pixels to its full picture's: (1.0, 1.0) unless it was decoded drafted."""
    w, h = original_size(img)
    return w / img.width, h / img.height


def _draft(img: Image.Image, fmt: str, draft_side: int) -> None:
    """Ask a JPEG to decode at the smallest DCT scale that keeps its shorter side >= `draft_side` (no-op otherwise)."""
    w, h = img.size
    if draft_side <= 0 or fmt != "jpeg" or min(w, h) < 2 * draft_side:
        return
    k = draft_side / min(w, h)  # PIL picks the largest reduction whose size still covers the one asked for
    img.draft(None, (math.ceil(w * k), math.ceil(h * k)))


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
            _draft(img, kind[1], limits.draft_side)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(name, limits.max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: the image data is corrupt or truncated ({exc}); re-export or re-download it") from None
    drafted = img.size != (w, h)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture
        pass
    if drafted and (img.width > img.height) != (w > h):  # EXIF turned the picture a quarter: so is its full size
        w, h = h, w
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
    if drafted:
        img.info[ORIGINAL_SIZE] = (w, h)
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
