"""Character detectors: find the characters in an image so each one is cropped and recognised separately.

Three detectors sit behind one registry (`build_detector(cfg)`, `cfg.name`):

- ``yolo``: an ultralytics YOLO model from a local weights file (make one offline with
  ``python -m anime_role_detect.recognition.detector_training out=DIR``); never downloads anything.
- ``animeface``: the classic nvxs anime-face detector shipped in the PyPI ``animeface`` package,
  called through a Pillow-independent adapter (the package's own entry point finds no faces with
  Pillow >= 12 because it reads Pillow's private C struct, whose layout changed).
- ``none``: no detector; the pipeline uses the whole image.

A detector returns, per image, a list of `Box` (pixels of the input image, best first). An empty list
means "nothing found": the caller falls back to the whole image and reports ``whole_image=True``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import ConfigError, WeightsError
from ..log import system_log

#: How to make detector weights offline; quoted by every "missing weights" error.
MAKE_WEIGHTS_HINT = (
    "make a detector offline with `python -m anime_role_detect.recognition.detector_training out=DIR` "
    "and set detector.weights=DIR/detector.pt, or use detector=animeface / detector=none"
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


def crop_box(image: Image.Image, box: Box, margin: float = 0.1) -> Image.Image:
    """Crop `box` widened by `margin` x its width/height on each side (clipped to the image).

    The margin keeps hair and accessories that identify a character but fall just outside a tight box.
    """
    if margin < 0:
        raise ConfigError(f"crop margin {margin} is negative; use a fraction such as 0.1")
    w, h = image.size
    mx, my = box.width * margin, box.height * margin
    x1 = int(max(0, np.floor(box.x1 - mx)))
    y1 = int(max(0, np.floor(box.y1 - my)))
    x2 = int(min(w, np.ceil(box.x2 + mx)))
    y2 = int(min(h, np.ceil(box.y2 + my)))
    if x2 - x1 < 1 or y2 - y1 < 1:  # degenerate/outside box: keep one pixel row/column inside the image
        x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    return image.crop((x1, y1, x2, y2))


# --------------------------------------------------------------------------------------------- registry

DetectorFactory = Callable[..., Detector]
_DETECTORS: dict[str, DetectorFactory] = {}


def register_detector(name: str) -> Callable[[DetectorFactory], DetectorFactory]:
    """Decorator adding a detector factory to the registry under `name`."""

    def deco(factory: DetectorFactory) -> DetectorFactory:
        _DETECTORS[name] = factory
        return factory

    return deco


def available_detectors() -> list[str]:
    return sorted(_DETECTORS)


def build_detector(cfg: Mapping[str, Any] | str | None) -> Detector:
    """Detector from a config mapping (``conf/detector/*.yaml``: ``name`` + that detector's options).

    ``None``, ``"none"`` or ``{name: none}`` give the no-op detector (whole image is used).
    """
    if cfg is None:
        cfg = {"name": "none"}
    elif isinstance(cfg, str):
        cfg = {"name": cfg}
    else:
        cfg = _plain_dict(cfg)
    name = str(cfg.pop("name", "none") or "none")
    cfg.pop("_target_", None)
    factory = _DETECTORS.get(name)
    if factory is None:
        raise ConfigError(f"detector.name={name!r} is unknown; choose from {', '.join(available_detectors())}")
    try:
        return factory(**cfg)
    except TypeError as exc:  # unknown option in the config
        raise ConfigError(f"detector {name!r}: bad option ({exc}); see conf/detector/{name}.yaml for the options") from None


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


# --------------------------------------------------------------------------------------------- yolo


def ultralytics_offline() -> None:
    """Keep ultralytics off the network (online check, update checks, analytics, hub); call before importing it.

    ultralytics reads ``YOLO_OFFLINE`` once at import; if it was imported earlier, its cached flags are reset too.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"  # never pip-install at run time (it does so for HEIF, fonts...)
    os.environ.setdefault("YOLO_VERBOSE", "False")
    for module in ("ultralytics.utils", "ultralytics.utils.events", "ultralytics.utils.checks"):
        mod = sys.modules.get(module)
        if mod is not None and getattr(mod, "ONLINE", False):
            mod.ONLINE = False
        if mod is not None and getattr(mod, "AUTOINSTALL", False):
            mod.AUTOINSTALL = False
    events = sys.modules.get("ultralytics.utils.events")
    if events is not None and getattr(events, "events", None) is not None:
        events.events.enabled = False


@contextlib.contextmanager
def torch_global_state_kept() -> Iterator[None]:
    """Undo the process-wide torch settings ultralytics changes (CPU thread count, deterministic mode).

    ultralytics' ``select_device`` sets ``torch.set_num_threads(cpu_count - 1)`` (1 on a 2-core box)
    and training turns on deterministic algorithms; without this the rest of the pipeline
    (embedder, classifier) would silently run single-threaded after the first detection.
    """
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_deterministic = torch.backends.cudnn.deterministic
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic


@register_detector("yolo")
class YoloDetector:
    """ultralytics YOLO (any v8/11 detect checkpoint) over a local weights file.

    ``weights: null`` means "no detector trained yet": the detector then finds nothing (whole image used)
    and says so once in the log; a weights path that does not exist is an error naming the fix.
    """

    name = "yolo"

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        conf: float = 0.25,
        iou: float = 0.5,
        max_det: int = 20,
        imgsz: int | None = None,
        device: str = "cpu",
        min_box_frac: float = 0.0,
        classes: list[int] | None = None,
    ) -> None:
        if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ConfigError(f"detector.conf={conf} / detector.iou={iou}: thresholds must be in [0, 1]")
        if max_det < 1 or (imgsz is not None and imgsz < 32):
            raise ConfigError(f"detector.max_det={max_det} must be >= 1 and detector.imgsz={imgsz} >= 32 (or null)")
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        self.device, self.min_box_frac, self.classes = str(device), float(min_box_frac), classes
        self.weights = Path(weights).expanduser() if weights else None
        self.model = self._load(self.weights) if self.weights is not None else None
        self._lock = threading.Lock()  # an ultralytics predictor is not safe to share between threads
        if self.model is None:
            system_log.warning(f"detector=yolo without weights: whole images are recognised; {MAKE_WEIGHTS_HINT}")
        trained = int((getattr(self.model, "overrides", None) or {}).get("imgsz") or 640) if self.model is not None else 640
        self.imgsz = int(imgsz) if imgsz is not None else trained  # null: the size the weights were trained at

    @staticmethod
    def _load(weights: Path):
        if not weights.is_file():
            raise WeightsError(f"YOLO weights {weights} not found; {MAKE_WEIGHTS_HINT}")
        ultralytics_offline()
        try:
            with torch_global_state_kept():  # torch is imported (threads fixed) before ultralytics sets OMP_NUM_THREADS=1
                from ultralytics import YOLO

                return YOLO(str(weights), task="detect")
        except Exception as exc:  # noqa: BLE001 - torch/ultralytics raise many kinds for a bad file
            raise WeightsError(
                f"YOLO weights {weights} cannot be loaded ({type(exc).__name__}: {str(exc)[:160]}); "
                f"the file is not an ultralytics checkpoint or is truncated; {MAKE_WEIGHTS_HINT}"
            ) from None

    @property
    def names(self) -> dict[int, str]:
        return dict(self.model.names) if self.model is not None else {}

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        if self.model is None or not images:
            return [[] for _ in images]
        with self._lock, torch_global_state_kept():
            results = self.model.predict(
                [im.convert("RGB") for im in images],
                conf=self.conf, iou=self.iou, max_det=self.max_det, imgsz=self.imgsz,
                device=self.device, classes=self.classes, verbose=False, save=False,
            )
        names = self.names
        out: list[list[Box]] = []
        for im, res in zip(images, results):
            w, h = im.size
            xyxy = res.boxes.xyxy.cpu().numpy() if res.boxes is not None else np.zeros((0, 4))
            scores = res.boxes.conf.cpu().numpy() if res.boxes is not None else np.zeros(0)
            cls = res.boxes.cls.cpu().numpy().astype(int) if res.boxes is not None else np.zeros(0, int)
            boxes = [
                Box(float(a), float(b), float(c), float(d), float(s), names.get(int(k), str(int(k)))).clip(w, h)
                for (a, b, c, d), s, k in zip(xyxy, scores, cls)
            ]
            min_area = self.min_box_frac * w * h
            boxes = [b for b in boxes if b.area > max(min_area, 0.0)]
            out.append(sorted(boxes, key=lambda b: -b.score))
        return out


# --------------------------------------------------------------------------------------------- animeface


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


__all__ = [
    "Box", "Detector", "build_detector", "register_detector", "available_detectors", "crop_box",
    "NoDetector", "YoloDetector", "AnimeFaceDetector", "MAKE_WEIGHTS_HINT", "ultralytics_offline", "torch_global_state_kept",
]
