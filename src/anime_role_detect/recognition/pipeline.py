"""`Recognizer`: the one place that composes detector -> crops -> embedder/gallery and/or classifier -> tagger -> reranker -> open-set.

Modes: ``clip`` (embedding + Faiss gallery), ``model`` (fine-tuned classifier), ``fusion`` (both
scores blended, plus the tagger); ``auto`` (the default) answers in the one the version measured best on its
evaluation set. ``rerank`` toggles tag reranking in any mode. Models load lazily
on first use and are shared per process; answers are cached by image content hash (LRU); a batch
of images goes through each model as one batch. Loads a registry version folder (`from_version`).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, GalleryError, RegistryError
from ..fsutil import read_json
from ..imageio import content_hash, decode_image, original_size, scale_to_original
from ..log import FILE_ONLY, get_logger
from ..versionfiles import EVAL_METRICS, GALLERY_META, MODEL
from .cache import Cached, LRUCache
from .config import AUTO, MODES, RecognizerConfig, modes_for
from .device import running_device
from .openset import gallery_probabilities
from .parts import VersionParts
from .rerank import Candidate
from .schema import UNKNOWN, Answer, Detection, Rerank, TagScore, TopK, VideoAnswer
from .sinks import AnswerSink

_log = get_logger("inference")
#: Appended to an enrolled picture's source for the row of its mirror image (`EnrolOptions.mirror`).
MIRROR_SUFFIX = "#mirror"


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
    gallery_best: list[float] | None = None  # clip / fusion: each crop's best gallery cosine (fusion's open-set score)


ConfigLike = RecognizerConfig | Mapping[str, Any] | None


def as_config(cfg: ConfigLike) -> RecognizerConfig:
    """A `RecognizerConfig` from one, from a mapping (unknown keys: one-line error) or from None (defaults)."""
    return cfg if isinstance(cfg, RecognizerConfig) else RecognizerConfig.from_mapping(cfg)


class Recognizer(VersionParts):
    """Names the characters in images, folders of images and videos, from a version folder or explicit files.

    `sinks` receive every answer with its per-detection embeddings and, when known, the uploaded bytes
    (`recognition.sinks.AnswerSink`; the fusion feature log is one), cached answers included.
    """

    def __init__(self, cfg: ConfigLike = None, version_dir: str | Path | None = None, version: str = "",
                 sinks: Sequence[AnswerSink] = ()) -> None:
        self.config = as_config(cfg)
        c = self.config
        self.version_dir = Path(version_dir).resolve() if version_dir else None  # relative files of the version resolve once
        self.version = version or (self.version_dir.name if self.version_dir else "")
        self._mode: str | None = None if c.mode == AUTO else c.mode  # auto: resolved on first use (`mode`)
        self.rerank_default = c.rerank
        self.topk = c.topk
        self.n_candidates = max(c.topk, c.rerank_candidates)
        self.crop_margin = c.crop_margin
        self.batch_size = c.batch_size
        self.fusion_weight = c.fusion.gallery_weight  # None: the version's fitted one
        self.fusion_temperature = c.fusion.gallery_temperature  # None: the version's calibrated one
        self.fusion_untrained = c.fusion.untrained  # how fusion scores a character the classifier was not trained on
        self.whitened_temperature: float | None = None  # None: the version's calibrated one (a build sets it while fitting)
        self.openset_enabled = c.openset.enabled
        self.cache = LRUCache(c.cache_size)
        self.sinks: list[AnswerSink] = []
        self._lock = threading.RLock()
        self._generation = 0
        self._gallery_only: tuple[int, bool] | None = None  # (generation, `_gallery_only_characters`)
        self._loaded: dict[str, Any] = {}
        self._torch_threads_set = False
        for sink in sinks:
            self.add_sink(sink)
        self._torch_threads()  # now if torch is loaded, else when a part first imports it

    def add_sink(self, sink: AnswerSink) -> AnswerSink:
        """Send every answer (with embeddings and bytes) to `sink` from now on; a sink with ``bind`` is told whose answers they are."""
        bind = getattr(sink, "bind", None)
        if callable(bind):
            bind(self)
        self.sinks.append(sink)
        return sink

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_version(cls, version_dir: str | Path, cfg: ConfigLike = None, sinks: Sequence[AnswerSink] = ()) -> "Recognizer":
        """Recognizer over a version folder (``model.ckpt``, ``gallery.*``, ``tag_profiles.json``, ``calibration.json``)."""
        d = Path(version_dir)
        if not d.is_dir():
            raise RegistryError(f"version folder {d} does not exist; see `python -m anime_role_detect.registry list`")
        if not (d / GALLERY_META).is_file() and not (d / MODEL).is_file():
            raise RegistryError(f"{d} has neither a gallery ({GALLERY_META}) nor a model ({MODEL}); build one with ard-gallery build or train.py register=true")
        return cls(cfg, version_dir=d, sinks=sinks)

    @classmethod
    def from_config(cls, cfg: ConfigLike, sinks: Sequence[AnswerSink] = ()) -> "Recognizer":
        """Resolve ``gallery=`` (explicit folder) or ``version=`` (registry id / latest), else a bare ``model_ckpt``."""
        c = as_config(cfg)
        if c.gallery:
            return cls.from_version(c.gallery, c, sinks=sinks)
        if c.version:
            from ..registry import Registry

            reg = Registry(c.registry_dir or "outputs/registry")
            try:
                path = reg.path(str(c.version))
            except RegistryError:
                if not c.model_ckpt:
                    raise
            else:
                return cls(c, version_dir=path, version=path.name, sinks=sinks)
        if c.model_ckpt:
            explicit_mode = isinstance(cfg, RecognizerConfig) or "mode" in dict(cfg or {})
            return cls(c if explicit_mode else c.replace(mode="model"), sinks=sinks)
        raise ConfigError("nothing to recognise with: set gallery=FOLDER, version=latest|ID (registry), or model_ckpt=PATH")

    # -- stages -------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The mode answers use when a request names none: the configured one, or for ``auto`` the best the version
        measured on its evaluation set among those it supports (`evalset.best_mode`)."""
        if self._mode is None:
            from .evalset import best_mode

            measured = read_json(self.version_dir / EVAL_METRICS) if self._file(EVAL_METRICS) else {}
            figures = measured.get("top1")
            modes = self.supported_modes()
            if "model" in modes and self._gallery_only_characters():
                modes.remove("model")  # the classifier cannot name a character enrolled after it was trained
            self._mode = best_mode(modes, figures, self.rerank_default, measured.get("pictures"))
            _log.info(f"mode=auto answers in {self._mode} (version evaluation: {figures or 'none'})")
        return self._mode

    def _gallery_only_characters(self) -> bool:
        """True when the gallery names a character the classifier never trained on (enrolled later). Kept per gallery
        generation: fusion asks it for every batch (`gallery_weight`), and the answer only moves with an enrolment."""
        if self._gallery_only is None or self._gallery_only[0] != self._generation:
            known = set(self.classifier_card.class_names)
            self._gallery_only = (self._generation, any(c["name"] not in known for c in self.characters()))
        return self._gallery_only[1]

    def supported_modes(self) -> list[str]:
        """clip needs a gallery, model a classifier, fusion both."""
        return modes_for(self._file(GALLERY_META) is not None, self.model_ckpt is not None)

    def _resolve_mode(self, mode: str | None) -> str:
        mode = self.mode if mode in (None, AUTO) else mode
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose auto, clip (gallery), model (classifier) or fusion")
        return mode

    def _crops(self, images: Sequence[Image.Image]) -> tuple[list[_Crop], float]:
        t0 = time.perf_counter()
        det = self.detector
        boxes = det.detect(list(images)) if det is not None else [[] for _ in images]
        crops: list[_Crop] = []
        for i, (img, found) in enumerate(zip(images, boxes)):
            if not found:
                w, h = original_size(img)
                crops.append(_Crop(i, img, [0.0, 0.0, float(w), float(h)], 1.0, True))
                continue
            from .detector import crop_box

            sx, sy = scale_to_original(img)  # a drafted decode: boxes in the picture's own pixels (`imageio.draft_side`)
            for b in found:
                x1, y1, x2, y2 = b.as_list()[:4]
                crops.append(_Crop(i, crop_box(img, b, self.crop_margin), [round(float(v), 1) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy)],
                                   float(b.score), False))
        return crops, (time.perf_counter() - t0) * 1e3

    def _classify(self, crops: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Classifier softmax ``[N, C]`` and tag probabilities ``[N, T]`` (None without a tag head), in batches on the device."""
        return self.classifier_transform.heads(list(crops))

    def _shares_classifier(self) -> bool:
        """True when the gallery embedder *is* the version's classifier: one backbone pass then serves every head."""
        if self._file(GALLERY_META) is None or self.model_ckpt is None:
            return False
        emb = self.embedder  # ClassifierEmbedder, or runtime.OnnxClassifier (ckpt_path None when model.ckpt changed since the export)
        ckpt = getattr(emb, "ckpt_path", None)
        return hasattr(emb, "embed_with_heads") and ckpt is not None and Path(ckpt).resolve() == self.model_ckpt.resolve()

    def _model_candidates(self, probs: np.ndarray) -> list[list[Candidate]]:
        names, series = self.classifier_card.class_names, self.classifier_card.series
        out = []
        for row in probs:
            idx = np.argsort(-row)[: self.n_candidates]
            out.append([(names[i], series.get(names[i], ""), float(row[i])) for i in idx])
        return out

    def _score(self, crops: Sequence[Image.Image], mode: str, need_tags: bool, need_embeddings: bool) -> _Scored:
        """Candidate lists per crop for `mode`, plus tag probabilities when reranking and embeddings for the sink."""
        tm: dict[str, float] = {}
        emb = gal = probs = head_tags = tag_probs = None
        head_is_tagger = need_tags and type(self.tagger).__name__ in ("ClassifierTagger", "OnnxClassifierTagger")
        want_emb = mode in ("clip", "fusion") or need_embeddings
        want_heads = mode in ("model", "fusion") or head_is_tagger
        t0 = time.perf_counter()
        if want_emb and want_heads and self._shares_classifier():  # one backbone pass per view for every head
            emb, probs, head_tags = self.embedder.embed_with_heads(list(crops))
            tm["forward"] = (time.perf_counter() - t0) * 1e3
        else:
            if want_emb:
                emb = self.embedder.embed(list(crops))
                tm["embed"] = (time.perf_counter() - t0) * 1e3
            if want_heads:
                t0 = time.perf_counter()
                probs, head_tags = self._classify(crops)
                tm["classify"] = (time.perf_counter() - t0) * 1e3
        if head_is_tagger and head_tags is not None:
            tag_probs = head_tags  # the tag head already ran in the classifier pass
        if mode in ("clip", "fusion"):
            t0 = time.perf_counter()
            n_chars = self.gallery.n_characters  # no list of every character per request (1.3 ms at 10k characters)
            # fusion reads the gallery's probability over every character; an approximate index (hnsw / ivfpq) would
            # fetch up to 8x `search_rows` rows for that (6x the search time at 100k rows, docs/recognition.md), while at
            # the fitted temperature the characters past its best few carry almost none of the probability
            every = n_chars if mode == "fusion" and self.gallery.kind in (None, "flat") else 0
            gal = self.gallery.search(emb, k=max(self.n_candidates, every))
            tm["search"] = (time.perf_counter() - t0) * 1e3
        if mode == "clip":
            cands = gal
        elif mode == "model":
            cands = self._model_candidates(probs)
        else:
            cands = self._fuse(gal, self._trained_probabilities(emb, probs))
        if need_tags and tag_probs is None and self.tagger is not None:
            t0 = time.perf_counter()
            tag_probs = self.tagger.predict(list(crops))
            tm["tag"] = (time.perf_counter() - t0) * 1e3
        best = None if gal is None else [g[0][2] if g else -1.0 for g in gal]
        return _Scored(cands, emb, tag_probs, tm, best)

    def gallery_temperature(self) -> float | None:
        """Fusion's softmax temperature for gallery cosines: the config's, else the version's calibrated one (None: a
        version calibrated before it existed, which blends the raw cosine)."""
        if self.fusion_temperature is not None:
            return float(self.fusion_temperature)
        calib = self.calibration
        return calib.gallery_temperature if calib is not None else None

    def gallery_weight(self) -> float:
        """Fusion's gallery share: the config's, else the version's fitted one (`fusion.fit_gallery_weight`), else half.

        The fitted weight holds for the characters it was fitted on: once the gallery names one the classifier never
        trained on (enrolled later) the share is half again, since the classifier's say is what keeps a trained
        character's picture from a new look-alike (the fitted weight enrolled 0.8-1.2 points fewer, docs/accuracy.md
        "Fusion's blend fitted per version")."""
        if self.fusion_weight is not None:
            return float(self.fusion_weight)
        calib = self.calibration
        w = calib.gallery_weight if calib is not None else None
        return 0.5 if w is None or self._gallery_only_characters() else float(w)

    def whitened_judge(self) -> tuple[Any, float] | None:
        """(whitened gallery, its temperature) when fusion judges the trained characters with it: the version has one,
        it is calibrated, and every gallery character is a trained one (an enrolled one scatters in its space,
        `whitened` module docstring); else None and the classifier judges."""
        t = self.whitened_temperature
        if t is None:
            calib = self.calibration
            t = calib.whitened_temperature if calib is not None else None
        wg = self.whitened if t is not None else None
        return None if wg is None or self._gallery_only_characters() else (wg, float(t))

    def _trained_probabilities(self, embeddings: np.ndarray | None, probs: np.ndarray) -> np.ndarray:
        """Fusion's probability over the trained characters (the classifier's classes, in its order): the whitened
        gallery's when `whitened_judge` allows, else the classifier's own."""
        judge = self.whitened_judge() if embeddings is not None else None
        if judge is None:
            return probs
        return judge[0].probabilities(embeddings, self.classifier_card.class_names, judge[1])

    def _fuse(self, gal: list[list[Candidate]], probs: np.ndarray) -> list[list[Candidate]]:
        """Blend gallery probability (`gallery_probabilities`) and the trained characters' probability per character
        (`probs`, laid out as the classifier's classes: its own or the whitened gallery's, `_trained_probabilities`).

        A character only the gallery knows (enrolled after training; `FusionOptions.untrained`): under ``gallery`` it
        keeps its gallery probability and the classifier shares out only the gallery's mass on trained characters, so
        the scores stay one distribution and an enrolled character is named where the gallery would name it; under
        ``leftover`` (and for versions calibrated before the temperature, whose gallery score is a raw cosine) it takes
        the classifier's 1 - top probability in place of one."""
        names, series = self.classifier_card.class_names, self.classifier_card.series
        col = {n: i for i, n in enumerate(names)}
        w, t = self.gallery_weight(), self.gallery_temperature()
        shared = self.fusion_untrained == "gallery" and t is not None
        out = []
        for g, row in zip(gal, probs):
            scores: dict[str, tuple[str, float]] = {}
            p_gal = gallery_probabilities([sim for _, _, sim in g], t)
            trained_mass = float(sum(p for (c, _, _), p in zip(g, p_gal) if c in col)) if shared else 1.0
            none_of_mine = 1.0 - float(row.max()) if len(row) else 1.0
            for (c, s, _), p in zip(g, p_gal):
                if c in col:
                    scores[c] = (s, w * p + (1 - w) * trained_mass * float(row[col[c]]))
                else:
                    scores[c] = (s, float(p) if shared else w * p + (1 - w) * none_of_mine)
            for i in np.argsort(-row)[: self.n_candidates]:
                c = names[i]
                if c not in scores:
                    scores[c] = (series.get(c, ""), (1 - w) * trained_mass * float(row[i]))
            ranked = sorted(scores.items(), key=lambda kv: -kv[1][1])[: self.n_candidates]
            out.append([(c, s, float(v)) for c, (s, v) in ranked])
        return out

    def _detection(self, crop: _Crop, cands: list[Candidate], tag_row: np.ndarray | None, mode: str, rerank: bool,
                   gallery_best: float | None = None) -> Detection:
        info: Rerank | None = None
        base_top = cands[0][2] if cands else 0.0
        calib = self.calibration if self.openset_enabled else None
        gate = None if calib is None or not cands else calib.gate_score(mode, base_top, gallery_best)
        if rerank and tag_row is not None and self.reranker is not None and cands:
            t_names = self.tagger.tag_names
            res = self.reranker.rerank(cands, self.reranker.align(tag_row, t_names)[0], mode=mode)
            cands, info = res.candidates, res.info
        tags: list[TagScore] = []
        if tag_row is not None and self.tagger is not None:
            from .tagger import thresholded

            tags = thresholded(tag_row[None], self.tagger.tag_names, self.tagger.thresholds, max_tags=16)[0]
        known = bool(cands) and (calib is None or calib.is_known(mode, base_top, gallery_best))
        role, series, sim = (cands[0] if cands else (UNKNOWN, "", 0.0))
        return Detection(
            box=crop.box, detector_score=round(crop.detector_score, 4),
            role=role if known else UNKNOWN, series=series if known else "",
            similarity=round(float(np.clip(sim, 0.0, 1.0)), 4), unknown=not known,
            openset_score=None if gate is None else round(gate, 4),
            topk=[TopK(role=c, series=s, score=round(float(np.clip(v, 0.0, 1.0)), 4)) for c, s, v in cands[: self.topk]],
            tags=tags, rerank=info,
        )

    # -- public API ---------------------------------------------------------------------------
    def recognize_batch(self, items: Sequence[tuple[Image.Image, str]], mode: str | None = None, rerank: bool | None = None,
                        hashes: Sequence[str] | None = None, data: Sequence[bytes | None] | None = None) -> list[Answer]:
        """Answers for ``(image, filename)`` pairs; uncached images go through every model as one batch.

        `data` (the encoded uploads, when the caller has them) is handed to the sinks with each answer.
        """
        mode = self._resolve_mode(mode)
        rerank = self.rerank_default if rerank is None else bool(rerank)
        hashes = list(hashes) if hashes is not None else [_pixel_hash(img) for img, _ in items]
        keys = [(h, mode, rerank, self.topk, self.version, self._generation) for h in hashes]
        found: list[Cached | None] = []
        for (_, name), key in zip(items, keys):
            hit = self.cache.get(key)
            if hit is not None and hit.embeddings is None and self.sinks:
                hit = None  # cached before a sink was added (model mode skips embeddings): the sinks need them
            found.append(Cached(_from_cache(hit.answer, name), hit.embeddings) if hit is not None else None)
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            fresh = self._recognize_uncached([items[i][0] for i in todo], [items[i][1] for i in todo], [hashes[i] for i in todo], mode, rerank)
            for i, f in zip(todo, fresh):
                found[i] = f
                self.cache.put(keys[i], f)
        results = [f for f in found if f is not None]
        if self.sinks:
            for i, f in enumerate(results):
                self._to_sinks(f, data[i] if data is not None else None)
        return [f.answer for f in results]

    def _to_sinks(self, result: Cached, image_bytes: bytes | None) -> None:
        """Hand one answer to every sink; a failing sink is logged and never fails the answer."""
        emb = result.embeddings if result.embeddings is not None else np.zeros((0, 0), np.float32)
        for sink in self.sinks:
            try:
                sink(result.answer, emb, image_bytes)
            except Exception as exc:  # noqa: BLE001 - a log that cannot write must not lose the user's answer
                _log.error(f"answer sink {type(sink).__name__} failed: {exc}")

    def _recognize_uncached(self, images: list[Image.Image], names: list[str], hashes: list[str], mode: str, rerank: bool) -> list[Cached]:
        t_all = time.perf_counter()
        crops, t_detect = self._crops(images)
        use_tags = (rerank and self.reranker is not None) or mode == "fusion"
        scored = self._score([c.image for c in crops], mode, use_tags and self.tagger is not None, bool(self.sinks))
        t0 = time.perf_counter()
        dets = [self._detection(c, scored.candidates[j], None if scored.tag_probs is None else scored.tag_probs[j], mode, rerank,
                                None if scored.gallery_best is None else scored.gallery_best[j])
                for j, c in enumerate(crops)]
        t_rerank = (time.perf_counter() - t0) * 1e3
        n = max(1, len(images))
        stage = {"detect": t_detect, **scored.timings, "rerank": t_rerank}
        total = (time.perf_counter() - t_all) * 1e3
        out = []
        for i, (img, name, h) in enumerate(zip(images, names, hashes)):
            mine = [d for c, d in zip(crops, dets) if c.image_index == i]
            best = max((d for d in mine if not d.unknown), key=lambda d: d.similarity, default=None)
            timings = {k: round(v / n, 2) for k, v in stage.items()}
            timings["total"] = round(total / n, 2)
            if n > 1:
                timings["batch_images"] = float(n)
            full = original_size(img)  # a drafted decode answers in the picture's own pixels
            ans = Answer(
                filename=name, role=best.role if best else UNKNOWN, series=best.series if best else "",
                similarity=best.similarity if best else max((d.similarity for d in mine), default=0.0),
                boxes=[d.box for d in mine], unknown=best is None, mode=mode,
                whole_image=any(c.whole_image for c in crops if c.image_index == i), detections=mine,
                timings_ms=timings, image_sha256=h, version=self.version, width=full[0], height=full[1],
            )
            rows = [j for j, c in enumerate(crops) if c.image_index == i]
            out.append(Cached(ans, scored.embeddings[rows] if scored.embeddings is not None else None))
        _log.bind(**FILE_ONLY).info(f"recognized {len(images)} image(s) mode={mode} rerank={rerank} in {total:.1f} ms")
        return out

    def recognize(self, image: Image.Image, filename: str = "", mode: str | None = None, rerank: bool | None = None) -> Answer:
        """Answer for one decoded image."""
        return self.recognize_batch([(image, filename)], mode=mode, rerank=rerank)[0]

    def recognize_bytes(self, data: bytes, filename: str = "<upload>", mode: str | None = None, rerank: bool | None = None) -> Answer:
        """Decode untrusted bytes safely (`imageio.decode_image`), then recognise; cache key = content hash of the bytes."""
        t0 = time.perf_counter()
        img = decode_image(data, filename, self.limits)
        t_decode = (time.perf_counter() - t0) * 1e3
        ans = self.recognize_batch([(img, filename)], mode=mode, rerank=rerank, hashes=[content_hash(data)], data=[data])[0]
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

        vopt = self.config.video_options
        return recognize_video(self, path, sample_fps=float(sample_fps or self.config.sample_fps), batch_size=self.batch_size,
                               backend=vopt.backend, max_frames=vopt.max_frames, on_batch=on_batch, mode=mode, rerank=rerank,
                               filename=filename)

    # -- enrollment ---------------------------------------------------------------------------
    def enroll(self, character: str, series: str, images: Sequence[Image.Image], sources: Sequence[str] | None = None) -> int:
        """Add a character to the gallery from a few images, without retraining; returns prototype rows added.

        With ``enrol.mirror`` (the default) each image's mirror image is a row too (`EnrolOptions`), its source the
        image's with ``MIRROR_SUFFIX``."""
        if not images:
            raise GalleryError(f"no images given to enroll {character!r}; give at least one")
        shots, names = list(images), list(sources) if sources is not None else None
        if self.config.enrol.mirror:
            shots += [ImageOps.mirror(im) for im in images]
            names = None if names is None else names + [f"{s}{MIRROR_SUFFIX}" for s in names]
        emb = self.embedder.embed(shots)
        with self._lock:
            n = self.gallery.add(character, series, emb, names, embedder_id=self.embedder.model_id)
            self._generation += 1
            self.cache.clear()
            if self.config.mode == AUTO:
                self._mode = None  # a new character may rule out model mode: choose again
        return n

    def remove(self, character: str) -> int:
        """Delete a character from the gallery; returns rows removed (0 when it was not enrolled)."""
        with self._lock:
            n = self.gallery.remove(character)
            self._generation += 1
            self.cache.clear()
        return n

    def describe(self) -> dict[str, Any]:
        """What this recognizer serves, from the parts already loaded and the version's small files (for /api/version)."""
        has_gallery = self._file(GALLERY_META) is not None
        loaded = self._loaded
        gallery = loaded.get("gallery") or (self.gallery if has_gallery else None)
        tagger = loaded.get("tagger")
        calib = self.calibration
        modes = self.supported_modes()
        return {
            "version": self.version or None, "version_dir": str(self.version_dir) if self.version_dir else None,
            "mode": self.mode, "mode_setting": self.config.mode, "modes": modes, "rerank": self.rerank_default,
            "embedder": gallery.embedder_id if gallery is not None else None,
            "gallery_rows": len(gallery) if gallery is not None else 0,
            "characters": len(self.characters()), "classifier": self.model_ckpt is not None,
            "tagger": getattr(tagger, "model_id", type(tagger).__name__) if tagger is not None else None,
            "calibration": {"target_far": calib.target_far, "thresholds": {m: t.threshold for m, t in calib.modes.items()},
                            "threshold_scores": {m: t.score for m, t in calib.modes.items()}, "stale": calib.stale, "fusion": {"gallery_weight": self.gallery_weight(),
                                                             "gallery_temperature": self.gallery_temperature(),
                                                             "untrained": self.fusion_untrained,
                                                             "trained_judge": "whitened" if self.whitened_judge() else "classifier"}} if calib else None,
            "evaluation": read_json(self.version_dir / EVAL_METRICS) if self._file(EVAL_METRICS) else None,
            "runtime": getattr(loaded.get("runtime"), "runtime", None) or ("torch" if "runtime" in loaded else self.config.runtime),
            "device": running_device(self.config.device, onnx_only=loaded.get("runtime") is not None and "torch" not in sys.modules), "cache": {"size": self.cache.size, "hits": self.cache.hits, "misses": self.cache.misses},
        }

    def characters(self) -> list[dict]:
        """Known characters: gallery characters ``{name, series, prototypes}``, else the classifier's classes."""
        if self._file(GALLERY_META) is not None:
            return self.gallery.characters()
        if self.model_ckpt is not None:
            m = self.classifier_card
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


def _from_cache(answer: Answer, filename: str) -> Answer:
    """A cached answer for a new request: its own filename, no record id yet, and no claim to have been batched."""
    timings = {k: v for k, v in answer.timings_ms.items() if k != "batch_images"}
    return answer.model_copy(update={"filename": filename, "record_id": None, "timings_ms": timings})
