"""Character detectors (part of recognition; imports the base only): find the characters so each is cropped and recognised separately.

Four detectors sit behind one registry (`build_detector(cfg)`, ``cfg.kind``; legacy ``cfg.name`` still read):

- ``yolo`` (`yolo.py`): an ultralytics YOLO model from a local weights file or a Hugging Face hub
  ``repo_id`` + ``filename`` (make one offline with ``python -m anime_role_detect.cli.detector out=DIR``).
- ``animeface`` (`animeface.py`): the classic nvxs anime-face detector of the PyPI ``animeface`` package.
- ``region`` (`region.py`): a fixed part of every picture (the top centre: a head prior for face views).
- ``none`` (`base.py`): no detector; the pipeline uses the whole image.

`base.py` holds `Box`, the `Detector` protocol, `crop_box` and the registry. This package imports
only the errors, logging and `recognition.hub`; importing it registers every detector.
"""

from __future__ import annotations

from .animeface import AnimeFaceDetector
from .base import (
    MAKE_WEIGHTS_HINT,
    Box,
    Detector,
    NoDetector,
    available_detectors,
    build_detector,
    crop_box,
    crop_region,
    detector_kind,
    register_detector,
)
from .region import RegionDetector
from .yolo import YoloDetector, torch_global_state_kept, ultralytics_offline

__all__ = [
    "Box", "Detector", "build_detector", "detector_kind", "register_detector", "available_detectors", "crop_box", "crop_region",
    "NoDetector", "YoloDetector", "AnimeFaceDetector", "RegionDetector", "MAKE_WEIGHTS_HINT", "ultralytics_offline", "torch_global_state_kept",
]
