"""The ``--device`` of every command: one parser that knows what this machine has.

``auto`` (the default) is CUDA when available, else Apple's MPS when available, else the CPU. Also
accepted: ``cpu``, ``cuda`` (the current GPU), ``cuda:N`` and ``mps``. A device this machine does not
have is refused in one line naming it and what is available (:class:`~medcycle.errors.UsageError`, exit 2).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Union

from medcycle.errors import UsageError

if TYPE_CHECKING:  # torch is imported when a device is resolved, so the command line's help stays fast
    import torch

AUTO = "auto"
DEVICE_HELP = "auto (default: cuda when available, else mps, else cpu), cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def available_devices() -> list[str]:
    """The devices of this machine, as ``--device`` names them: ``cpu``, each ``cuda:N``, ``mps``."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: Union[str, "torch.device", None] = None) -> "torch.device":
    """The torch device `name` (``--device``) means on this machine; refuses one it does not have."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = AUTO if name in (None, "") else str(name).strip().lower()
    match = _PATTERN.fullmatch(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UsageError(f"--device {name}: not a device name; use {DEVICE_HELP}")
    kind, index = match.group(1), match.group(2)
    if kind == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    available = available_devices()
    if kind == "mps":
        if "mps" not in available:
            raise UsageError(f"--device mps: not available on this machine (available: {', '.join(available)})")
        return torch.device("mps")
    wanted = f"cuda:{index}" if index is not None else "cuda"
    if not torch.cuda.is_available() or (index is not None and int(index) >= torch.cuda.device_count()):
        raise UsageError(f"--device {wanted}: not available on this machine (available: {', '.join(available)})")
    return torch.device("cuda", int(index)) if index is not None else torch.device("cuda")


__all__ = ["AUTO", "DEVICE_HELP", "available_devices", "resolve_device"]
