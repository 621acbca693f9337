"""`Recognizer`: the one place that composes detector -> crops -> embedder/gallery and/or classifier -> tagger -> reranker -> open-set.

Modes: ``clip`` (embedding + Faiss gallery), ``model`` (fine-tuned classifier), ``fusion`` (both
scores blended, plus the tagger). ``rerank`` toggles tag reranking in any mode. Models load lazily
on first use and are shared per process; answers are cached by image content hash (LRU); a batch
of images goes through each model as one batch. Loads a registry version folder (`from_version`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from ..confutil import to_plain as _plain
from ..errors import ConfigError, GalleryError, RegistryError
from ..imageio import DEFAULT_LIMITS, content_hash, decode_image
from ..log import get_logger
from .gallery import META_FILE, Gallery
from .openset import CALIBRATION_FILE, OpenSetCalibration
from .rerank import PROFILE_FILE, Candidate, TagReranker
from .schema import UNKNOWN, Answer, Detection, Rerank, TagScore, TopK, VideoAnswer

MODES = ("clip", "model", "fusion")
MODEL_FILE = "model.ckpt"
FeatureSink = Callable[[Answer, np.ndarray], None]
_log = get_logger("inference")


@dataclass
class _Crop:
    """One region to recognise: which input image it came from and where."""

    image_index: int
    image: Image.Image
    box: list[float]
    detector_score: float
    whole_image: bool


@dataclass
class _Scored:
    """Per-crop results of the scoring stages."""

    candidates: list[list[Candidate]]
    embeddings: np.ndarray | None = None
    tag_probs: np.ndarray | None = None  # tagger outputs [N, T_tagger]
    timings: dict[str, float] = field(default_factory=dict)


class LRUCache:
    """Thread-safe least-recently-used cache of answers keyed by content hash + settings."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._data: OrderedDict[tuple, Answer] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> Answer | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: tuple, value: Answer) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class Recognizer:
    """Names the characters in images, folders of images and videos, from a version folder or explicit files."""

    def __init__(self, cfg: Mapping[str, Any], version_dir: str | Path | None = None, version: str = "") -> None:
        self.cfg: dict[str, Any] = dict(_plain(cfg) or {})
        self.version_dir = Path(version_dir) if version_dir else None
        self.version = version or (self.version_dir.name if self.version_dir else "")
        self.mode = str(self.cfg.get("mode") or "clip")
        self._check_mode(self.mode)
        self.rerank_default = bool(self.cfg.get("rerank", True))
        self.topk = int(self.cfg.get("topk", 5))
        self.n_candidates = max(self.topk, int(self.cfg.get("rerank_candidates", 10)))
        self.crop_margin = float(self.cfg.get("crop_margin", 0.1))
        self.batch_size = int(self.cfg.get("batch_size", 16))
        self.fusion_weight = float((self.cfg.get("fusion") or {}).get("gallery_weight", 0.5))
        self.openset_enabled = bool((self.cfg.get("openset") or {}).get("enabled", True))
        self.cache = LRUCache(int(self.cfg.get("cache_size", 2048)))
        self.feature_sink: FeatureSink | None = None
        self._lock = threading.RLock()
        self._generation = 0
        self._loaded: dict[str, Any] = {}
        threads = self.cfg.get("threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_version(cls, version_dir: str | Path, cfg: Mapping[str, Any] | None = None) -> "Recognizer":
        """Recognizer over a version folder (``model.ckpt``, ``gallery.*``, ``tag_profiles.json``, ``calibration.json``)."""
        d = Path(version_dir)
        if not d.is_dir():
            raise RegistryError(f"version folder {d} does not exist; see `python -m anime_role_detect.registry list`")
        if not (d / META_FILE).is_file() and not (d / MODEL_FILE).is_file():
            raise RegistryError(f"{d} has neither a gallery ({META_FILE}) nor a model ({MODEL_FILE}); build one with gallery_cli build or train.py")
        return cls(cfg or {}, version_dir=d)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Recognizer":
        """Resolve ``gallery=`` (explicit folder) or ``version=`` (registry id / latest), else a bare ``model_ckpt``."""
        c = dict(_plain(cfg) or {})
        if c.get("gallery"):
            return cls.from_version(c["gallery"], c)
        version = c.get("version")
        if version:
            from ..registry import Registry

            reg = Registry(c.get("registry_dir") or "outputs/registry")
            try:
                path = reg.path(str(version))
            except RegistryError:
                if not c.get("model_ckpt"):
                    raise
            else:
                return cls(c, version_dir=path, version=path.name)
        if c.get("model_ckpt"):
            c.setdefault("mode", "model")
            return cls(c)
        raise ConfigError("nothing to recognise with: set gallery=FOLDER, version=latest|ID (registry), or model_ckpt=PATH")

    # -- lazy parts ---------------------------------------------------------------------------
    def _part(self, name: str, loader: Callable[[], Any]) -> Any:
        with self._lock:
            if name not in self._loaded:
                t0 = time.perf_counter()
                self._loaded[name] = loader()
                _log.info(f"loaded {name} in {(time.perf_counter() - t0) * 1e3:.0f} ms")
            return self._loaded[name]

    def _file(self, name: str) -> Path | None:
        p = self.version_dir / name if self.version_dir else None
        return p if p is not None and p.exists() else None

    @property
    def model_ckpt(self) -> Path | None:
        explicit = self.cfg.get("model_ckpt")
        return Path(explicit) if explicit else self._file(MODEL_FILE)

    @property
    def gallery(self) -> Gallery:
        def load() -> Gallery:
            if self._file(META_FILE) is None:
                raise GalleryError(f"no gallery in {self.version_dir or 'the configuration'}; build one with gallery_cli build, or use mode=model")
            return Gallery.load(self.version_dir)

        return self._part("gallery", load)

    @property
    def embedder(self) -> Any:
        from .embedder import build_embedder

        def load() -> Any:
            if self._file(META_FILE) is not None and self.gallery.embedder_config:
                cfg = dict(self.gallery.embedder_config)
                own = Path(str(cfg.get("ckpt_path") or ""))  # relative paths name a file of the version
                if self.version_dir is not None and cfg.get("ckpt_path") and not own.is_absolute():
                    own = self.version_dir / own
                if cfg.get("kind") == "classifier" and self.model_ckpt is not None and not own.is_file():
                    cfg["ckpt_path"] = str(self.model_ckpt)
                emb = build_embedder(cfg, base_dir=self.version_dir)
            else:
                emb = build_embedder(self.cfg.get("embedder") or {"kind": "timm"})
            if self._file(META_FILE) is not None:
                self.gallery.check_embedder(emb.model_id, emb.dim, f"gallery {self.version_dir}")
            return emb

        return self._part("embedder", load)

    @property
    def classifier(self) -> Any:
        from .embedder import load_classifier

        def load() -> Any:
            if self.model_ckpt is None:
                raise ConfigError("mode=model/fusion needs a classifier: a version with model.ckpt, or model_ckpt=PATH (train one with train.py)")
            return load_classifier(self.model_ckpt)

        return self._part("classifier", load)

    @property
    def classifier_transform(self) -> Callable[[Sequence[Image.Image]], Any]:
        from .embedder import ClassifierEmbedder

        return self._part("classifier_input", lambda: ClassifierEmbedder(str(self.model_ckpt), batch_size=self.batch_size))

    @property
    def tagger(self) -> Any:
        from .tagger import build_tagger

        def load() -> Any:
            tcfg = dict(self.cfg.get("tagger") or {"kind": "auto"})
            if tcfg.get("kind") == "auto":  # the classifier's tag head when it has one (data without tags: no tagger)
                has_head = self.model_ckpt is not None and bool(getattr(self.classifier, "tag_names", None))
                tcfg = {"kind": "classifier"} if has_head else {"kind": "none"}
            if tcfg.get("kind") == "classifier" and self.model_ckpt is not None:
                tcfg["ckpt_path"] = str(self.model_ckpt)
            return build_tagger(tcfg, base_dir=self.version_dir)

        return self._part("tagger", load)

    @property
    def reranker(self) -> TagReranker | None:
        def load() -> TagReranker | None:
            p = self._file(PROFILE_FILE)
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
            p = self._file(CALIBRATION_FILE)
            return OpenSetCalibration.load(p) if p is not None else None

        return self._part("calibration", load)

    @property
    def detector(self) -> Any:
        def load() -> Any:
            dcfg = self.cfg.get("detector")
            if not dcfg or (isinstance(dcfg, Mapping) and dcfg.get("name", "none") == "none"):
                return None
            from .detector import build_detector

            return build_detector(dcfg)

        return self._part("detector", load)

    def warmup(self, mode: str | None = None) -> None:
        """Load everything `mode` needs now (a server calls this at start-up instead of on the first request)."""
        mode = mode or self.mode
        if mode in ("clip", "fusion"):
            _ = self.embedder
        if mode in ("model", "fusion"):
            _ = self.classifier
        _ = self.detector, self.reranker, self.calibration
        if self.rerank_default and self.reranker is not None:
            _ = self.tagger

    # -- stages -------------------------------------------------------------------------------
    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose clip (gallery), model (classifier) or fusion")

    def _crops(self, images: Sequence[Image.Image]) -> tuple[list[_Crop], float]:
        t0 = time.perf_counter()
        det = self.detector
        boxes = det.detect(list(images)) if det is not None else [[] for _ in images]
        crops: list[_Crop] = []
        for i, (img, found) in enumerate(zip(images, boxes)):
            if not found:
                crops.append(_Crop(i, img, [0.0, 0.0, float(img.width), float(img.height)], 1.0, True))
                continue
            from .detector import crop_box

            for b in found:
                crops.append(_Crop(i, crop_box(img, b, self.crop_margin), [round(float(v), 1) for v in b.as_list()[:4]], float(b.score), False))
        return crops, (time.perf_counter() - t0) * 1e3

    def _classify(self, crops: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Classifier softmax ``[N, C]`` and tag probabilities ``[N, T]`` (None without a tag head), in batches."""
        import torch

        model, prep = self.classifier, self.classifier_transform
        probs, tags = [], []
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                logits, tag_logits = model(prep.preprocess(crops[i : i + self.batch_size]))
                probs.append(torch.softmax(logits.float(), 1).numpy())
                if tag_logits is not None and tag_logits.numel():
                    tags.append(torch.sigmoid(tag_logits.float()).numpy())
        return np.concatenate(probs), (np.concatenate(tags) if tags else None)

    def _model_candidates(self, probs: np.ndarray) -> list[list[Candidate]]:
        names, series = self.classifier.class_names, self.classifier.series
        out = []
        for row in probs:
            idx = np.argsort(-row)[: self.n_candidates]
            out.append([(names[i], series.get(names[i], ""), float(row[i])) for i in idx])
        return out

    def _score(self, crops: Sequence[Image.Image], mode: str, need_tags: bool, need_embeddings: bool) -> _Scored:
        """Candidate lists per crop for `mode`, plus tag probabilities when reranking and embeddings for the sink."""
        tm: dict[str, float] = {}
        emb = gal = probs = tag_probs = None
        if mode in ("clip", "fusion") or need_embeddings:
            t0 = time.perf_counter()
            emb = self.embedder.embed(list(crops))
            tm["embed"] = (time.perf_counter() - t0) * 1e3
        if mode in ("clip", "fusion"):
            t0 = time.perf_counter()
            n_chars = len(self.gallery.characters())
            gal = self.gallery.search(emb, k=max(self.n_candidates, n_chars if mode == "fusion" else 0))
            tm["search"] = (time.perf_counter() - t0) * 1e3
        if mode in ("model", "fusion"):
            t0 = time.perf_counter()
            probs, head_tags = self._classify(crops)
            tm["classify"] = (time.perf_counter() - t0) * 1e3
            if need_tags and type(self.tagger).__name__ == "ClassifierTagger" and head_tags is not None:
                tag_probs = head_tags  # the tag head already ran inside the classifier forward pass
        if mode == "clip":
            cands = gal
        elif mode == "model":
            cands = self._model_candidates(probs)
        else:
            cands = self._fuse(gal, probs)
        if need_tags and tag_probs is None and self.tagger is not None:
            t0 = time.perf_counter()
            tag_probs = self.tagger.predict(list(crops))
            tm["tag"] = (time.perf_counter() - t0) * 1e3
        return _Scored(cands, emb, tag_probs, tm)

    def _fuse(self, gal: list[list[Candidate]], probs: np.ndarray) -> list[list[Candidate]]:
        """Blend gallery cosine and classifier probability per character (gallery-only characters keep their cosine)."""
        names, series = self.classifier.class_names, self.classifier.series
        col = {n: i for i, n in enumerate(names)}
        w = self.fusion_weight
        out = []
        for g, row in zip(gal, probs):
            scores: dict[str, tuple[str, float]] = {}
            for c, s, sim in g:
                scores[c] = (s, w * sim + (1 - w) * float(row[col[c]]) if c in col else sim)
            for i in np.argsort(-row)[: self.n_candidates]:
                c = names[i]
                if c not in scores:
                    scores[c] = (series.get(c, ""), (1 - w) * float(row[i]))
            ranked = sorted(scores.items(), key=lambda kv: -kv[1][1])[: self.n_candidates]
            out.append([(c, s, float(v)) for c, (s, v) in ranked])
        return out

    def _detection(self, crop: _Crop, cands: list[Candidate], tag_row: np.ndarray | None, mode: str, rerank: bool) -> Detection:
        info: Rerank | None = None
        base_top = cands[0][2] if cands else 0.0
        if rerank and tag_row is not None and self.reranker is not None and cands:
            t_names = self.tagger.tag_names
            res = self.reranker.rerank(cands, self.reranker.align(tag_row, t_names)[0], weight=self.reranker.weight_for(mode))
            cands, info = res.candidates, res.info
        tags: list[TagScore] = []
        if tag_row is not None and self.tagger is not None:
            from .tagger import thresholded

            tags = thresholded(tag_row[None], self.tagger.tag_names, self.tagger.thresholds, max_tags=16)[0]
        known = bool(cands) and (not self.openset_enabled or self.calibration is None or self.calibration.is_known(mode, base_top))
        role, series, sim = (cands[0] if cands else (UNKNOWN, "", 0.0))
        return Detection(
            box=crop.box, detector_score=round(crop.detector_score, 4),
            role=role if known else UNKNOWN, series=series if known else "",
            similarity=round(float(np.clip(sim, 0.0, 1.0)), 4), unknown=not known,
            topk=[TopK(role=c, series=s, score=round(float(np.clip(v, 0.0, 1.0)), 4)) for c, s, v in cands[: self.topk]],
            tags=tags, rerank=info,
        )

    # -- public API ---------------------------------------------------------------------------
    def recognize_batch(self, items: Sequence[tuple[Image.Image, str]], mode: str | None = None, rerank: bool | None = None,
                        hashes: Sequence[str] | None = None) -> list[Answer]:
        """Answers for ``(image, filename)`` pairs; uncached images go through every model as one batch."""
        mode = mode or self.mode
        self._check_mode(mode)
        rerank = self.rerank_default if rerank is None else bool(rerank)
        hashes = list(hashes) if hashes is not None else [_pixel_hash(img) for img, _ in items]
        keys = [(h, mode, rerank, self.topk, self.version, self._generation) for h in hashes]
        answers: list[Answer | None] = []
        for (img, name), key in zip(items, keys):
            hit = self.cache.get(key) if self.feature_sink is None else None
            answers.append(hit.model_copy(update={"filename": name}) if hit is not None else None)
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            fresh = self._recognize_uncached([items[i][0] for i in todo], [items[i][1] for i in todo], [hashes[i] for i in todo], mode, rerank)
            for i, a in zip(todo, fresh):
                answers[i] = a
                self.cache.put(keys[i], a)
        return [a for a in answers if a is not None]

    def _recognize_uncached(self, images: list[Image.Image], names: list[str], hashes: list[str], mode: str, rerank: bool) -> list[Answer]:
        t_all = time.perf_counter()
        crops, t_detect = self._crops(images)
        use_tags = (rerank and self.reranker is not None) or mode == "fusion"
        scored = self._score([c.image for c in crops], mode, use_tags and self.tagger is not None, self.feature_sink is not None)
        t0 = time.perf_counter()
        dets = [self._detection(c, scored.candidates[j], None if scored.tag_probs is None else scored.tag_probs[j], mode, rerank)
                for j, c in enumerate(crops)]
        t_rerank = (time.perf_counter() - t0) * 1e3
        n = max(1, len(images))
        stage = {"detect": t_detect, **scored.timings, "rerank": t_rerank}
        total = (time.perf_counter() - t_all) * 1e3
        answers = []
        for i, (img, name, h) in enumerate(zip(images, names, hashes)):
            mine = [d for c, d in zip(crops, dets) if c.image_index == i]
            best = max((d for d in mine if not d.unknown), key=lambda d: d.similarity, default=None)
            timings = {k: round(v / n, 2) for k, v in stage.items()}
            timings["total"] = round(total / n, 2)
            if n > 1:
                timings["batch_images"] = float(n)
            ans = Answer(
                filename=name, role=best.role if best else UNKNOWN, series=best.series if best else "",
                similarity=best.similarity if best else max((d.similarity for d in mine), default=0.0),
                boxes=[d.box for d in mine], unknown=best is None, mode=mode,
                whole_image=any(c.whole_image for c in crops if c.image_index == i), detections=mine,
                timings_ms=timings, image_sha256=h, version=self.version, width=img.width, height=img.height,
            )
            answers.append(ans)
            if self.feature_sink is not None and scored.embeddings is not None:
                rows = np.array([j for j, c in enumerate(crops) if c.image_index == i])
                self.feature_sink(ans, scored.embeddings[rows])
        _log.info(f"recognized {len(images)} image(s) mode={mode} rerank={rerank} in {total:.1f} ms")
        return answers

    def recognize(self, image: Image.Image, filename: str = "", mode: str | None = None, rerank: bool | None = None) -> Answer:
        """Answer for one decoded image."""
        return self.recognize_batch([(image, filename)], mode=mode, rerank=rerank)[0]

    def recognize_bytes(self, data: bytes, filename: str = "<upload>", mode: str | None = None, rerank: bool | None = None) -> Answer:
        """Decode untrusted bytes safely (`imageio.decode_image`), then recognise; cache key = content hash of the bytes."""
        t0 = time.perf_counter()
        img = decode_image(data, filename, self.cfg.get("limits") and _limits(self.cfg["limits"]) or DEFAULT_LIMITS)
        t_decode = (time.perf_counter() - t0) * 1e3
        ans = self.recognize_batch([(img, filename)], mode=mode, rerank=rerank, hashes=[content_hash(data)])[0]
        timings = dict(ans.timings_ms)
        timings["decode"] = round(t_decode, 2)
        timings["total"] = round(timings.get("total", 0.0) + t_decode, 2)
        return ans.model_copy(update={"timings_ms": timings})

    def recognize_video(self, path: str | Path, sample_fps: float | None = None, mode: str | None = None, rerank: bool | None = None,
                        on_batch: Callable[[int, float], None] | None = None, filename: str | None = None) -> VideoAnswer:
        """Frames sampled at `sample_fps`, recognised in batches, merged into per-character appearances.

        `filename` names the answer and its frames (``<filename>@t=..s``); default: the file's name.
        """
        from .video import recognize_video

        vcfg = self.cfg.get("video_options") or {}
        return recognize_video(self, path, sample_fps=float(sample_fps or self.cfg.get("sample_fps") or 1.0), batch_size=self.batch_size,
                               backend=vcfg.get("backend", "av"), max_frames=vcfg.get("max_frames"), on_batch=on_batch, mode=mode, rerank=rerank,
                               filename=filename)

    # -- enrollment ---------------------------------------------------------------------------
    def enroll(self, character: str, series: str, images: Sequence[Image.Image], sources: Sequence[str] | None = None) -> int:
        """Add a character to the gallery from a few images, without retraining; returns prototype rows added."""
        if not images:
            raise GalleryError(f"no images given to enroll {character!r}; give at least one")
        emb = self.embedder.embed(list(images))
        with self._lock:
            n = self.gallery.add(character, series, emb, sources, embedder_id=self.embedder.model_id)
            self._generation += 1
            self.cache.clear()
        return n

    def remove(self, character: str) -> int:
        """Delete a character from the gallery; returns rows removed (0 when it was not enrolled)."""
        with self._lock:
            n = self.gallery.remove(character)
            self._generation += 1
            self.cache.clear()
        return n

    def characters(self) -> list[dict]:
        """Known characters: gallery characters ``{name, series, prototypes}``, else the classifier's classes."""
        if self._file(META_FILE) is not None:
            return self.gallery.characters()
        if self.model_ckpt is not None:
            m = self.classifier
            return [{"name": c, "series": m.series.get(c, ""), "prototypes": 0} for c in m.class_names]
        return []

    def save_gallery(self, directory: str | Path | None = None) -> Path:
        """Persist the (possibly edited) gallery: atomic per file; default is the loaded version folder."""
        d = Path(directory) if directory else self.version_dir
        if d is None:
            raise ConfigError("no folder to save the gallery to; pass one")
        return self.gallery.save(d)


def _pixel_hash(img: Image.Image) -> str:
    """Content hash of decoded pixels (cache key for images given as PIL objects)."""
    h = hashlib.sha256(f"{img.mode}:{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _limits(cfg: Mapping[str, Any]) -> Any:
    from ..imageio import ImageLimits

    return ImageLimits(**{k: int(v) for k, v in dict(cfg).items()})
