"""User-facing errors: each names the problem and what to do, and is shown as one line.

Entry points catch `UserError` and print `error: <message>` instead of a traceback.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class UserError(Exception):
    """An error caused by input or configuration; its message says what to do."""

    exit_code: int = 2


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DatasetError(UserError, ValueError):
    """A dataset folder is missing, empty or malformed."""


class ImageError(UserError, ValueError):
    """An image or video cannot be decoded, or breaks a size limit."""


class ImageTooLarge(ImageError):
    """An image has more pixels than allowed (decompression-bomb guard); the service answers 413."""

    def __init__(self, filename: str, limit_pixels: int, size: tuple[int, int] | None = None) -> None:
        what = f"{size[0]}x{size[1]} pixels is" if size else "the image is"
        super().__init__(f"{filename}: {what} over the {limit_pixels:,}-pixel limit (decompression-bomb guard); downscale the image")
        self.detail = {"filename": filename, "limit_pixels": limit_pixels}


class WeightsError(UserError, FileNotFoundError):
    """Model weights are missing or do not fit the model."""


class GalleryError(UserError, ValueError):
    """A gallery is missing, corrupt, or was built with another embedder."""


class RegistryError(UserError, ValueError):
    """A version is missing or incomplete in the registry."""


@contextlib.contextmanager
def reading_file(path: object, what: str, missing: str, corrupt: str, error: type[UserError] = GalleryError) -> Iterator[None]:
    """Turn a missing file or a malformed one read inside the block into one-line `error`s naming `path` and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise error(f"{what} {path} not found; {missing}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise error(f"{what} {path} is corrupt ({exc}); {corrupt}") from None
