"""Image embedders: open_clip, any timm backbone, or the fine-tuned classifier; L2-normalised float32, batched.

`build_embedder(cfg)` picks one from `EMBEDDER_REGISTRY` by ``cfg.kind``. Every weight source is a
config value (hub tag or local path). Loaded networks are shared per process (`shared_model`), so
the gallery, the classifier mode and the tag head never load the same checkpoint twice.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class Embedder(Protocol):
    """Maps images to unit-length float32 vectors; ``model_id`` names the exact weights (gallery compatibility)."""

    model_id: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


# -- one model per process ------------------------------------------------------------------------
_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def shared_model(key: tuple, loader: Callable[[], Any]) -> Any:
    """Return the process-wide instance for `key`, loading it on first use (thread-safe)."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = loader()
        return _MODELS[key]


def clear_shared_models() -> None:
    """Forget every cached model (tests, hot reload of a new version)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def weights_fingerprint(model: nn.Module, max_tensors: int = 64) -> str:
    """Short hash of a network's parameters: distinguishes random inits and fine-tunes of one architecture."""
    h = hashlib.sha1()
    for i, p in enumerate(model.state_dict().values()):
        if i >= max_tensors:
            break
        h.update(p.detach().cpu().contiguous().numpy().tobytes()[:65536])
    return h.hexdigest()[:12]


def file_fingerprint(path: str | Path) -> str:
    """Short content hash of a weights file (size + first/last MiB: fast even for large checkpoints)."""
    p = Path(path)
    h = hashlib.sha1(str(p.stat().st_size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if p.stat().st_size > 2 << 20:
            fh.seek(-(1 << 20), 2)
            h.update(fh.read())
    return h.hexdigest()[:12]


# -- preprocessing --------------------------------------------------------------------------------
def _resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Square `size` input: 'letterbox' keeps the whole figure (pads), 'center_crop' CLIP-style, 'squash' stretches."""
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
    raise ConfigError(f"embedder.resize={mode!r}: choose letterbox, center_crop or squash")


def to_batch(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float], resize: str = "letterbox") -> torch.Tensor:
    """PIL images -> normalised NCHW float32 tensor."""
    arr = np.stack([np.asarray(_resize(im, size, resize), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


class TorchEmbedder:
    """Shared batching/normalisation for embedders wrapping a torch module ``forward_features(x) -> [N, D]``."""

    model_id: str = ""
    dim: int = 0

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 32,
                 flip_tta: bool = False, resize: str = "letterbox", num_threads: int | None = None) -> None:
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = max(1, int(batch_size))
        self.flip_tta = bool(flip_tta)
        self.resize = resize
        if num_threads:
            torch.set_num_threads(int(num_threads))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> the network's input batch."""
        return to_batch(images, self.image_size, self.mean, self.std, self.resize)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-length float32 embeddings, one row per image; with ``flip_tta`` the mean of image and mirror."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size])
            if self.flip_tta:
                f = self.forward_features(torch.cat([x, torch.flip(x, dims=[3])]))
                f = nn.functional.normalize(f.float(), dim=1)
                f = f[: len(x)] + f[len(x) :]
            else:
                f = self.forward_features(x)
            out.append(f.float().cpu().numpy())
        return l2_normalise(np.concatenate(out))


class TimmEmbedder(TorchEmbedder):
    """Pooled features of a timm backbone (e.g. the offline ImageNet EfficientNet-Lite0) via `create_backbone`."""

    def __init__(self, model_name: str = "efficientnet_lite0_offline", pretrained: bool = True, weights_path: str | None = None,
                 image_size: int | None = None, **kw: Any) -> None:
        from ..models.backbones import backbone_data_config, create_backbone

        self.model = shared_model(("timm", model_name, bool(pretrained), weights_path),
                                  lambda: create_backbone(model_name, pretrained=pretrained, weights_path=weights_path).eval())
        dc = backbone_data_config(self.model)
        super().__init__(image_size or dc["input_size"][-1], dc.get("mean", IMAGENET_MEAN), dc.get("std", IMAGENET_STD), **kw)
        self.dim = int(self.model.num_features)
        source = Path(weights_path).name if weights_path else ("pretrained" if pretrained else "random")
        self.model_id = f"timm:{model_name}:{source}:{weights_fingerprint(self.model)}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _load_open_clip(model_name: str, pretrained: str | None) -> nn.Module:
    import open_clip

    if pretrained and (("/" in pretrained) or pretrained.endswith((".pt", ".bin", ".safetensors"))) and not Path(pretrained).is_file():
        raise WeightsError(f"open_clip checkpoint {pretrained} not found; fix embedder.pretrained (a tag like 'laion2b_s34b_b79k' or a local file)")
    if model_name not in open_clip.list_models():
        raise ConfigError(f"embedder.model_name={model_name!r}: unknown open_clip model; pick one of open_clip.list_models()")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, require_pretrained=bool(pretrained))
    except Exception as exc:  # noqa: BLE001 - hub failures come in many types
        raise WeightsError(
            f"open_clip {model_name} weights {pretrained!r} could not be loaded ({type(exc).__name__}: {exc}); "
            "give a local checkpoint path in embedder.pretrained, or use embedder=lite0"
        ) from None
    return model.visual.eval()


class OpenClipEmbedder(TorchEmbedder):
    """open_clip image tower; ``pretrained`` is a hub tag (needs network once) or a local checkpoint path."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k", **kw: Any) -> None:
        self.model = shared_model(("open_clip", model_name, pretrained), lambda: _load_open_clip(model_name, pretrained))
        pcfg = getattr(self.model, "preprocess_cfg", {}) or {}
        size = self.model.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        kw.setdefault("resize", "center_crop")
        super().__init__(kw.pop("image_size", None) or size, pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                         pcfg.get("std", (0.26862954, 0.26130258, 0.27577711)), **kw)
        self.dim = int(self.model.output_dim)
        if pretrained and Path(pretrained).is_file():
            source = f"{Path(pretrained).name}:{file_fingerprint(pretrained)}"
        else:
            source = pretrained or f"random:{weights_fingerprint(self.model)}"
        self.model_id = f"open_clip:{model_name}:{source}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def load_classifier(ckpt_path: str | Path) -> nn.Module:
    """The fine-tuned `CharacterClassifier` from a Lightning checkpoint, once per process, in eval mode."""
    p = Path(ckpt_path)
    if not p.is_file():
        raise WeightsError(f"classifier checkpoint {p} not found; train one (python train.py) or fix the path / version")

    def _load() -> nn.Module:
        from ..models.classifier import CharacterClassifier

        try:
            return CharacterClassifier.load_from_checkpoint(str(p), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - torch/lightning raise many types for a bad file
            raise WeightsError(f"classifier checkpoint {p} could not be loaded ({type(exc).__name__}: {exc}); is it a train.py checkpoint?") from None

    return shared_model(("classifier", str(p.resolve()), p.stat().st_mtime_ns), _load)


def _classifier_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor] | None:
    """`data.transforms.build_eval_transform` for the classifier's size/normalisation (None if unavailable)."""
    try:
        from ..data.transforms import build_eval_transform
    except ImportError:
        return None
    return build_eval_transform(int(model.image_size), tuple(model.mean), tuple(model.std))


class ClassifierEmbedder(TorchEmbedder):
    """Pooled backbone features of the fine-tuned classifier: the best gallery embedder for a trained series."""

    def __init__(self, ckpt_path: str, **kw: Any) -> None:
        self.ckpt_path = str(ckpt_path)
        self.model = load_classifier(ckpt_path)
        kw.pop("image_size", None)
        super().__init__(int(self.model.image_size), tuple(self.model.mean), tuple(self.model.std), **kw)
        with torch.inference_mode():
            self.dim = int(self.model.embed(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1])
        self.model_id = f"classifier:{file_fingerprint(ckpt_path)}"
        self._transform = _classifier_transform(self.model)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The training run's own eval transform, so gallery features match what the classifier saw."""
        if self._transform is None:
            return super().preprocess(images)
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


EMBEDDER_REGISTRY: dict[str, type[TorchEmbedder]] = {
    "open_clip": OpenClipEmbedder,
    "timm": TimmEmbedder,
    "classifier": ClassifierEmbedder,
}


def build_embedder(cfg: Mapping[str, Any], base_dir: str | Path | None = None) -> TorchEmbedder:
    """Embedder from config ``{kind: open_clip|timm|classifier, ...}``; relative ``ckpt_path`` resolves against `base_dir`."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in EMBEDDER_REGISTRY:
        raise ConfigError(f"embedder.kind={kind!r}: choose one of {sorted(EMBEDDER_REGISTRY)}")
    if kind == "classifier":
        ckpt = cfg.get("ckpt_path")
        if not ckpt:
            raise ConfigError("embedder.kind=classifier needs embedder.ckpt_path (a train.py checkpoint) or a version with model.ckpt")
        if base_dir is not None and not Path(ckpt).is_absolute():
            cfg["ckpt_path"] = str(Path(base_dir) / ckpt)
    try:
        return EMBEDDER_REGISTRY[kind](**cfg)
    except TypeError as exc:
        raise ConfigError(f"embedder ({kind}): bad option ({exc}); see conf/embedder/") from None
