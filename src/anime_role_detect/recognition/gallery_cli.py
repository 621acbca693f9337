"""Moved: `build_recognition_folder` is in `recognition.build`, the command line is ``ard-gallery``
(`anime_role_detect.cli.gallery`), composing configs is `confutil.compose_plain`. Transitional re-exports for
callers not yet moved (the workflow's gallery stage, tests, benchmarks); delete when none is left."""

from __future__ import annotations

from typing import Any, Sequence

from ..confutil import compose_plain
from .build import BuildReport, build_recognition_folder, evaluate_split

__all__ = ["BuildReport", "build_recognition_folder", "compose_config", "evaluate_split"]


def compose_config(overrides: Sequence[str] = (), config_name: str = "infer") -> dict[str, Any]:
    """``conf/<config_name>.yaml`` with overrides as a plain dict: `confutil.compose_plain`."""
    return compose_plain(config_name, overrides)


if __name__ == "__main__":
    import sys

    print("error: this command moved; use `ard-gallery build|add|remove|list ...` "
          "(or python -m anime_role_detect.cli.gallery ...)", file=sys.stderr)
    raise SystemExit(2)
