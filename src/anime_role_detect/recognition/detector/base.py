"""Detector basics: the `Box`, the `Detector` protocol, `crop_box`, the registry/factory and the no-op detector.

`build_detector(cfg)` picks a factory by ``cfg.kind`` (the legacy ``name`` key is still read for one
release). A detector returns, per image, a list of `Box` (pixels of the input image, best first); an
empty list means "nothing found": the caller falls back to the whole image (``whole_image=True``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ...errors import ConfigError
from ...log import system_log

#: How to make detector weights offline; quoted by every "missing weights" error.
MAKE_WEIGHTS_HINT = (
    "make a detector offline with `python -m anime_role_detect.cli.detector out=DIR` "
    "and set detector.weights=DIR/detector.pt (or detector.repo_id + detector.filename for a hub repo), "
    "or use detector=animeface / detector=none"
)


@dataclass(frozen=True)
class Box:
    """A detected character: corners in pixels of the input image, detector confidence and class label."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    label: str = "character"

    @property
    def width(self) -> float:
        return max(0.0, self.x2 - self.x1)

    @property
    def height(self) -> float:
        return max(0.0, self.y2 - self.y1)

    @property
    def area(self) -> float:
        return self.width * self.height

    def as_list(self) -> list[float]:
        """``[x1, y1, x2, y2]`` rounded to 0.1 px, the form the answer schema uses."""
        return [round(float(v), 1) for v in (self.x1, self.y1, self.x2, self.y2)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def iou(self, other: "Box") -> float:
        """Intersection over union with another box (0 when disjoint)."""
        iw = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        ih = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = iw * ih
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def clip(self, width: int, height: int) -> "Box":
        """The same box clipped to an image of `width` x `height`."""
        return Box(
            min(max(self.x1, 0.0), width), min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width), min(max(self.y2, 0.0), height),
            self.score, self.label,
        )

    def scaled(self, factor: float) -> "Box":
        """Coordinates multiplied by `factor` (maps boxes found on a resized image back)."""
        return Box(self.x1 * factor, self.y1 * factor, self.x2 * factor, self.y2 * factor, self.score, self.label)


@runtime_checkable
class Detector(Protocol):
    """Finds characters: one list of boxes per input image, best first; empty when nothing is found."""

    name: str

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]: ...


def crop_region(size: tuple[int, int], box: Box, margin: float = 0.1) -> tuple[int, int, int, int]:
    """The pixel region ``(x1, y1, x2, y2)`` of `box` widened by `margin` x its width/height on each side, clipped
    to an image of `size`: what `crop_box` cuts (training's face views store it)."""
    if margin < 0:
        raise ConfigError(f"crop margin {margin} is negative; use a fraction such as 0.1")
    w, h = size
    mx, my = box.width * margin, box.height * margin
    x1 = int(max(0, np.floor(box.x1 - mx)))
    y1 = int(max(0, np.floor(box.y1 - my)))
    x2 = int(min(w, np.ceil(box.x2 + mx)))
    y2 = int(min(h, np.ceil(box.y2 + my)))
    if x2 - x1 < 1 or y2 - y1 < 1:  # degenerate/outside box: keep one pixel row/column inside the image
        x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    return x1, y1, x2, y2


def crop_box(image: Image.Image, box: Box, margin: float = 0.1) -> Image.Image:
    """Crop `box` widened by `margin` x its width/height on each side (clipped to the image).

    The margin keeps hair and accessories that identify a character but fall just outside a tight box.
    """
    return image.crop(crop_region(image.size, box, margin))


# --------------------------------------------------------------------------------------------- registry

DetectorFactory = Callable[..., Detector]
_DETECTORS: dict[str, DetectorFactory] = {}


def register_detector(kind: str) -> Callable[[DetectorFactory], DetectorFactory]:
    """Decorator adding a detector factory to the registry under `kind` (the config's ``detector.kind``)."""

    def deco(factory: DetectorFactory) -> DetectorFactory:
        _DETECTORS[kind] = factory
        return factory

    return deco


def available_detectors() -> list[str]:
    """Registered detector kinds, sorted."""
    return sorted(_DETECTORS)


def detector_kind(cfg: Mapping[str, Any] | str | None) -> str:
    """The detector a config names: ``kind`` (or the legacy ``name``), ``"none"`` for an empty config."""
    if cfg is None:
        return "none"
    if isinstance(cfg, str):
        return cfg or "none"
    kind, name = cfg.get("kind"), cfg.get("name")
    if kind and name and kind != name:
        raise ConfigError(f"detector.kind={kind!r} and the legacy detector.name={name!r} disagree; keep only detector.kind")
    return str(kind or name or "none")


def build_detector(cfg: Mapping[str, Any] | str | None) -> Detector:
    """Detector from a config mapping (``conf/detector/*.yaml``: ``kind`` + that detector's options).

    ``None``, ``"none"`` or ``{kind: none}`` give the no-op detector (whole image is used). The
    legacy key ``name`` (before ``kind`` was the one factory key of every pluggable part) still works.
    """
    kind = detector_kind(cfg)
    options = _plain_dict(cfg) if isinstance(cfg, Mapping) else {}
    if "name" in options:
        system_log.warning(f"detector.name={options['name']!r} is deprecated; write detector.kind={kind!r}")
    for key in ("kind", "name", "_target_"):
        options.pop(key, None)
    factory = _DETECTORS.get(kind)
    if factory is None:
        raise ConfigError(f"detector.kind={kind!r} is unknown; choose from {', '.join(available_detectors())}")
    try:
        return factory(**options)
    except TypeError as exc:  # unknown option in the config
        raise ConfigError(f"detector {kind!r}: bad option ({exc}); see conf/detector/{kind}.yaml for the options") from None


def _plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


# --------------------------------------------------------------------------------------------- none


@register_detector("none")
class NoDetector:
    """Finds nothing, so the pipeline recognises the whole image."""

    name = "none"

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        return [[] for _ in images]
