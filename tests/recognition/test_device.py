"""Inference device resolution (auto -> cuda, else mps, else cpu), ONNX Runtime providers, and the builders' ``device`` argument.

The accelerator checks are monkeypatched so every branch runs on a CPU-only machine; the builders
are then exercised for real on the CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from anime_role_detect.errors import ConfigError
from anime_role_detect.recognition import device as device_mod
from anime_role_detect.recognition.device import ort_providers, resolve_device
from anime_role_detect.recognition.embedder import build_embedder
from anime_role_detect.recognition.tagger import build_tagger

from .test_tagger import export, wd14_csv

CUDA_AVAILABLE, MPS_AVAILABLE = torch.cuda.is_available, torch.backends.mps.is_available


@pytest.fixture()
def machine(monkeypatch):
    """Set what torch reports: ``machine(cuda=True, mps=False)``."""

    def set_(cuda: bool, mps: bool) -> None:
        # functools.wraps keeps ``__wrapped__``, which torch._dynamo reads from these functions when it is first imported
        monkeypatch.setattr(torch.cuda, "is_available", functools.wraps(CUDA_AVAILABLE)(lambda: cuda))
        monkeypatch.setattr(torch.backends.mps, "is_available", functools.wraps(MPS_AVAILABLE)(lambda: mps))

    return set_


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda, mps)
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" AUTO ") == expected


def test_explicit_devices_and_their_errors(machine):
    machine(cuda=True, mps=False)
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="no usable Apple MPS"):
        resolve_device("mps")
    machine(cuda=False, mps=True)
    assert resolve_device("mps") == "mps"
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU") as err:
        resolve_device("cuda:0")
    assert "\n" not in str(err.value) and "device=auto" in str(err.value)
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ConfigError, match="choose auto, cpu, cuda"):
            resolve_device(bad)


def test_onnx_runtime_uses_cuda_only_when_the_device_is_cuda_and_the_provider_is_installed(machine, monkeypatch):
    import onnxruntime as ort

    machine(cuda=True, mps=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers("auto") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert ort_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # the CPU-only wheel
    assert ort_providers("cuda") == ["CPUExecutionProvider"]
    machine(cuda=False, mps=True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers("auto") == ["CPUExecutionProvider"]  # mps: ONNX Runtime stays on the CPU


def test_builders_take_a_device_and_a_config_key_wins(tmp_path, machine):
    machine(cuda=False, mps=False)
    e = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 32}, device="auto")
    assert e.device == "cpu" and next(e.model.parameters()).device.type == "cpu"
    assert e.embed([Image.new("RGB", (20, 30))]).shape == (1, e.dim)
    with pytest.raises(ConfigError, match="device='tpu'"):
        build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False}, device="tpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):  # the part's own key wins over the recognizer-wide argument
        build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "device": "cuda"}, device="cpu")
    tagger = build_tagger({"kind": "onnx", "model_path": export(tmp_path, nhwc=True, scale=255.0), "tags_path": wd14_csv(tmp_path)},
                          device="auto")
    assert tagger.providers == ["CPUExecutionProvider"] and np.isfinite(tagger.predict([Image.new("RGB", (8, 8))])).all()
    assert device_mod.resolve_device(e.device) == "cpu"  # a resolved name resolves to itself
