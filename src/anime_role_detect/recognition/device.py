"""Inference device: one ``device: auto|cpu|cuda[:N]|mps`` setting for the embedder, classifier and tagger.

`resolve_device` turns the setting into a torch device string (``auto``: CUDA if torch sees a GPU,
else Apple MPS, else CPU); `ort_providers` gives ONNX Runtime the matching execution providers
(CUDA only when the installed onnxruntime has it, CPU otherwise).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError

#: Accepted spellings: auto, cpu, mps, cuda or cuda:N.
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | None = "auto") -> str:
    """``auto``/``cpu``/``cuda[:N]``/``mps`` -> the torch device string to use; a device torch cannot see is a ConfigError."""
    raw = "auto" if name is None else str(name).strip().lower()
    if not _DEVICE_RE.match(raw):
        raise ConfigError(f"device={name!r} is unknown; choose auto, cpu, cuda (or cuda:N) or mps")
    if raw == "auto":
        return "cuda" if _cuda_available() else "mps" if _mps_available() else "cpu"
    if raw.startswith("cuda") and not _cuda_available():
        raise ConfigError(f"device={raw} but torch sees no CUDA GPU; use device=auto or device=cpu")
    if raw == "mps" and not _mps_available():
        raise ConfigError("device=mps but this torch build has no usable Apple MPS backend; use device=auto or device=cpu")
    return raw


def ort_providers(device: str | None = "auto") -> list[Any]:
    """ONNX Runtime execution providers for `device`: CUDA (then CPU) when it resolves to CUDA and onnxruntime has it, else CPU."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    name = "auto" if device is None else str(device).strip().lower()
    if not has_cuda and name in ("auto", "cpu"):  # CPU whatever torch sees: answer without importing it
        return ["CPUExecutionProvider"]
    dev = resolve_device(device)
    if dev.startswith("cuda") and has_cuda:
        index = int(dev.split(":")[1]) if ":" in dev else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def running_device(device: str | None = "auto", onnx_only: bool = False) -> str:
    """Where a recognizer's networks run, for reports: torch's device, or with `onnx_only` (every network on ONNX
    Runtime, torch never imported) the device of ONNX Runtime's first provider, found without importing torch."""
    if not onnx_only:
        return resolve_device(device)
    first = ort_providers(device)[0]
    return resolve_device(device) if first != "CPUExecutionProvider" else "cpu"
