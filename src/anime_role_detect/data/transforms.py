"""Image transforms: a configurable training augmentation pipeline and the evaluation transform.

Training: random resized crop, horizontal/vertical flip, rotation, colour jitter (the seed's set),
each switchable from config (``data.augment``). Evaluation: resize the short side, centre crop.
Both end with ``ToTensor`` + ``Normalize(mean, std)`` of the backbone.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default augmentation settings (mirrors ``conf/data/*.yaml`` ``augment:``).
DEFAULT_AUGMENT: dict[str, Any] = {
    "scale": (0.6, 1.0),
    "ratio": (0.75, 1.333),
    "hflip": 0.5,
    "vflip": 0.0,
    "rotation": 10.0,
    "color_jitter": (0.2, 0.2, 0.2, 0.02),
}


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))]


def build_train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: Mapping[str, Any] | None = None,
) -> Callable[[Image.Image], Any]:
    """PIL -> augmented, normalised tensor; a step is skipped when its setting is 0/None/false."""
    a = {**DEFAULT_AUGMENT, **dict(augment or {})}
    steps: list[Callable] = []
    if a.get("scale"):
        steps.append(T.RandomResizedCrop(image_size, scale=tuple(a["scale"]), ratio=tuple(a.get("ratio") or (0.75, 1.333)), antialias=True))
    else:
        steps += [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    if a.get("hflip"):
        steps.append(T.RandomHorizontalFlip(float(a["hflip"])))
    if a.get("vflip"):
        steps.append(T.RandomVerticalFlip(float(a["vflip"])))
    if a.get("rotation"):
        steps.append(T.RandomRotation(float(a["rotation"])))
    if a.get("color_jitter"):
        b, c, s, h = (list(a["color_jitter"]) + [0, 0, 0, 0])[:4]
        steps.append(T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    return T.Compose(steps + _normalize(mean, std))


def build_eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], Any]:
    """PIL -> normalised tensor for evaluation and inference: short side to `image_size`, centre crop."""
    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)] + _normalize(mean, std))
