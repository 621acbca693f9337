"""Anime faces via the classic nvxs detector in the PyPI ``animeface`` package, Pillow-independent.

The package's own entry point finds no faces with Pillow >= 12 because it reads Pillow's private C
struct, whose layout changed; `_nvxs_detect_rgb` hands the extension a struct we build ourselves.
"""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import ConfigError, WeightsError
from .base import Box, register_detector


class _LegacyImagingStruct(ctypes.Structure):
    """The leading fields of Pillow's ``struct ImagingMemoryInstance`` as laid out before Pillow 12.

    ``animeface._nvxs.detect`` was compiled against that layout and reads ``mode``, ``xsize``,
    ``ysize`` and the ``image32`` row pointers from it. Pillow 12 changed the struct, so handing it a
    real Pillow image finds no faces. We build this struct ourselves (Pillow-version independent).
    """

    _fields_ = [
        ("mode", ctypes.c_char * 7), ("type", ctypes.c_int), ("depth", ctypes.c_int), ("bands", ctypes.c_int),
        ("xsize", ctypes.c_int), ("ysize", ctypes.c_int), ("palette", ctypes.c_void_p),
        ("image8", ctypes.c_void_p), ("image32", ctypes.c_void_p), ("image", ctypes.c_void_p),
        ("block", ctypes.c_void_p), ("blocks", ctypes.c_void_p), ("pixelsize", ctypes.c_int), ("linesize", ctypes.c_int),
    ]


def _nvxs_detect_rgb(rgb: np.ndarray) -> list[dict[str, Any]]:
    """Run the nvxs face detector on an HxWx3 uint8 array; returns the raw result dicts.

    The extension casts its argument to Pillow's ``ImagingObject`` (PyObject header + ``Imaging``
    pointer). A ctypes instance has the same shape: header followed by the pointer to its buffer,
    so passing our `_LegacyImagingStruct` gives the extension exactly the fields it reads.
    """
    from animeface import _nvxs

    h, w, _ = rgb.shape
    rgbx = np.zeros((h, w, 4), np.uint8)  # 32-bit pixels, as Pillow stores RGB
    rgbx[..., :3] = rgb
    base = rgbx.ctypes.data
    rows = (ctypes.c_void_p * h)(*(base + y * w * 4 for y in range(h)))
    rows_ptr = ctypes.cast(rows, ctypes.c_void_p)
    imaging = _LegacyImagingStruct(
        mode=b"RGB", type=0, depth=8, bands=3, xsize=w, ysize=h, palette=None, image8=None,
        image32=rows_ptr, image=rows_ptr, block=None, blocks=None, pixelsize=4, linesize=w * 4,
    )
    result = _nvxs.detect(imaging)
    del rows, rgbx  # kept alive until the C call returned
    return list(result)


@register_detector("animeface")
class AnimeFaceDetector:
    """Anime faces via the nvxs detector in the PyPI ``animeface`` package (CPU, no weights file).

    Images are downscaled to `max_side` for speed (the detector's minimum window is ~43 px); face
    boxes are widened by `expand` (fraction of the face size per side) to take in hair and headwear.
    """

    name = "animeface"

    def __init__(self, min_likelihood: float = 0.5, max_side: int = 512, expand: float = 0.0, max_det: int = 20) -> None:
        if not 0.0 <= min_likelihood <= 1.0:
            raise ConfigError(f"detector.min_likelihood={min_likelihood} must be in [0, 1]")
        if max_side < 64:
            raise ConfigError(f"detector.max_side={max_side} must be >= 64 (the detector's smallest window is ~43 px)")
        try:
            from animeface import _nvxs
        except ImportError as exc:
            raise WeightsError(f"the animeface detector needs the `animeface` package ({exc}); pip install animeface==2.0.3") from None
        if not hasattr(_nvxs, "__file__") or not str(_nvxs.__file__).endswith((".so", ".pyd")):
            raise WeightsError("animeface is installed without its C extension (_nvxs); reinstall a binary wheel: pip install --force-reinstall animeface==2.0.3")
        self.min_likelihood, self.max_side, self.expand, self.max_det = float(min_likelihood), int(max_side), float(expand), int(max_det)

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        return [self._detect_one(im) for im in images]

    def _detect_one(self, image: Image.Image) -> list[Box]:
        w, h = image.size
        scale = min(1.0, self.max_side / max(w, h))
        small = image.convert("RGB")
        if scale < 1.0:
            small = small.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        boxes = []
        for face in _nvxs_detect_rgb(np.asarray(small)):
            if face["likelihood"] < self.min_likelihood:
                continue
            x, y, fw, fh = face["face_box"]
            ex, ey = fw * self.expand, fh * self.expand
            box = Box(x - ex, y - ey, x + fw + ex, y + fh + ey, float(face["likelihood"]), "face")
            boxes.append(box.scaled(1.0 / scale).clip(w, h))
        boxes.sort(key=lambda b: -b.score)
        return boxes[: self.max_det]
