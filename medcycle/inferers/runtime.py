"""How windows go through a generator on a device: precision, memory format and batch size.

Kept apart from the synthesis algorithm (:func:`medcycle.inferers.synthesize`), which only calls a
:class:`GeneratorRunner`. On CUDA: autocast (:func:`medcycle.engine.amp.autocast_dtype`) and
channels-last. On a CPU a copy of the generator runs, tuned (measured on a 2-core AVX512-BF16 CPU
with the ResNet generators):

* in bf16 when the CPU has native bf16, instead of autocast (the same arithmetic: autocast also
  rounds weights and activations to bf16 for every convolution, but casts the weights again on
  every call; 5 % faster with the 256-px generator);
* its instance norms replaced by the identical group norm with one group per channel (PyTorch's CPU
  kernel for it is faster and has a channels-last path, where instance norm converts to contiguous
  and back, 3x slower);
* channels-last when every feature map keeps at least ``CPU_CHANNELS_LAST_MIN_PIXELS`` pixels (the
  256-px generator: 275 instead of 300 ms per slice; below that size the channels-last group norm
  kernel falls to a slow path, 30x slower at 28 x 28, so the 112-px demo model stays contiguous);
* a forward pass holds at most ``CPU_BATCH_PIXELS`` pixels (a 256-px tile alone, eight 64-px tiles):
  larger batches fall out of cache and were up to 25 % slower per window.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from medcycle.engine.amp import AmpSetting, autocast_dtype

# On CPU, windows per forward pass are capped so a batch holds at most this many pixels.
CPU_BATCH_PIXELS = 32_768
# On CPU, channels-last only when the generator's smallest feature map has at least this many pixels.
CPU_CHANNELS_LAST_MIN_PIXELS = 1024


@dataclass
class Runtime:
    """Where and how a generator runs: device (default: where its weights are), the checkpoint's
    ``train.amp`` setting, windows per forward pass, and channels-last (default: chosen per device)."""

    device: Union[str, torch.device, None] = None
    amp: AmpSetting = "none"
    batch_size: int = 8
    channels_last: Optional[bool] = None


class GeneratorRunner:
    """A generator prepared for `runtime`: ``runner.put(batch)`` once, then ``runner(x)`` per mirroring."""

    def __init__(self, generator: Callable[[torch.Tensor], torch.Tensor], tile_size: int, runtime: Runtime) -> None:
        device = runtime.device
        if device is None:
            params = list(generator.parameters()) if isinstance(generator, torch.nn.Module) else []
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = autocast_dtype(runtime.amp, self.device)
        channels_last = runtime.channels_last
        if channels_last is None:
            smallest = tile_size // getattr(generator, "downsampling", tile_size)
            channels_last = self.device.type == "cuda" or smallest * smallest >= CPU_CHANNELS_LAST_MIN_PIXELS
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batch_size = runtime.batch_size
        if self.device.type == "cpu":
            self.batch_size = max(1, min(runtime.batch_size, CPU_BATCH_PIXELS // (tile_size * tile_size)))
        self.input_dtype = torch.float32
        if isinstance(generator, torch.nn.Module):
            if self.device.type == "cpu":  # the precision goes into the weights instead of autocast
                self.input_dtype = self.dtype or torch.float32
                generator, self.dtype = cpu_copy(generator, self.input_dtype), None
            generator = generator.to(device=self.device, memory_format=self.memory_format).eval()
        self.generator = generator

    def put(self, batch: torch.Tensor) -> torch.Tensor:
        """`batch` on the device, in the generator's input precision."""
        return batch.to(self.device, dtype=self.input_dtype, non_blocking=True)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.generator(batch.contiguous(memory_format=self.memory_format))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def cpu_copy(generator: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `generator` in `dtype` whose instance norms are the identical one-group-per-channel group norms."""
    generator = copy.deepcopy(generator).to(dtype)
    for module in list(generator.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.InstanceNorm2d) and not child.track_running_stats:
                norm = torch.nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    norm.load_state_dict(child.state_dict())
                setattr(module, name, norm.to(dtype))
    return generator


__all__ = ["CPU_BATCH_PIXELS", "GeneratorRunner", "Runtime", "cpu_copy"]
