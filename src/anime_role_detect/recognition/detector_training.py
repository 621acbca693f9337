"""Moved: the offline YOLO trainer is `anime_role_detect.training.detector`, its command line ``ard-train-detector``
(`anime_role_detect.cli.detector`). Transitional re-exports for callers not yet moved; delete when none is left."""

from __future__ import annotations

from typing import Any, Sequence

from ..training.detector import *  # noqa: F401,F403
from ..training.detector import DetectorTrainingConfig, build_dataset, make_detector, make_tiny_detector, parse_overrides, yolo_label_line  # noqa: F401


def main(argv: Sequence[str] | None = None) -> Any:
    """The old ``python -m anime_role_detect.recognition.detector_training``: runs ``ard-train-detector``."""
    from ..cli.detector import main as cli_main  # transitional alias of an entry point, never imported by the library

    return cli_main(argv)


if __name__ == "__main__":
    main()
