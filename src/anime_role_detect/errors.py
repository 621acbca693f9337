"""User-facing errors: each names the problem and what to do, and is shown as one line.

Entry points catch `UserError` and print `error: <message>` instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input or configuration; its message says what to do."""

    exit_code: int = 2


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DatasetError(UserError, ValueError):
    """A dataset folder is missing, empty or malformed."""


class ImageError(UserError, ValueError):
    """An image or video cannot be decoded, or breaks a size limit."""


class WeightsError(UserError, FileNotFoundError):
    """Model weights are missing or do not fit the model."""


class GalleryError(UserError, ValueError):
    """A gallery is missing, corrupt, or was built with another embedder."""


class RegistryError(UserError, ValueError):
    """A version is missing or incomplete in the registry."""
