"""A fixed part of every picture as its one detection: a head prior where running a face detector costs too much.

In a full-figure illustration the head sits at the top centre. ``region`` returns that part (fractions of the
picture's width and height) as a box at no detector cost, so a face + figure view (`recognition/views.py`,
``face_view.detector: {kind: region}``) adds a zoomed head view for one more forward pass, where animeface costs
about 0.2-0.4 s per picture (docs/accuracy.md "Head views").
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ...errors import ConfigError
from .base import Box, register_detector

#: The top centre: 60% of the width, the upper half of the height.
DEFAULT_REGION = (0.2, 0.0, 0.8, 0.5)


@register_detector("region")
class RegionDetector:
    """The same region ``box = [x1, y1, x2, y2]`` (fractions of width and height) of every picture, labelled `label`."""

    name = "region"

    def __init__(self, box: Sequence[float] = DEFAULT_REGION, label: str = "head") -> None:
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ConfigError(f"detector.box={list(box) if isinstance(box, (list, tuple)) else box!r}: give four "
                              "fractions [x1, y1, x2, y2] of the picture's width and height, e.g. [0.2, 0.0, 0.8, 0.5]") from None
        if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
            raise ConfigError(f"detector.box={[x1, y1, x2, y2]}: need 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 "
                              "(fractions of the picture's width and height)")
        self.box, self.label = (x1, y1, x2, y2), str(label)

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        x1, y1, x2, y2 = self.box
        return [[Box(x1 * im.width, y1 * im.height, x2 * im.width, y2 * im.height, 1.0, self.label)] for im in images]
