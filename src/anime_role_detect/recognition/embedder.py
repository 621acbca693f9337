"""Image embedders: open_clip, any timm backbone, or the fine-tuned classifier; L2-normalised float32, batched.

`build_embedder(cfg, device=...)` picks one from `EMBEDDER_REGISTRY` by ``cfg.kind``. Every weight
source is a config value: a local path, an open_clip pretrained tag, or a Hugging Face hub name
(``hf-hub:org/name``, fetched through `hub.py` into the hub cache and found again offline).
Networks run on the resolved ``device`` (`device.py`: auto|cpu|cuda|mps). Loaded networks are shared
per process in a small LRU cache (`shared_model`), so the gallery, the classifier mode and the tag
head never load the same checkpoint twice, and hot reloads of new versions do not grow memory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.framing import IMAGENET_MEAN, IMAGENET_STD, batch_array
from ..errors import ConfigError, WeightsError
from .card import ClassifierCard, read_classifier_card
from .device import resolve_device
from .hub import hub_cache_dir, hub_files, split_revision
# the torch-free parts, importable from here as before
from .shared import (DEFAULT_SHARED_MODELS, clear_shared_models, file_fingerprint, l2_normalise, set_shared_model_limit,
                     shared_model, shared_model_keys)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_SHARED_MODELS", "ClassifierCard", "ClassifierEmbedder", "Embedder",
           "EMBEDDER_REGISTRY", "MirrorAveraged", "OpenClipEmbedder", "TimmEmbedder", "TorchEmbedder", "build_embedder",
           "clear_shared_models", "file_fingerprint", "l2_normalise", "load_classifier", "read_classifier_card",
           "set_shared_model_limit", "shared_model", "shared_model_keys", "to_batch", "weights_fingerprint"]


@runtime_checkable
class Embedder(Protocol):
    """Maps images to unit-length float32 vectors; ``model_id`` names the exact weights (gallery compatibility)."""

    model_id: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def weights_fingerprint(model: nn.Module, max_tensors: int = 64) -> str:
    """Short hash of a network's parameters: distinguishes random inits and fine-tunes of one architecture."""
    h = hashlib.sha1()
    for i, p in enumerate(model.state_dict().values()):
        if i >= max_tensors:
            break
        h.update(p.detach().cpu().contiguous().numpy().tobytes()[:65536])
    return h.hexdigest()[:12]


# -- preprocessing --------------------------------------------------------------------------------
def to_batch(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float], resize: str = "letterbox") -> torch.Tensor:
    """PIL images -> normalised NCHW float32 tensor (`framing.batch_array`)."""
    return torch.from_numpy(batch_array(images, size, mean, std, resize))


class TorchEmbedder:
    """Shared batching/normalisation for embedders wrapping a torch module ``forward_features(x) -> [N, D]``."""

    model_id: str = ""
    dim: int = 0

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 32,
                 flip_tta: bool = False, resize: str = "letterbox", num_threads: int | None = None,
                 device: str | None = "auto") -> None:
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = max(1, int(batch_size))
        self.flip_tta = bool(flip_tta)
        self.resize = resize
        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(int(num_threads))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> the network's input batch (on the CPU; `embed` moves it to the device)."""
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
            x = self.preprocess(images[i : i + self.batch_size]).to(self.device)
            if self.flip_tta:
                f = self.forward_features(torch.cat([x, torch.flip(x, dims=[3])]))
                f = nn.functional.normalize(f.float(), dim=1)
                f = f[: len(x)] + f[len(x) :]
            else:
                f = self.forward_features(x)
            out.append(f.float().cpu().numpy())
        return l2_normalise(np.concatenate(out))


class MirrorAveraged:
    """`inner`'s embedding of each picture averaged with its mirror image's: gallery rows that match a query facing
    either way (``gallery_build.flip_rows``), while queries stay one view. Same ``model_id`` and ``dim`` as `inner`."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model_id, self.dim = inner, inner.model_id, inner.dim
        self.batch_size = getattr(inner, "batch_size", 32)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        from PIL import ImageOps

        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(self.inner.embed(images) + self.inner.embed([ImageOps.mirror(im) for im in images]))


def ready(model: nn.Module, device: str) -> nn.Module:
    """`model` in eval mode on `device`, its 4-D weights channels-last on CPU and CUDA, the layout oneDNN's convolutions
    run fastest in (docs/recognition.md "Inference device"); the values are unchanged."""
    model = model.to(device).eval()
    if str(device).split(":")[0] in ("cpu", "cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def _on(device: str, loader: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """`loader` whose network ends up ready for inference on `device`."""
    return lambda: ready(loader(), device)


# -- timm -----------------------------------------------------------------------------------------
#: The files of a timm hub repo (``push_to_hub`` / ``save_for_hf`` layout): config + weights.
TIMM_HUB_FILES = ("config.json", ("model.safetensors", "pytorch_model.bin"))
_SOURCES = ("hf-hub:", "local-dir:")


def _timm_from_folder(folder: Path, label: str) -> nn.Module:
    """A timm model (pooled features) from a folder holding ``config.json`` + weights, as timm's ``local-dir:`` reads it."""
    import timm

    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - timm raises many types for a bad config or state_dict
        raise WeightsError(f"timm model {label} could not be built from {folder} ({type(exc).__name__}: {str(exc)[:160]}); "
                           "is it a timm hub repo (config.json with 'architecture' + model.safetensors)?") from None


def _load_timm_source(model_name: str, revision: str | None) -> nn.Module:
    """``hf-hub:org/name[@rev]`` (through the hub cache) or ``local-dir:/folder``: the weights come with the name."""
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise WeightsError(f"embedder.model_name={model_name!r}: {folder}/config.json not found; give a folder saved by timm (config.json + weights)")
        return _timm_from_folder(folder, model_name)
    repo, rev = split_revision(model_name[len("hf-hub:"):], revision)
    config, _ = hub_files(repo, TIMM_HUB_FILES, rev, what="timm model",
                          local_hint="set embedder.model_name=local-dir:/folder (config.json + weights)")
    return _timm_from_folder(config.parent, model_name)


class TimmEmbedder(TorchEmbedder):
    """Pooled features of a timm backbone: a registry name (e.g. the offline ImageNet EfficientNet-Lite0), ``hf-hub:org/name`` or ``local-dir:``."""

    def __init__(self, model_name: str = "efficientnet_lite0_offline", pretrained: bool = True, weights_path: str | None = None,
                 image_size: int | None = None, revision: str | None = None, device: str | None = "auto", **kw: Any) -> None:
        from ..models.backbones import backbone_data_config, create_backbone

        device = resolve_device(device)
        named = model_name.startswith(_SOURCES)
        if named and weights_path:
            raise ConfigError(f"embedder.model_name={model_name!r} brings its own weights; drop embedder.weights_path or use a timm registry name")
        if named:
            loader = lambda: _load_timm_source(model_name, revision)
        else:
            loader = lambda: create_backbone(model_name, pretrained=pretrained, weights_path=weights_path)
        key = ("timm", model_name, revision if named else bool(pretrained), weights_path, device)
        self.model = shared_model(key, _on(device, loader))
        dc = backbone_data_config(self.model)
        super().__init__(image_size or dc["input_size"][-1], dc.get("mean", IMAGENET_MEAN), dc.get("std", IMAGENET_STD),
                         device=device, **kw)
        self.dim = int(self.model.num_features)
        if named:
            source = "hub" if model_name.startswith("hf-hub:") else "local"
        else:
            source = Path(weights_path).name if weights_path else ("pretrained" if pretrained else "random")
        self.model_id = f"timm:{model_name}:{source}:{weights_fingerprint(self.model)}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# -- open_clip ------------------------------------------------------------------------------------
#: The files of an open_clip hub repo (``push_to_hf_hub`` layout): config + weights, safetensors first.
OPEN_CLIP_HUB_FILES = ("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
_OPEN_CLIP_LOCAL_HINT = "set embedder.pretrained to a local checkpoint file, or use embedder=lite0"


def _open_clip_tag_files(hf_hub: str) -> tuple[str, list[str]]:
    """open_clip's ``hf_hub`` entry (``org/name/`` or ``org/name/file.bin``) -> repo and weight files, safetensors first (as open_clip does)."""
    repo, filename = os.path.split(hf_hub)
    names = [filename] if filename else list(OPEN_CLIP_HUB_FILES[1])
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo, names


def _create_open_clip(model_name: str, **kw: Any) -> nn.Module:
    import open_clip

    try:
        return open_clip.create_model(model_name, **kw)
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types for bad files
        first = (str(exc).splitlines() or [""])[0][:200]
        raise WeightsError(f"open_clip {model_name} could not be loaded ({type(exc).__name__}: {first}); {_OPEN_CLIP_LOCAL_HINT}") from None


def _load_open_clip(model_name: str, pretrained: str | None, revision: str | None = None) -> tuple[nn.Module, str]:
    """The image tower and a source id: ``hf-hub:org/name``, ``local-dir:/folder``, or a built-in name + tag / local file / none."""
    import open_clip

    if model_name.startswith("hf-hub:"):
        repo, rev = split_revision(model_name[len("hf-hub:"):], revision)
        config, weights = hub_files(repo, OPEN_CLIP_HUB_FILES, rev, what="open_clip model",
                                    local_hint="set embedder.model_name=local-dir:/folder (open_clip_config.json + weights)")
        model = _create_open_clip(f"local-dir:{config.parent}", require_pretrained=True)
        return model.visual, file_fingerprint(weights)
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsError(f"embedder.model_name={model_name!r}: {folder}/open_clip_config.json not found; give a folder saved by open_clip")
        model = _create_open_clip(f"local-dir:{folder}", require_pretrained=True)
        return model.visual, f"local:{weights_fingerprint(model.visual)}"
    if model_name not in open_clip.list_models():
        raise ConfigError(f"embedder.model_name={model_name!r}: unknown open_clip model; pick one of open_clip.list_models() or hf-hub:org/name")
    if not pretrained:
        return _create_open_clip(model_name).visual, ""
    if Path(pretrained).is_file():
        return _create_open_clip(model_name, pretrained=pretrained, require_pretrained=True).visual, f"{Path(pretrained).name}:{file_fingerprint(pretrained)}"
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag:
        if ("/" in pretrained) or pretrained.endswith((".pt", ".bin", ".safetensors")):
            raise WeightsError(f"open_clip checkpoint {pretrained} not found; fix embedder.pretrained (a tag like 'laion2b_s34b_b79k' or a local file)")
        raise ConfigError(f"embedder.pretrained={pretrained!r} is not an open_clip tag of {model_name}; "
                          f"choose one of {open_clip.list_pretrained_tags_by_model(model_name)} or give a local file")
    preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if tag.get(k)}
    if tag.get("hf_hub"):  # fetched through our hub cache logic (offline-safe, one-line errors)
        repo, names = _open_clip_tag_files(tag["hf_hub"])
        weights = hub_files(repo, [names], revision, what=f"open_clip {model_name} {pretrained}", local_hint=_OPEN_CLIP_LOCAL_HINT)[0]
        model = _create_open_clip(model_name, pretrained=str(weights), require_pretrained=True, force_preprocess_cfg=preprocess)
    else:  # a tag with only a URL: open_clip's own download into the hub cache folder
        model = _create_open_clip(model_name, pretrained=pretrained, require_pretrained=True, cache_dir=str(hub_cache_dir()))
    return model.visual, pretrained


class OpenClipEmbedder(TorchEmbedder):
    """open_clip image tower: a built-in name + ``pretrained`` tag (hub, cached) or local file, ``hf-hub:org/name`` or ``local-dir:``."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k", revision: str | None = None,
                 device: str | None = "auto", **kw: Any) -> None:
        device = resolve_device(device)
        if model_name.startswith(_SOURCES):
            pretrained = None  # the name brings its own weights
        self.model, source = shared_model(("open_clip", model_name, pretrained, revision, device),
                                          lambda: _on_pair(device, _load_open_clip(model_name, pretrained, revision)))
        pcfg = getattr(self.model, "preprocess_cfg", {}) or {}
        size = self.model.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        kw.setdefault("resize", "center_crop")
        super().__init__(kw.pop("image_size", None) or size, pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                         pcfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device, **kw)
        self.dim = int(self.model.output_dim)
        self.model_id = f"open_clip:{model_name}:{source or 'random:' + weights_fingerprint(self.model)}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _on_pair(device: str, loaded: tuple[nn.Module, str]) -> tuple[nn.Module, str]:
    return ready(loaded[0], device), loaded[1]


# -- the fine-tuned classifier --------------------------------------------------------------------
def load_classifier(ckpt_path: str | Path, device: str | None = "auto") -> nn.Module:
    """The fine-tuned `CharacterClassifier` from a Lightning checkpoint on `device`, once per process, in eval mode."""
    p = Path(ckpt_path)
    if not p.is_file():
        raise WeightsError(f"classifier checkpoint {p} not found; train one (python train.py) or fix the path / version")
    device = resolve_device(device)

    def _load() -> nn.Module:
        from ..models.classifier import CharacterClassifier

        try:
            model = CharacterClassifier.load_from_checkpoint(str(p), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch/lightning raise many types for a bad file
            raise WeightsError(f"classifier checkpoint {p} could not be loaded ({type(exc).__name__}: {exc}); is it a train.py checkpoint?") from None
        return ready(model, device)

    return shared_model(("classifier", str(p.resolve()), p.stat().st_mtime_ns, device), _load)


def _classifier_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor] | None:
    """`data.transforms.build_eval_transform` for the classifier's size/normalisation (None if unavailable)."""
    try:
        from ..data.transforms import build_eval_transform
    except ImportError:
        return None
    return build_eval_transform(int(model.image_size), tuple(model.mean), tuple(model.std), getattr(model, "eval_resize", "center_crop"))


class ClassifierEmbedder(TorchEmbedder):
    """Pooled backbone features of the fine-tuned classifier: the best gallery embedder for a trained series."""

    def __init__(self, ckpt_path: str, device: str | None = "auto", **kw: Any) -> None:
        self.ckpt_path = str(ckpt_path)
        device = resolve_device(device)
        self.model = load_classifier(ckpt_path, device=device)
        kw.pop("image_size", None)
        super().__init__(int(self.model.image_size), tuple(self.model.mean), tuple(self.model.std), device=device, **kw)
        with torch.inference_mode():
            self.dim = int(self.model.embed(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)).shape[1])
        self.model_id = f"classifier:{file_fingerprint(ckpt_path)}"
        self._transform = _classifier_transform(self.model)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The training run's own eval transform, so gallery features match what the classifier saw."""
        if self._transform is None:
            return super().preprocess(images)
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)

    @torch.inference_mode()
    def heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """Character softmax ``[N, C]`` and tag sigmoid ``[N, T]`` (None without a tag head), batched on the device, as CPU numpy."""
        _, probs, tags = self._passes(images, embed=False)
        return probs, tags

    @torch.inference_mode()
    def embed_with_heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One backbone pass per view for everything: unit embeddings (flip-averaged with ``flip_tta``), character
        softmax and tag sigmoid (heads on the unflipped view, as `heads` computes them)."""
        return self._passes(images, embed=True)

    def _passes(self, images: Sequence[Image.Image], embed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        embs, probs, tags = [], [], []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size]).to(self.device)
            n = len(x)
            flip = embed and self.flip_tta
            feats, logits, tag_logits = self.model.outputs(torch.cat([x, torch.flip(x, dims=[3])]) if flip else x)
            feats, logits, tag_logits = feats.float(), logits[:n], tag_logits[:n]
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            if tag_logits is not None and tag_logits.numel():
                tags.append(torch.sigmoid(tag_logits.float()).cpu().numpy())
            if embed:
                f = nn.functional.normalize(feats[:n], dim=1) + nn.functional.normalize(feats[n:], dim=1) if flip else feats
                embs.append(f.cpu().numpy())
        n_classes = len(getattr(self.model, "class_names", []) or [])
        emb = l2_normalise(np.concatenate(embs)) if embs else np.zeros((0, self.dim), np.float32)
        return emb, (np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32)), (np.concatenate(tags) if tags else None)


EMBEDDER_REGISTRY: dict[str, type[TorchEmbedder]] = {
    "open_clip": OpenClipEmbedder,
    "timm": TimmEmbedder,
    "classifier": ClassifierEmbedder,
}


def build_embedder(cfg: Mapping[str, Any], base_dir: str | Path | None = None, device: str | None = None) -> Any:
    """Embedder from config ``{kind: open_clip|timm|classifier, ...}`` on `device` (auto|cpu|cuda|mps; a ``device`` key in `cfg` wins).

    A relative ``ckpt_path`` resolves against `base_dir` (a version folder). It runs on face + figure views
    (`views.FaceFigureModel`) when ``face_view`` says so, or, without that key, when the classifier was trained on them,
    and joins each picture's colour histogram to its embedding when ``colour`` says so (`colour.ColourModel`).
    """
    from .colour import with_colour
    from .views import face_view_for, with_face_view

    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    face_view = cfg.pop("face_view", None)
    colour = cfg.pop("colour", None)
    if kind not in EMBEDDER_REGISTRY:
        raise ConfigError(f"embedder.kind={kind!r}: choose one of {sorted(EMBEDDER_REGISTRY)}")
    cfg["device"] = cfg.get("device") or device or "auto"
    if kind == "classifier":
        ckpt = cfg.get("ckpt_path")
        if not ckpt:
            raise ConfigError("embedder.kind=classifier needs embedder.ckpt_path (a train.py checkpoint) or a version with model.ckpt")
        if base_dir is not None and not Path(ckpt).is_absolute():
            cfg["ckpt_path"] = str(Path(base_dir) / ckpt)
    try:
        emb = EMBEDDER_REGISTRY[kind](**cfg)
    except TypeError as exc:
        raise ConfigError(f"embedder ({kind}): bad option ({exc}); see conf/embedder/") from None
    emb = with_colour(emb, colour)  # inside the views: each view's own colours
    return with_face_view(emb, face_view_for(face_view, getattr(emb, "model", None) if kind == "classifier" else None))
