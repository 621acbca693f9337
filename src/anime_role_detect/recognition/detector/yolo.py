"""ultralytics YOLO detector: a local ``.pt`` or one fetched by hub ``repo_id`` + ``filename``; never phones home.

Make weights offline with ``python -m anime_role_detect.cli.detector out=DIR``. `ultralytics_offline`
and `torch_global_state_kept` keep ultralytics off the network and undo the process-wide torch
settings it changes (also used by the detector trainer).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ...errors import ConfigError, WeightsError
from ...log import system_log
from ..hub import hub_file
from .base import MAKE_WEIGHTS_HINT, Box, register_detector


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
    """ultralytics YOLO (any v8/11 detect checkpoint) over a local weights file or a hub ``repo_id`` + ``filename``.

    ``weights: null`` (and no ``repo_id``) means "no detector trained yet": the detector then finds
    nothing (whole image used) and says so once in the log; a weights path that does not exist, or a
    hub file that is neither cached nor downloadable, is an error naming the fix.
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
        repo_id: str | None = None,
        filename: str | None = None,
        revision: str | None = None,
    ) -> None:
        if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ConfigError(f"detector.conf={conf} / detector.iou={iou}: thresholds must be in [0, 1]")
        if max_det < 1 or (imgsz is not None and imgsz < 32):
            raise ConfigError(f"detector.max_det={max_det} must be >= 1 and detector.imgsz={imgsz} >= 32 (or null)")
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        self.device, self.min_box_frac, self.classes = str(device), float(min_box_frac), classes
        self.weights = self._weights_file(weights, repo_id, filename, revision)
        self.model = self._load(self.weights) if self.weights is not None else None
        self._lock = threading.Lock()  # an ultralytics predictor is not safe to share between threads
        if self.model is None:
            system_log.warning(f"detector=yolo without weights: whole images are recognised; {MAKE_WEIGHTS_HINT}")
        trained = int((getattr(self.model, "overrides", None) or {}).get("imgsz") or 640) if self.model is not None else 640
        self.imgsz = int(imgsz) if imgsz is not None else trained  # null: the size the weights were trained at

    @staticmethod
    def _weights_file(weights: str | os.PathLike[str] | None, repo_id: str | None, filename: str | None,
                      revision: str | None) -> Path | None:
        """A local ``weights`` file wins; else ``repo_id`` + ``filename`` through the hub cache; else None (no detector yet)."""
        if weights:
            return Path(weights).expanduser()
        if not repo_id:
            return None
        if not filename:
            raise ConfigError(f"detector.repo_id={repo_id!r} needs detector.filename (the .pt file in that repo, e.g. detector.pt)")
        return hub_file(repo_id, filename, revision, what="YOLO detector", local_hint="set detector.weights to a local .pt")

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
