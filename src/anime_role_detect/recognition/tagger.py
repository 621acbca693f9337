"""Image taggers: WD14 / DeepDanbooru ONNX exports via onnxruntime, and the classifier's own tag head.

A tagger gives per-tag probabilities (`predict`, used by the reranker) and thresholded tags (`tag`,
shown in answers). ONNX exports differ in layout (NHWC/NCHW), channel order (WD14: BGR 0-255,
DeepDanbooru: RGB 0-1) and input size; layout and size are read from the model, the rest is config.
An ONNX tagger comes from local files (``model_path`` + ``tags_path``) or, when no local model is
given, from a Hugging Face hub repo (``repo_id``, e.g. ``SmilingWolf/wd-vit-tagger-v3``) through the
hub cache (`hub.py`); it runs on ONNX Runtime's CUDA provider when the device resolves to CUDA and
the installed onnxruntime has it, on the CPU otherwise.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import ConfigError, WeightsError
from .device import ort_providers
from .hub import hub_files
from .schema import TagScore
from .shared import file_fingerprint

#: WD14 ``selected_tags.csv`` categories.
GENERAL, CHARACTER, RATING = 0, 4, 9


#: model id prefix of a version's own classifier tag head (torch or ONNX Runtime)
OWN_HEAD_PREFIX = "classifier-tags:"


def is_own_tag_head(tagger: object) -> bool:
    """Whether `tagger` is the version's own classifier tag head: its tags come from the features the embedding and the
    logits come from, so they add little evidence of their own (docs/recognition.md "Reranking on near-twins")."""
    return str(getattr(tagger, "model_id", "")).startswith(OWN_HEAD_PREFIX)


@runtime_checkable
class Tagger(Protocol):
    """Predicts tag probabilities for images."""

    tag_names: list[str]

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def tag(self, images: Sequence[Image.Image]) -> list[list[TagScore]]: ...


def thresholded(probs: np.ndarray, names: Sequence[str], thresholds: np.ndarray, max_tags: int = 32) -> list[list[TagScore]]:
    """Rows of probabilities -> tags above their per-tag threshold, best first."""
    out = []
    for row in np.atleast_2d(probs):
        idx = np.nonzero(row >= thresholds)[0]
        idx = idx[np.argsort(-row[idx])][:max_tags]
        out.append([TagScore(tag=names[i], score=round(float(row[i]), 4)) for i in idx])
    return out


def read_tag_list(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories from WD14 ``selected_tags.csv`` (name, category columns) or a DeepDanbooru ``tags.txt``."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"tag list {p} not found; give tagger.tags_path (selected_tags.csv or tags.txt next to the model)")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "name" not in rows[0]:
            raise WeightsError(f"{p}: expected a CSV with a header containing 'name' (and 'category'), like WD14 selected_tags.csv")
        try:
            return [r["name"] for r in rows], np.array([int(r.get("category") or 0) for r in rows])
        except ValueError as exc:
            raise WeightsError(f"{p}: bad 'category' value ({exc}); categories are integers (0 general, 4 character, 9 rating)") from None
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return names, np.zeros(len(names), dtype=int)


def resolve_tagger_files(model_path: str | None, tags_path: str | None, repo_id: str | None, revision: str | None,
                         model_file: str, tags_file: str) -> tuple[Path, Path]:
    """Model and tag-list paths: a local ``model_path`` wins (tags next to it unless ``tags_path``), else the hub repo's files."""
    if model_path:
        mp = Path(model_path).expanduser()
        return mp, Path(tags_path).expanduser() if tags_path else mp.with_name(tags_file)
    if not repo_id:
        raise ConfigError("tagger=onnx needs tagger.model_path (a local ONNX export) or tagger.repo_id (a Hugging Face hub repo)")
    hint = "set tagger.model_path and tagger.tags_path to local files"
    if tags_path:
        return hub_files(repo_id, [model_file], revision, what="tagger", local_hint=hint)[0], Path(tags_path).expanduser()
    mp, tp = hub_files(repo_id, [model_file, tags_file], revision, what="tagger", local_hint=hint)
    return mp, tp


class OnnxTagger:
    """A WD14/DeepDanbooru-style ONNX tagger run with onnxruntime (CUDA provider when available for the device, else CPU)."""

    def __init__(self, model_path: str | None = None, tags_path: str | None = None, repo_id: str | None = None,
                 revision: str | None = None, model_file: str = "model.onnx", tags_file: str = "selected_tags.csv",
                 general_threshold: float = 0.35, character_threshold: float = 0.85,
                 channel_order: str = "bgr", pixel_scale: float = 255.0, input_size: int | None = None,
                 apply_sigmoid: bool = False, batch_size: int = 8, num_threads: int = 0, pad_color: int = 255,
                 device: str | None = "auto") -> None:
        import onnxruntime as ort

        mp, tags_file_path = resolve_tagger_files(model_path, tags_path, repo_id, revision, model_file, tags_file)
        if not mp.is_file():
            raise WeightsError(f"tagger model {mp} not found; download a WD14/DeepDanbooru ONNX export and set tagger.model_path "
                               "(or tagger.repo_id for a hub repo), or use tagger=classifier")
        self.tag_names, self.categories = read_tag_list(tags_file_path)
        so = ort.SessionOptions()
        if num_threads:
            so.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(str(mp), sess_options=so, providers=ort_providers(device))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise WeightsError(f"tagger model {mp} could not be loaded ({type(exc).__name__}: {str(exc)[:160]}); is it an ONNX file?") from None
        self.providers = list(self.session.get_providers())
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or 3 not in (shape[1], shape[3]):
            raise WeightsError(f"tagger model {mp}: input shape {shape} is not an image batch (N,H,W,3 or N,3,H,W)")
        self.nhwc = shape[3] == 3
        hw = shape[1:3] if self.nhwc else shape[2:4]
        fixed = [d for d in hw if isinstance(d, int) and d > 0]
        self.input_size = int(fixed[0]) if fixed else int(input_size or 0)
        if not self.input_size:
            raise ConfigError(f"tagger model {mp} has a dynamic input size; set tagger.input_size (e.g. 448)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"tagger.channel_order={channel_order!r}: choose rgb (DeepDanbooru) or bgr (WD14)")
        self.bgr = channel_order == "bgr"
        self.pixel_scale = float(pixel_scale)
        self.apply_sigmoid = bool(apply_sigmoid)
        self.batch_size = int(self.fixed_batch or batch_size)
        self.pad_color = int(pad_color)
        out_dim = self.session.get_outputs()[0].shape[-1]
        if isinstance(out_dim, int) and out_dim != len(self.tag_names):
            raise WeightsError(f"tagger model {mp} predicts {out_dim} tags but {tags_file_path} lists {len(self.tag_names)}; use the tag list shipped with the model")
        self.thresholds = np.where(self.categories == CHARACTER, character_threshold, general_threshold).astype(np.float32)
        self.thresholds[self.categories == RATING] = np.inf  # ratings are not content tags
        self.model_id = f"onnx:{mp.name}:{file_fingerprint(mp)}"

    def _prepare(self, img: Image.Image) -> np.ndarray:
        """Pad to a square (white), resize to the model's size, scale and reorder channels."""
        img = img.convert("RGB")
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (self.pad_color,) * 3)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        arr = np.asarray(canvas.resize((self.input_size, self.input_size), Image.BICUBIC), dtype=np.float32)
        if self.bgr:
            arr = arr[:, :, ::-1]
        arr = arr * (self.pixel_scale / 255.0)
        return arr if self.nhwc else arr.transpose(2, 0, 1)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Tag probabilities ``[N, T]`` (float32)."""
        if not images:
            return np.zeros((0, len(self.tag_names)), np.float32)
        outs = []
        for i in range(0, len(images), self.batch_size):
            x = np.ascontiguousarray(np.stack([self._prepare(im) for im in images[i : i + self.batch_size]]), dtype=np.float32)
            y = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
            outs.append(1.0 / (1.0 + np.exp(-y)) if self.apply_sigmoid else y)
        return np.concatenate(outs)

    def tag(self, images: Sequence[Image.Image]) -> list[list[TagScore]]:
        return thresholded(self.predict(images), self.tag_names, self.thresholds)


class ClassifierTagger:
    """The fine-tuned classifier's multi-label tag head: needs no files beyond the checkpoint."""

    def __init__(self, ckpt_path: str, threshold: float = 0.5, batch_size: int = 32, device: str | None = "auto") -> None:
        from .embedder import ClassifierEmbedder

        self.embedder = ClassifierEmbedder(ckpt_path, batch_size=batch_size, device=device)
        self.model = self.embedder.model
        self.tag_names = list(self.model.tag_names)
        if not self.tag_names:
            raise ConfigError(f"classifier {ckpt_path} was trained without tags, so it cannot tag; use tagger=onnx or rerank=false")
        self.thresholds = np.full(len(self.tag_names), float(threshold), np.float32)
        self.model_id = f"{OWN_HEAD_PREFIX}{self.embedder.model_id}"

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.tag_names)), np.float32)
        tags = self.embedder.heads(images)[1]
        return tags if tags is not None else np.zeros((len(images), len(self.tag_names)), np.float32)

    def tag(self, images: Sequence[Image.Image]) -> list[list[TagScore]]:
        return thresholded(self.predict(images), self.tag_names, self.thresholds)


TAGGER_REGISTRY: dict[str, Callable[..., Tagger]] = {
    "onnx": OnnxTagger,
    "classifier": ClassifierTagger,
}


def build_tagger(cfg: Mapping[str, Any] | None, base_dir: str | Path | None = None, device: str | None = None) -> Tagger | None:
    """Tagger from ``{kind: onnx|classifier|none, ...}`` on `device` (auto|cpu|cuda|mps; a ``device`` key in `cfg` wins).

    Relative paths resolve against `base_dir` (a version folder).
    """
    if not cfg:
        return None
    cfg = dict(cfg)
    kind = cfg.pop("kind", "none")
    if kind in (None, "none"):
        return None
    if kind not in TAGGER_REGISTRY:
        raise ConfigError(f"tagger.kind={kind!r}: choose one of {sorted(TAGGER_REGISTRY) + ['none']}")
    for key in ("model_path", "tags_path", "ckpt_path"):
        if cfg.get(key) and base_dir is not None and not Path(cfg[key]).is_absolute():
            cfg[key] = str(Path(base_dir) / cfg[key])
    if kind == "classifier" and not cfg.get("ckpt_path"):
        raise ConfigError("tagger=classifier needs a classifier checkpoint (a version with model.ckpt, or model_ckpt=PATH)")
    cfg["device"] = cfg.get("device") or device or "auto"
    try:
        return TAGGER_REGISTRY[kind](**cfg)
    except TypeError as exc:
        raise ConfigError(f"tagger ({kind}): bad option ({exc}); see conf/tagger/") from None
