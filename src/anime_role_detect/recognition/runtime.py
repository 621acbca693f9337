"""ONNX Runtime: run a version's exported networks (`onnx_export` writes them) with the interface of the torch classes.

Run (`select_runtime`, the `Recognizer`'s ``runtime: auto|torch|onnx|onnx-int8`` setting): `OnnxEmbedder`,
`OnnxClassifier` and `OnnxClassifierTagger` offer ``embed``/``heads``/``embed_with_heads``/``predict``,
``dim`` and ``model_id`` like the torch classes, with the same preprocessing and flip TTA, and report
THE SAME ``model_id`` as the torch embedder of the same weights, so a gallery built with torch is
searched with ONNX embeddings and vice versa. A network whose source changed since the export (a
fine-tuned ``model.ckpt``, a rebuilt gallery) is not used: the recognizer falls back to torch for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, WeightsError
from ..fsutil import read_json
from .config import RUNTIMES
from ..data.framing import batch_array, eval_array
from .card import ClassifierCard, card_from
from .shared import file_fingerprint, l2_normalise, shared_model
from .tagger import OWN_HEAD_PREFIX

ONNX_META = "onnx.json"  # the exported networks of a version folder (carried into derived versions)
CLASSIFIER_ONNX = "classifier.onnx"
EMBEDDER_ONNX = "embedder.onnx"
INT8_SUFFIX = ".int8.onnx"
#: Every file an export writes (what a re-export does not carry from its base).
ONNX_FILES = frozenset({ONNX_META, CLASSIFIER_ONNX, EMBEDDER_ONNX, "classifier" + INT8_SUFFIX, "embedder" + INT8_SUFFIX})
INPUT = "images"
LOGITS, TAG_LOGITS, EMBEDDING = "logits", "tag_logits", "embedding"


def onnx_file_name(name: str, int8: bool) -> str:
    """``classifier.onnx`` / ``classifier.int8.onnx`` from ``classifier.onnx``."""
    return name[: -len(".onnx")] + INT8_SUFFIX if int8 else name


def open_session(path: Path, device: str | None = "auto", threads: int | None = None) -> Any:
    """An onnxruntime session for `path` on `device`'s providers, shared per process (`embedder.shared_model`)."""
    import onnxruntime as ort

    from .device import ort_providers

    providers = ort_providers(device)

    def load() -> Any:
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise WeightsError(f"ONNX file {path} could not be loaded ({type(exc).__name__}: {str(exc)[:160]}); "
                               "re-run python -m anime_role_detect.export or use runtime=torch") from None

    return shared_model(("onnx", str(path.resolve()), path.stat().st_mtime_ns, repr(providers), int(threads or 0)), load)


def _classifier_preprocess(spec: Mapping[str, Any]) -> Callable[[Sequence[Image.Image]], np.ndarray]:
    """The classifier's own eval transform (`framing.eval_array`, what `data.transforms.build_eval_transform` runs)."""
    size, mean, std, mode = int(spec["image_size"]), tuple(spec["mean"]), tuple(spec["std"]), str(spec.get("resize", "center_crop"))
    return lambda images: np.stack([eval_array(im, size, mean, std, mode) for im in images])


def _resize_preprocess(spec: Mapping[str, Any]) -> Callable[[Sequence[Image.Image]], np.ndarray]:
    """`framing.batch_array` (letterbox / center_crop / squash), as `TorchEmbedder.preprocess`."""
    size, mean, std, mode = int(spec["image_size"]), tuple(spec["mean"]), tuple(spec["std"]), str(spec.get("resize", "letterbox"))
    return lambda images: batch_array(images, size, mean, std, mode)


PREPROCESSORS: dict[str, Callable[[Mapping[str, Any]], Callable[[Sequence[Image.Image]], np.ndarray]]] = {
    "classifier": _classifier_preprocess,
    "resize": _resize_preprocess,
}


class OnnxEmbedder:
    """Unit-length float32 embeddings from an exported network; same ``model_id``, preprocessing and flip TTA as torch."""

    def __init__(self, session: Any, entry: Mapping[str, Any], batch_size: int = 32, flip_tta: bool = False,
                 runtime: str = "onnx") -> None:
        self.session = session
        self.entry = dict(entry)
        self.model_id = str(entry["model_id"])
        self.dim = int(entry["dim"])
        self.batch_size = max(1, int(batch_size))
        self.flip_tta = bool(flip_tta)
        self.runtime = runtime
        self.image_size = int(entry["preprocess"]["image_size"])
        self.providers = list(session.get_providers())
        self._outputs = [o.name for o in session.get_outputs()]
        transform = entry["preprocess"].get("transform")
        if transform not in PREPROCESSORS:
            raise ConfigError(f"onnx.json: unknown preprocessing {transform!r}; re-run python -m anime_role_detect.export")
        self.preprocess = PREPROCESSORS[transform](entry["preprocess"])

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(None, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})))

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-length float32 embeddings, one row per image; with ``flip_tta`` the mean of image and mirror (as torch)."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(list(images[i : i + self.batch_size]))
            out.append(self._views(x, self.flip_tta)[EMBEDDING][1])
        return l2_normalise(np.concatenate(out))

    def _views(self, x: np.ndarray, flip: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Outputs for a batch (image and mirror in one run with `flip`): per output, (unflipped rows, embedding to keep)."""
        n = len(x)
        y = self._run(np.concatenate([x, x[..., ::-1]]) if flip else x)
        emb = y[EMBEDDING].astype(np.float32)
        kept = l2_normalise(emb[:n]) + l2_normalise(emb[n:]) if flip else emb
        return {k: (v[:n], kept if k == EMBEDDING else v[:n]) for k, v in y.items()}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


class OnnxClassifier(OnnxEmbedder):
    """The exported classifier graph: embedding, character softmax and tag sigmoid from one run per view (as `ClassifierEmbedder`)."""

    def __init__(self, session: Any, entry: Mapping[str, Any], ckpt_path: str | None, **kw: Any) -> None:
        super().__init__(session, entry, **kw)
        self.ckpt_path = ckpt_path  # the checkpoint these weights still match (None: it changed since the export)
        self.class_names: list[str] = list(entry.get("class_names") or [])
        self.series: dict[str, str] = dict(entry.get("series") or {})
        self.tag_names: list[str] = list(entry.get("tag_names") or [])

    def heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Character softmax ``[N, C]`` and tag sigmoid ``[N, T]`` (None without a tag head)."""
        _, probs, tags = self._passes(images, embed=False)
        return probs, tags

    def embed_with_heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One run per view for everything: unit embeddings (flip-averaged with ``flip_tta``), softmax and tag sigmoid (unflipped view)."""
        return self._passes(images, embed=True)

    def _passes(self, images: Sequence[Image.Image], embed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        embs, probs, tags = [], [], []
        for i in range(0, len(images), self.batch_size):
            y = self._views(self.preprocess(list(images[i : i + self.batch_size])), embed and self.flip_tta)
            probs.append(_softmax(y[LOGITS][0].astype(np.float32)))
            if TAG_LOGITS in y and y[TAG_LOGITS][0].shape[1]:
                tags.append(_sigmoid(y[TAG_LOGITS][0].astype(np.float32)))
            if embed:
                embs.append(y[EMBEDDING][1])
        emb = l2_normalise(np.concatenate(embs)) if embs else np.zeros((0, self.dim), np.float32)
        return (emb, np.concatenate(probs) if probs else np.zeros((0, len(self.class_names)), np.float32),
                np.concatenate(tags) if tags else None)


class OnnxClassifierTagger:
    """The exported classifier's tag head as a tagger (same ``model_id`` and thresholds as `tagger.ClassifierTagger`)."""

    def __init__(self, classifier: OnnxClassifier, threshold: float = 0.5) -> None:
        self.classifier = classifier
        self.tag_names = list(classifier.tag_names)
        self.thresholds = np.full(len(self.tag_names), float(threshold), np.float32)
        self.model_id = f"{OWN_HEAD_PREFIX}{classifier.model_id}"
        self.runtime = classifier.runtime

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.tag_names)), np.float32)
        tags = self.classifier.heads(images)[1]
        return tags if tags is not None else np.zeros((len(images), len(self.tag_names)), np.float32)

    def tag(self, images: Sequence[Image.Image]) -> list:
        from .tagger import thresholded

        return thresholded(self.predict(images), self.tag_names, self.thresholds)


class OnnxVersion:
    """A version folder's exported networks (``onnx.json``), opened as sessions on demand for one runtime (fp32 or int8)."""

    def __init__(self, version_dir: Path, meta: Mapping[str, Any], int8: bool = False, device: str | None = "auto",
                 threads: int | None = None) -> None:
        self.version_dir = Path(version_dir)
        self.meta = dict(meta)
        self.networks: dict[str, dict[str, Any]] = dict(meta.get("networks") or {})
        self.int8 = bool(int8)
        self.runtime = "onnx-int8" if int8 else "onnx"
        self.device, self.threads = device, threads

    @classmethod
    def load(cls, version_dir: str | Path, **kw: Any) -> "OnnxVersion | None":
        """The folder's ONNX networks, or None when it has no ``onnx.json``."""
        p = Path(version_dir) / ONNX_META
        if not p.is_file():
            return None
        try:
            meta = read_json(p)
        except ValueError:
            raise ConfigError(f"{p} is not valid JSON; re-run python -m anime_role_detect.export or use runtime=torch") from None
        return cls(Path(version_dir), meta, **kw)

    def _file(self, entry: Mapping[str, Any]) -> Path | None:
        name = entry.get("int8_file") if self.int8 else entry.get("file")
        p = self.version_dir / name if name else None
        return p if p is not None and p.is_file() else None

    def _current(self, entry: Mapping[str, Any], ckpt: Path | None) -> bool:
        """True when `ckpt` is still the file the entry was exported from (same content fingerprint)."""
        fp = entry.get("source_fingerprint")
        return bool(fp) and ckpt is not None and ckpt.is_file() and file_fingerprint(ckpt) == fp

    def _classifier_entry(self, model_ckpt: Path | None) -> dict[str, Any] | None:
        entry = self.networks.get("classifier")
        if entry is None or self._file(entry) is None or not self._current(entry, model_ckpt):
            return None
        return entry

    def _open(self, entry: Mapping[str, Any]) -> Any:
        path = self._file(entry)
        assert path is not None
        return open_session(path, self.device, self.threads)

    def embedder(self, cfg: Mapping[str, Any], model_id: str, model_ckpt: Path | None = None) -> OnnxEmbedder | None:
        """The exported network whose torch ``model_id`` is `model_id` (the gallery's), with `cfg`'s batch size and flip TTA; else None."""
        opts = {"batch_size": int(cfg.get("batch_size") or 32), "flip_tta": bool(cfg.get("flip_tta", False)), "runtime": self.runtime}
        for name, entry in self.networks.items():
            if entry.get("model_id") != model_id or self._file(entry) is None:
                continue
            if name == "classifier":
                ckpt = str(model_ckpt) if self._current(entry, model_ckpt) else None
                return OnnxClassifier(self._open(entry), entry, ckpt, **opts)
            return OnnxEmbedder(self._open(entry), entry, **opts)
        return None

    def wrapped_embedder(self, cfg: Mapping[str, Any], model_id: str, model_ckpt: Path | None = None,
                         trained: Any = None) -> Any | None:
        """The torch embedder `cfg` describes, model id `model_id` (its face + figure views and colour included), run on
        the exported network; None when the export does not hold that network. `trained` is the classifier whose
        training decides the views when `cfg` does not (`views.face_view_for`)."""
        from .colour import with_colour
        from .views import base_model_id, face_view_for, with_face_view

        emb = self.embedder(cfg, base_model_id(model_id), model_ckpt)
        if emb is None:
            return None
        emb = with_face_view(with_colour(emb, cfg.get("colour")), face_view_for(cfg.get("face_view"), trained))
        return emb if emb.model_id == model_id else None

    def classifier(self, model_ckpt: Path | None, batch_size: int = 32) -> OnnxClassifier | None:
        """The exported classifier when `model_ckpt` is still the checkpoint it came from; else None."""
        entry = self._classifier_entry(model_ckpt)
        if entry is None:
            return None
        return OnnxClassifier(self._open(entry), entry, str(model_ckpt), batch_size=batch_size, runtime=self.runtime)

    def card(self, model_ckpt: Path | None) -> ClassifierCard | None:
        """The classifier's card as the export recorded it, when `model_ckpt` is still its source and the export is
        recent enough to hold the card's every field (``face_view``); else None (read it from the checkpoint)."""
        entry = self._classifier_entry(model_ckpt)
        return card_from(entry) if entry is not None and "face_view" in entry else None

    def tag_names(self, model_ckpt: Path | None) -> list[str] | None:
        """The exported classifier's tag vocabulary (None when it is not usable for `model_ckpt`)."""
        entry = self._classifier_entry(model_ckpt)
        return None if entry is None else list(entry.get("tag_names") or [])

    def tagger(self, cfg: Mapping[str, Any], model_ckpt: Path | None) -> OnnxClassifierTagger | None:
        """The classifier's tag head from the export (``tagger.kind=classifier``), or None (torch then builds it)."""
        clf = self.classifier(model_ckpt, batch_size=int(cfg.get("batch_size") or 32))
        if clf is None or not clf.tag_names:
            return None
        return OnnxClassifierTagger(clf, threshold=float(cfg.get("threshold", 0.5)))


def select_runtime(runtime: str, version_dir: str | Path | None, device: str | None = "auto",
                   threads: int | None = None) -> OnnxVersion | None:
    """The ONNX networks `runtime` asks for (None: torch). ``onnx``/``onnx-int8`` without exported files is a one-line `ConfigError`."""
    name = str(runtime or "auto").strip().lower()
    if name not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if name == "torch":
        return None
    int8 = name == "onnx-int8"
    if version_dir is None:
        if name == "auto":
            return None
        raise ConfigError(f"runtime={name} needs a registry version with ONNX files, not a bare checkpoint; use version=ID "
                          "(exported with python -m anime_role_detect.export), or runtime=torch")
    found = OnnxVersion.load(version_dir, int8=int8, device=device, threads=threads)
    vid = Path(version_dir).name
    hint = f"run `python -m anime_role_detect.export --version {vid}{' --int8' if int8 else ''}`, or use runtime=torch"
    if found is None:
        if name == "auto":
            return None
        raise ConfigError(f"runtime={name} but version {vid} has no ONNX files ({ONNX_META}); {hint}")
    if int8 and not found.meta.get("int8"):
        raise ConfigError(f"runtime=onnx-int8 but version {vid} was exported without int8 files; {hint}")
    return found
