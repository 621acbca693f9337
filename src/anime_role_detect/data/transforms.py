"""Image transforms: a configurable training augmentation pipeline and the evaluation transform.

Training: random resized crop, horizontal/vertical flip, rotation, colour jitter, each switchable from
config (``data.augment``). Colour is identity for anime characters (hair and eye colour), so hue jitter
is off and brightness/contrast/saturation stay mild by default. Evaluation: ``resize`` = ``center_crop``
(short side, centre crop) or ``letterbox`` (the whole picture padded to a square, so a portrait figure
keeps its head and feet; training then letterboxes before cropping, to see the same framing).
Both end with ``ToTensor`` + ``Normalize(mean, std)`` of the backbone.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from PIL import Image
from torchvision import transforms as T

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default augmentation settings (mirrors ``conf/data/*.yaml`` ``augment:``).
DEFAULT_AUGMENT: dict[str, Any] = {
    "scale": (0.6, 1.0),
    "ratio": (0.75, 1.333),
    "hflip": 0.5,
    "vflip": 0.0,
    "rotation": 10.0,
    "color_jitter": (0.1, 0.1, 0.1, 0.0),
}

#: how a picture becomes a square network input (`fit_square`)
RESIZE_MODES = ("center_crop", "letterbox", "squash")


def fit_square(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Square `size` RGB input: 'letterbox' keeps the whole figure (white padding), 'center_crop' fills the square
    and cuts the long side, 'squash' stretches."""
    img = img.convert("RGB")
    if mode == "squash":
        return img.resize((size, size), Image.BICUBIC)
    w, h = img.size
    if mode == "center_crop":
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        l, t = (img.width - size) // 2, (img.height - size) // 2
        return img.crop((l, t, l + size, t + size))
    if mode == "letterbox":
        s = size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        return canvas
    raise ConfigError(f"resize={mode!r}: choose one of {', '.join(RESIZE_MODES)}")


class FitSquare:
    """`fit_square` as a picklable transform step (DataLoader workers may be spawned, not forked)."""

    def __init__(self, size: int, mode: str) -> None:
        self.size, self.mode = int(size), mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return fit_square(img, self.size, self.mode)


def check_resize(resize: str, key: str = "data.resize") -> str:
    """`resize` when it is one of `RESIZE_MODES`, else a one-line `ConfigError` naming the config `key`."""
    if resize not in RESIZE_MODES:
        raise ConfigError(f"{key}={resize!r}: choose one of {', '.join(RESIZE_MODES)}")
    return resize


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


def build_eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, resize: str = "center_crop"
) -> Callable[[Image.Image], Any]:
    """PIL -> normalised tensor for evaluation and inference: centre crop (short side to `image_size`), or the whole
    picture letterboxed / squashed to a square (`fit_square`)."""
    if check_resize(resize) == "center_crop":
        return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)] + _normalize(mean, std))
    return T.Compose([FitSquare(image_size, resize)] + _normalize(mean, std))
