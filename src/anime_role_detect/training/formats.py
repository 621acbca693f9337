"""How a training run lays out its tensors: channels-last weights (`ChannelsLast`) and whether the CPU runs bf16 natively.

oneDNN's convolutions on CPU run faster in channels-last (NHWC) layout, and a convolution whose weight is
channels-last computes in that layout whatever its input's, so converting the module's weights once is enough;
on CUDA the same layout is what tensor cores want under mixed precision. The values are unchanged: only the
order in memory (a checkpoint's ``state_dict`` loads into either layout).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class ChannelsLast(L.Callback):
    """Puts the module's 4-D weights in channels-last layout before fitting (or predicting) starts; on CPU and CUDA
    only (Apple MPS keeps NCHW, its channels-last kernels were not measured here)."""

    def setup(self, trainer: Any, pl_module: L.LightningModule, stage: str) -> None:
        if type(getattr(trainer, "accelerator", None)).__name__ != "MPSAccelerator":
            pl_module.to(memory_format=torch.channels_last)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 / AMX), where bf16 autocast can be faster than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
