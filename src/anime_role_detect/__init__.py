"""anime_role_detect: name the anime and game characters in images and videos.

The library's front door (no Hydra needed)::

    from anime_role_detect import Recognizer, RecognizerConfig
    rec = Recognizer.from_config(RecognizerConfig(version="latest", mode="fusion"))
    answer = rec.recognize_bytes(open("picture.jpg", "rb").read(), "picture.jpg")
    print(answer.role, answer.similarity, answer.boxes)

Layers (data flows one way; a package imports only the ones before it): config/base (errors, fsutil,
confutil, versionfiles, imageio, log) -> data -> models -> training -> recognition -> registry ->
workflow / fusion -> serve; ``cli`` is imported by entry points only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Recognizer", "RecognizerConfig", "Answer", "VideoAnswer", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .recognition.config import RecognizerConfig
    from .recognition.pipeline import Recognizer
    from .recognition.schema import Answer, VideoAnswer

_LAZY = {
    "Recognizer": ("recognition.pipeline", "Recognizer"),
    "RecognizerConfig": ("recognition.config", "RecognizerConfig"),
    "Answer": ("recognition.schema", "Answer"),
    "VideoAnswer": ("recognition.schema", "VideoAnswer"),
}


def __getattr__(name: str) -> Any:
    """Import the front-door names on first use, so ``import anime_role_detect`` (every CLI) stays light."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
