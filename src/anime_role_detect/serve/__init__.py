"""Service — REST API and pages, `create_app(cfg)`, ``ard-serve``; imports every layer below it (recognition, registry, workflow, fusion), never cli."""

from .app import create_app

__all__ = ["create_app"]
