"""REST API and web pages: `create_app(cfg)`; run with `python -m anime_role_detect.serve` or `ard-serve`."""

from .app import create_app

__all__ = ["create_app"]
