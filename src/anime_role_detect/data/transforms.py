"""Image transforms: a configurable training augmentation pipeline and the evaluation transform.

Training: random resized crop, horizontal/vertical flip, rotation, colour jitter, each switchable from
config (``data.augment``). Colour is identity for anime characters (hair and eye colour), so hue jitter
is off and brightness/contrast/saturation stay mild by default. Evaluation: ``resize`` = ``center_crop``
(short side, centre crop) or ``letterbox`` (the whole picture padded to a square, so a portrait figure
keeps its head and feet; training then letterboxes before cropping, to see the same framing).
Both end with ``ToTensor`` + ``Normalize(mean, std)`` of the backbone; the evaluation side is `framing.eval_array`,
which needs no torch (ONNX Runtime recognition runs it too).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from PIL import Image
import torch
from torchvision import transforms as T

from .framing import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, FitSquare, check_resize, eval_array, fit_square

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RESIZE_MODES", "DEFAULT_AUGMENT", "EvalTransform", "FitSquare", "build_eval_transform",
           "build_train_transform", "check_resize", "fit_square"]

#: Default augmentation settings (mirrors ``conf/data/*.yaml`` ``augment:``).
DEFAULT_AUGMENT: dict[str, Any] = {
    "scale": (0.6, 1.0),
    "ratio": (0.75, 1.333),
    "hflip": 0.5,
    "vflip": 0.0,
    "rotation": 10.0,
    "color_jitter": (0.1, 0.1, 0.1, 0.0),
}


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))]


def build_train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: Mapping[str, Any] | None = None,
    resize: str = "center_crop",
) -> Callable[[Image.Image], Any]:
    """PIL -> augmented, normalised tensor; a step is skipped when its setting is 0/None/false."""
    a = {**DEFAULT_AUGMENT, **dict(augment or {})}
    steps: list[Callable] = []
    if check_resize(resize) != "center_crop":  # frame the picture as evaluation will, then augment that square
        steps.append(FitSquare(image_size, resize))
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


class EvalTransform:
    """PIL -> normalised CHW tensor for evaluation and inference: `framing.eval_array` (picklable), the one evaluation
    framing that torch training, the torch embedders and ONNX Runtime share."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], resize: str) -> None:
        self.image_size, self.resize = int(image_size), check_resize(resize)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(eval_array(img, self.image_size, self.mean, self.std, self.resize))


def build_eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, resize: str = "center_crop"
) -> Callable[[Image.Image], Any]:
    """PIL -> normalised tensor for evaluation and inference: centre crop (short side to `image_size`), or the whole
    picture letterboxed / squashed to a square (`fit_square`)."""
    return EvalTransform(image_size, mean, std, resize)
