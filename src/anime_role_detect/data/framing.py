"""How a picture becomes a network's square input, without torch: framing (`fit_square`) and the evaluation arrays.

`eval_array` is `transforms.build_eval_transform` in numpy, value for value (torchvision's short-side resize on a PIL
image, its centre crop, ``ToTensor`` and ``Normalize`` in float32), so a version run on ONNX Runtime answers without
importing torch or torchvision (seconds of a cold start). `batch_array` is the gallery embedders' framing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: how a picture becomes a square network input (`fit_square`)
RESIZE_MODES = ("center_crop", "letterbox", "squash")


def check_resize(resize: str, key: str = "data.resize") -> str:
    """`resize` when it is one of `RESIZE_MODES`, else a one-line `ConfigError` naming the config `key`."""
    if resize not in RESIZE_MODES:
        raise ConfigError(f"{key}={resize!r}: choose one of {', '.join(RESIZE_MODES)}")
    return resize


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


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size)`` on a PIL image: the short side to `size`, the long side truncated, bilinear."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's ``CenterCrop(size)`` on a PIL image at least `size` on each side (offsets rounded half to even)."""
    top, left = int(round((img.height - size) / 2.0)), int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def normalised(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``ToTensor`` + ``Normalize`` of an RGB image: a CHW float32 array, each channel ``(x / 255 - mean) / std``."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def eval_array(img: Image.Image, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               resize: str = "center_crop") -> np.ndarray:
    """`transforms.build_eval_transform(size, mean, std, resize)(img)` as a CHW float32 array, without torch."""
    if check_resize(resize) == "center_crop":
        img = center_crop(resize_short_side(img.convert("RGB"), int(size)), int(size))
    else:
        img = fit_square(img, int(size), resize)  # RGB
    return normalised(img, mean, std)


def batch_array(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float],
                resize: str = "letterbox") -> np.ndarray:
    """PIL images -> normalised NCHW float32 array, each framed by `fit_square` (the gallery embedders' input)."""
    mode = check_resize(resize, "embedder.resize")
    return np.stack([normalised(fit_square(im, size, mode), mean, std) for im in images])
