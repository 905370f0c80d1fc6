"""Automatic mixed precision policy: which autocast dtype a ``train.amp`` setting means on a device.

Training, validation and conversion all ask here, so that a model runs in conversion with the
arithmetic it was trained with.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

#: a config's ``train.amp`` (``auto``, ``none``, ``bf16``, ``fp16``), or a plain on/off
AmpSetting = Union[bool, str, None]


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False


def autocast_dtype(amp: AmpSetting, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype for a config's ``train.amp`` setting on `device`, or None for fp32.

    ``"none"``/False/None: fp32. On CPU any other setting means bf16 when the CPU has native bf16
    (AVX512-BF16 or AMX), else fp32 (emulated bf16 is slower than fp32). On CUDA, ``"fp16"`` gives
    fp16, ``"bf16"``/``"auto"``/True give bf16 where supported, else fp16.
    """
    if amp in (None, False, "none"):
        return None
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


__all__ = ["AmpSetting", "autocast_dtype", "cpu_supports_bf16"]
