"""The parts a `Recognizer` loads lazily from its version folder (or its config): gallery, embedder, classifier,
tagger, reranker, open-set calibration, detector, ONNX files. Loaded once on first use, under the recognizer's lock.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from ..errors import ConfigError, GalleryError
from ..imageio import RECOGNITION_LIMITS, ImageLimits
from ..log import get_logger
from ..versionfiles import CALIBRATION, GALLERY_META, MODEL, TAG_PROFILES
from .config import RecognizerConfig
from .gallery import Gallery
from .openset import OpenSetCalibration
from .rerank import TagReranker

_log = get_logger("inference")
NO_CLASSIFIER = "mode=model/fusion needs a classifier: a version with model.ckpt, or model_ckpt=PATH (train one with train.py)"


class VersionParts:
    """Lazy, shared-once access to a version's parts; mixed into `Recognizer`, which sets the attributes below."""

    config: RecognizerConfig
    version_dir: Path | None
    batch_size: int
    rerank_default: bool
    mode: str
    _lock: threading.RLock
    _loaded: dict[str, Any]
    _torch_threads_set: bool

    # -- lazy parts ---------------------------------------------------------------------------
    def _part(self, name: str, loader: Callable[[], Any]) -> Any:
        with self._lock:
            if name not in self._loaded:
                t0 = time.perf_counter()
                self._loaded[name] = loader()
                self._torch_threads()
                _log.info(f"loaded {name} in {(time.perf_counter() - t0) * 1e3:.0f} ms")
            return self._loaded[name]

    def _torch_threads(self) -> None:
        """The configured thread count for torch, set once, when torch is first found imported (at construction or
        after a part's load; a recognizer on ONNX Runtime never imports it, its sessions take the count themselves)."""
        torch = sys.modules.get("torch")
        if self.config.threads and torch is not None and not self._torch_threads_set:
            torch.set_num_threads(int(self.config.threads))
            self._torch_threads_set = True

    def _file(self, name: str) -> Path | None:
        p = self.version_dir / name if self.version_dir else None
        return p if p is not None and p.exists() else None

    @property
    def model_ckpt(self) -> Path | None:
        explicit = self.config.model_ckpt
        return Path(explicit) if explicit else self._file(MODEL)

    @property
    def gallery(self) -> Gallery:
        def load() -> Gallery:
            if self._file(GALLERY_META) is None:
                raise GalleryError(f"no gallery in {self.version_dir or 'the configuration'}; build one with ard-gallery build, or use mode=model")
            return Gallery.load(self.version_dir)

        return self._part("gallery", load)

    @property
    def onnx(self) -> Any:
        """The version's ONNX Runtime networks when ``runtime`` selects them (`runtime.OnnxVersion`), else None (torch)."""
        from .runtime import select_runtime

        return self._part("runtime", lambda: select_runtime(self.config.runtime, self.version_dir, self.config.device, self.config.threads))

    @property
    def embedder(self) -> Any:
        def torch_embedder(cfg: Mapping[str, Any], **kw: Any) -> Any:
            from .embedder import build_embedder  # torch: imported only when no exported network serves

            return build_embedder(cfg, device=self.config.device, **kw)

        def load() -> Any:
            ort = self.onnx
            if self._file(GALLERY_META) is not None and self.gallery.embedder_config:
                cfg = dict(self.gallery.embedder_config)
                own = Path(str(cfg.get("ckpt_path") or ""))  # relative paths name a file of the version
                if self.version_dir is not None and cfg.get("ckpt_path") and not own.is_absolute():
                    own = self.version_dir / own
                if cfg.get("kind") == "classifier" and self.model_ckpt is not None and not own.is_file():
                    cfg["ckpt_path"] = str(self.model_ckpt)
                # the exported network on the same views the gallery was built with, else torch
                trained = self.classifier_card if ort is not None and cfg.get("kind") == "classifier" and self.model_ckpt is not None else None
                emb = ort.wrapped_embedder(cfg, self.gallery.embedder_id, self.model_ckpt, trained) if ort is not None else None
                emb = emb or torch_embedder(cfg, base_dir=self.version_dir)
            else:
                emb = torch_embedder(self.config.embedder or {"kind": "timm"})
            if self._file(GALLERY_META) is not None:
                self.gallery.check_embedder(emb.model_id, emb.dim, f"gallery {self.version_dir}")
            return emb

        return self._part("embedder", load)

    @property
    def classifier(self) -> Any:
        def load() -> Any:
            from .embedder import load_classifier

            if self.model_ckpt is None:
                raise ConfigError(NO_CLASSIFIER)
            return load_classifier(self.model_ckpt, device=self.config.device)

        return self._part("classifier", load)

    @property
    def classifier_card(self) -> Any:
        """The classifier's class and tag names, series and views (`card.ClassifierCard`), from the version's ONNX export
        when it is current, else read from its checkpoint without building the network: what recognition needs of it
        besides its outputs (those come from `classifier_transform`, on ONNX Runtime when the version has the export)."""
        from .card import read_classifier_card

        def load() -> Any:
            if self.model_ckpt is None:
                raise ConfigError(NO_CLASSIFIER)
            ort = self.onnx
            card = ort.card(self.model_ckpt) if ort is not None else None
            if card is None and ort is not None and ort.tag_names(self.model_ckpt) is not None:  # exported, card not carried
                vid = Path(self.version_dir).name if self.version_dir else "ID"
                _log.info(f"version {vid}: its ONNX export predates the classifier card, so torch reads it from the checkpoint "
                          f"(seconds); re-export it (python -m anime_role_detect.export --version {vid}) to start faster")
            return card or read_classifier_card(self.model_ckpt)

        return self._part("classifier_card", load)

    @property
    def face_view(self) -> Any:
        """The version's face + figure views (`views.FaceViewSpec`): its gallery's ``face_view`` setting, else the classifier's training."""
        from .views import face_view_for

        setting = self.gallery.embedder_config.get("face_view") if self._file(GALLERY_META) is not None else None
        return face_view_for(setting, self.classifier_card if self.model_ckpt is not None else None)

    @property
    def classifier_transform(self) -> Callable[[Sequence[Image.Image]], Any]:
        from .views import with_face_view

        def load() -> Any:
            if self.model_ckpt is None:
                raise ConfigError(NO_CLASSIFIER)
            ort = self.onnx
            clf = ort.classifier(self.model_ckpt, batch_size=self.batch_size) if ort is not None else None
            if clf is None:
                from .embedder import ClassifierEmbedder

                clf = ClassifierEmbedder(str(self.model_ckpt), batch_size=self.batch_size, device=self.config.device)
            return with_face_view(clf, self.face_view)

        return self._part("classifier_input", load)

    @property
    def tagger(self) -> Any:
        from .tagger import build_tagger

        def load() -> Any:
            ort = self.onnx
            tcfg = dict(self.config.tagger or {"kind": "auto"})
            if tcfg.get("kind") == "auto":  # the classifier's tag head when it has one (data without tags: no tagger)
                names = ort.tag_names(self.model_ckpt) if ort is not None else None
                has_head = self.model_ckpt is not None and bool(names if names is not None else self.classifier_card.tag_names)
                tcfg = {"kind": "classifier"} if has_head else {"kind": "none"}
            if tcfg.get("kind") == "classifier" and self.model_ckpt is not None:
                tcfg["ckpt_path"] = str(self.model_ckpt)
                head = ort.tagger(tcfg, self.model_ckpt) if ort is not None else None
                if head is not None:
                    return head
            return build_tagger(tcfg, base_dir=self.version_dir, device=self.config.device)

        return self._part("tagger", load)

    @property
    def reranker(self) -> TagReranker | None:
        def load() -> TagReranker | None:
            p = self._file(TAG_PROFILES)
            if p is None:
                return None
            rr = TagReranker.load(p)
            if rr.noise is not None and self.tagger is not None and not rr.use_tagger(getattr(self.tagger, "model_id", "")):
                _log.warning(f"{p}: tagger noise model was learned for another tagger; using its scores as probabilities")
            return rr

        return self._part("reranker", load)

    @property
    def calibration(self) -> OpenSetCalibration | None:
        def load() -> OpenSetCalibration | None:
            p = self._file(CALIBRATION)
            return OpenSetCalibration.load(p) if p is not None else None

        return self._part("calibration", load)

    @property
    def whitened(self) -> Any:
        """The version's whitened gallery of its trained characters (`whitened.WhitenedGallery`); None without one
        (versions built before it, ``fusion.whitened: false``)."""
        from .whitened import WhitenedGallery

        enabled = self.config.fusion.whitened and self.version_dir is not None
        return self._part("whitened", lambda: WhitenedGallery.load(self.version_dir) if enabled else None)

    @property
    def limits(self) -> ImageLimits:
        """How untrusted bytes are decoded: the config's `limits` over recognition's (`RECOGNITION_LIMITS`: a big JPEG
        decodes drafted, its answers' boxes still in its own pixels)."""
        lim = dict(self.config.limits or {})
        unknown = sorted(set(lim) - {f.name for f in fields(ImageLimits)})
        if unknown:
            raise ConfigError(f"limits: unknown key(s) {', '.join(unknown)}; choose from {', '.join(f.name for f in fields(ImageLimits))}")
        return replace(RECOGNITION_LIMITS, **{k: int(v) for k, v in lim.items()})

    @property
    def detector(self) -> Any:
        def load() -> Any:
            dcfg = self.config.detector
            if not dcfg or (isinstance(dcfg, Mapping) and dcfg.get("kind", dcfg.get("name", "none")) == "none"):
                return None
            from .detector import build_detector

            return build_detector(dcfg)

        return self._part("detector", load)

    def warmup(self, mode: str | None = None) -> None:
        """Load everything `mode` needs now (a server calls this at start-up instead of on the first request)."""
        mode = mode if mode in ("clip", "model", "fusion") else self.mode
        if mode in ("clip", "fusion"):
            _ = self.embedder
        if mode in ("model", "fusion"):
            _ = self.classifier_card, self.classifier_transform
        _ = self.detector, self.reranker, self.calibration
        if self.rerank_default and self.reranker is not None:
            _ = self.tagger
