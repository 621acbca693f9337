"""Layer-wise learning-rate decay (`model.optimizer.layer_decay`): the early, generic layers of the body learn slowest."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from anime_role_detect.errors import ConfigError
from anime_role_detect.models.classifier import CharacterClassifier

LITE0 = {"name": "tf_efficientnet_lite0", "pretrained": False, "weights_path": None}
LR, HEAD_MULT = 1e-3, 10.0


def _optimizer(layer_decay: float | None) -> tuple[CharacterClassifier, torch.optim.Optimizer]:
    opt = {"name": "adamw", "lr": LR, "weight_decay": 1e-4, "head_lr_multiplier": HEAD_MULT, "layer_decay": layer_decay}
    model = CharacterClassifier(["a", "b", "c"], backbone=LITE0, image_size=32, optimizer=opt, scheduler={"name": "none"})
    return model, model.configure_optimizers()["optimizer"]


def _lr_of(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> float:
    (lr,) = [g["lr"] for g in opt.param_groups if any(p is param for p in g["params"])]
    return lr


def test_layer_decay_slows_the_early_layers_and_covers_every_parameter_once() -> None:
    model, opt = _optimizer(0.8)
    body = list(model.backbone.parameters())
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))  # no parameter twice or left out
    stem, first, last, top = (model.backbone.conv_stem.weight, model.backbone.blocks[0][0].conv_dw.weight,
                              model.backbone.blocks[-1][-1].conv_pw.weight, model.backbone.conv_head.weight)
    assert _lr_of(opt, top) == pytest.approx(LR)  # the top layer keeps the configured rate
    assert _lr_of(opt, stem) < _lr_of(opt, first) < _lr_of(opt, last) <= LR
    rates = sorted({g["lr"] for g in opt.param_groups if any(id(p) in {id(q) for q in body} for p in g["params"])}, reverse=True)
    assert all(b / a == pytest.approx(0.8) for a, b in pairwise(rates))  # each layer 0.8x the one above
    assert _lr_of(opt, stem) < 0.1 * LR  # 16 blocks down: a small fraction of the top's rate
    assert _lr_of(opt, model.char_head.weight) == pytest.approx(LR * HEAD_MULT)  # heads as before
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if any(p.ndim <= 1 for p in g["params"]) and
               any(p is q for p in g["params"] for q in body))  # timm's grouping: no decay on bias / norm


def test_without_layer_decay_the_body_is_one_group_at_the_configured_rate() -> None:
    model, opt = _optimizer(None)
    body = {id(p) for p in model.backbone.parameters()}
    (group,) = [g for g in opt.param_groups if any(id(p) in body for p in g["params"])]
    assert {id(p) for p in group["params"]} == body and group["lr"] == pytest.approx(LR)


def test_a_decay_outside_zero_to_one_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"layer_decay=1.5: give a factor in \(0, 1\]"):
        _optimizer(1.5)


def test_a_backbone_timm_cannot_number_is_refused_when_the_model_is_built() -> None:
    from anime_role_detect.models.backbones import BACKBONE_REGISTRY

    BACKBONE_REGISTRY["plain_conv"] = lambda **_: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
    try:
        with pytest.raises(ConfigError, match="has no timm group_matcher.*layer_decay=null"):
            CharacterClassifier(["a", "b"], backbone={"name": "plain_conv"}, optimizer={"layer_decay": 0.8})
    finally:
        del BACKBONE_REGISTRY["plain_conv"]
