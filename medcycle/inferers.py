"""Whole-volume synthesis: a 2D (or 2.5D) generator applied to every axial slice of an MRI.

:func:`synthesize` runs MONAI's :class:`~monai.inferers.SliceInferer` over the last (axial) axis of a
volume already on the model grid (oriented, resampled in-plane, normalised to [-1, 1]):

* every axial slice is cut into ``tile_size`` x ``tile_size`` windows overlapping by 25 %, blended
  with gaussian weights; a slice smaller than the tile is padded with -1 (the normalised background);
* with a body ``mask``, only the body's in-plane region runs: a tile centred on the body's bounding
  box, as training tiles are cut (:func:`medcycle.transforms.plan_tiles`), widened where the body
  (grown by ``MASK_MARGIN``) reaches beyond it; outside it the output is -1. A head that fits one
  tile then costs one window per slice instead of up to four overlapping ones;
* 2.5D: with ``context_slices = k > 1`` the k neighbouring slices (edge slices replicated) are given
  as channels and the centre output channel is kept;
* windows are run ``batch_size`` at a time in ``torch.inference_mode`` with bf16 autocast when AMP
  is asked for and the device supports it, channels-last on CUDA;
* on a CPU a copy of the generator runs, tuned (measured on a 2-core AVX512-BF16 CPU with the
  ResNet generators): in bf16 when the CPU has native bf16, instead of autocast (the same
  arithmetic: autocast also rounds weights and activations to bf16 for every convolution, but casts
  the weights again on every call; 5 % faster with the 256-px generator); its instance norms
  replaced by the identical group norm with one group per channel (PyTorch's CPU kernel for it is
  faster and has a channels-last path, where instance norm converts to contiguous and back, 3x
  slower); channels-last when every feature map keeps at least ``CPU_CHANNELS_LAST_MIN_PIXELS``
  pixels (the 256-px generator: 275 instead of 300 ms per slice; below that size the channels-last
  group norm kernel falls to a slow path, 30x slower at 28 x 28, so the 112-px demo model stays
  contiguous); and a forward pass holds at most ``CPU_BATCH_PIXELS`` pixels (a 256-px tile alone,
  eight 64-px tiles): larger batches fall out of cache and were up to 25 % slower per window;
* with a body ``mask``, windows with no body voxel within ``MASK_MARGIN`` voxels are not run at all
  (their output is -1, i.e. air; the caller sets everything outside the mask to air anyway, and the
  margin keeps every voxel that interpolation back to the input grid reads at the mask's edge real);
* ``tta="mirror"`` averages the outputs of the four in-plane mirrorings of each window (none,
  left-right, front-back, both), the mirroring test-time augmentation of nnU-Net: the CycleGAN invents
  texture that differs between mirrorings and the average cancels part of it (on validation tiles of
  the phantom: 204 -> 176 HU MAE unpaired, 152 -> 134 with paired training), at four times the compute;
* the volume is processed in chunks of axial slices, so memory stays bounded for large volumes
  (the result is identical: windows never span slices).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Optional, Union

import torch
from monai.inferers import SliceInferer

__all__ = ["synthesize", "synthesize_volume", "autocast_dtype", "context_stack", "TTA_MODES"]

AmpSetting = Union[bool, str, None]

#: Test-time augmentation: ``none``, or ``mirror`` (the mean over the four in-plane mirrorings).
TTA_MODES = ("none", "mirror")
_MIRRORINGS = ((), (2,), (3,), (2, 3))  # flipped dims of a (B, k, X, Y) window

# In-plane voxels by which the body mask is grown before deciding which windows to skip.
MASK_MARGIN = 2
# On CPU, windows per forward pass are capped so a batch holds at most this many pixels.
CPU_BATCH_PIXELS = 32_768
# On CPU, channels-last only when the generator's smallest feature map has at least this many pixels.
CPU_CHANNELS_LAST_MIN_PIXELS = 1024
# Voxels of the (k-channel) input built at a time; bounds memory for 512 x 512 x 300 volumes.
CHUNK_VOXELS = 24_000_000


def _cpu_supports_bf16() -> bool:
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
        return torch.bfloat16 if _cpu_supports_bf16() else None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def context_stack(volume: torch.Tensor, context_slices: int, z0: int = 0, z1: Optional[int] = None) -> torch.Tensor:
    """(1, k, X, Y, z1 - z0): slices z0..z1 of a (1, X, Y, Z) volume with their k - 1 neighbours.

    Channel ``c`` holds slice ``z + c - k // 2``; indices past either end repeat the edge slice.
    """
    z_size = volume.shape[-1]
    z1 = z_size if z1 is None else z1
    half = context_slices // 2
    index = torch.arange(z0, z1, device=volume.device)
    channels = [volume[0].index_select(-1, (index + offset).clamp_(0, z_size - 1)) for offset in range(-half, half + 1)]
    return torch.stack(channels)[None]


def synthesize(
    generator: Callable[[torch.Tensor], torch.Tensor],
    mr_norm: torch.Tensor,
    tile_size: int,
    context_slices: int = 1,
    batch_size: int = 8,
    device: Union[str, torch.device, None] = None,
    amp: AmpSetting = "none",
    mask: Optional[torch.Tensor] = None,
    chunk_slices: Optional[int] = None,
    progress: bool = False,
    channels_last: Optional[bool] = None,
    tta: str = "none",
) -> torch.Tensor:
    """The generator's output for every axial slice of `mr_norm`, on the same grid.

    Args:
        generator: a module (or callable) mapping (N, k, H, W) in [-1, 1] to (N, k, H, W).
        mr_norm: (1, X, Y, Z) normalised MR on the model grid (axial slices along the last axis).
        tile_size: the square window the generator was trained on.
        context_slices: k, the number of neighbouring slices given as channels (odd).
        batch_size: windows per forward pass (``sw_batch_size``); on CPU at most
            ``CPU_BATCH_PIXELS // tile_size**2`` (at least 1).
        device: where the generator runs (default: where its parameters are, else CPU).
        amp: the checkpoint's ``train.amp`` setting (see :func:`autocast_dtype`).
        mask: optional (1, X, Y, Z) body mask; windows with no body voxel within ``MASK_MARGIN``
            voxels are skipped (output -1).
        chunk_slices: axial slices processed per SliceInferer call (default: bounded by memory).
        progress: show a tqdm bar over the chunks.
        channels_last: run in channels-last memory format (default: on CUDA; on CPU where the
            generator's smallest feature map has at least ``CPU_CHANNELS_LAST_MIN_PIXELS`` pixels).
        tta: ``"none"`` or ``"mirror"`` (average over the four in-plane mirrorings of each window).

    Returns:
        (1, X, Y, Z) float32 tensor on the CPU, values in [-1, 1].
    """
    if mr_norm.ndim != 4 or mr_norm.shape[0] != 1:
        raise ValueError(f"mr_norm must be (1, X, Y, Z), got {tuple(mr_norm.shape)}")
    if context_slices < 1 or context_slices % 2 == 0:
        raise ValueError(f"context_slices must be odd and >= 1, got {context_slices}")
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if mask is not None and tuple(mask.shape) != tuple(mr_norm.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from mr_norm {tuple(mr_norm.shape)}")
    if device is None:
        params = list(generator.parameters()) if isinstance(generator, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    volume = _plain(mr_norm).float().cpu()
    body = _plain(mask).cpu() if mask is not None else None
    region = _body_region(body, tile_size) if body is not None else None
    if region is not None:  # F.pad takes the last axis first: (z, z, y_low, y_high, x_low, x_high)
        pads = (0, 0, *region[2:], *region[:2])
        volume = torch.nn.functional.pad(volume, pads, value=-1.0)
        body = torch.nn.functional.pad(body, pads, value=0.0)
    _, x_size, y_size, z_size = volume.shape
    k, centre = context_slices, context_slices // 2
    dtype = autocast_dtype(amp, device)
    if channels_last is None:
        smallest = tile_size // getattr(generator, "downsampling", tile_size)
        channels_last = device.type == "cuda" or smallest * smallest >= CPU_CHANNELS_LAST_MIN_PIXELS
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cpu":
        batch_size = max(1, min(batch_size, CPU_BATCH_PIXELS // (tile_size * tile_size)))
    input_dtype = torch.float32
    if isinstance(generator, torch.nn.Module):
        if device.type == "cpu":
            input_dtype = dtype or torch.float32
            generator, dtype = _cpu_copy(generator, input_dtype), None
        generator = generator.to(device=device, memory_format=memory_format).eval()

    mirrorings = _MIRRORINGS if tta == "mirror" else _MIRRORINGS[:1]

    def network(window: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        # window: (B, k, tile, tile) from SliceInferer; condition: the matching mask windows.
        out = torch.full((window.shape[0], 1, *window.shape[2:]), -1.0, dtype=torch.float32, device=window.device)
        keep = None
        if condition is not None:
            keep = (condition > 0).flatten(1).any(1)
            if not bool(keep.any()):
                return out
            if bool(keep.all()):
                keep = None
        batch = window if keep is None else window[keep]
        batch = batch.to(device, dtype=input_dtype, non_blocking=True)
        result = None
        for dims in mirrorings:
            with _autocast(device, dtype):
                flipped = generator(_flip(batch, dims).contiguous(memory_format=memory_format))
            part = _flip(flipped[:, centre : centre + 1].float(), dims)
            result = part if result is None else result.add_(part)
        result = result.div_(len(mirrorings)).to(out.device)
        if keep is None:
            return result.contiguous()
        out[keep] = result
        return out

    inferer = SliceInferer(
        spatial_dim=2,
        roi_size=(tile_size, tile_size),
        sw_batch_size=batch_size,
        overlap=0.25,
        mode="gaussian",
        padding_mode="constant",
        cval=-1.0,
        sw_device=device,
        device=torch.device("cpu"),
        progress=False,
    )
    if chunk_slices is None:
        padded = max(x_size, tile_size) * max(y_size, tile_size)
        chunk_slices = max(1, min(z_size, CHUNK_VOXELS // (padded * (k + 2))))
    output = torch.empty((1, x_size, y_size, z_size), dtype=torch.float32)
    starts = range(0, z_size, chunk_slices)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, total=math.ceil(z_size / chunk_slices), desc="slices", unit="chunk", leave=False)
    with torch.inference_mode():
        for z0 in starts:
            z1 = min(z_size, z0 + chunk_slices)
            grown = _grow(body[..., z0:z1]) if body is not None else None  # per chunk: bounded memory
            if grown is not None and not bool(grown.any()):
                output[..., z0:z1] = -1.0
                continue
            stack = context_stack(volume, k, z0, z1)
            if grown is not None:
                condition = grown[None].expand(1, k, x_size, y_size, z1 - z0)
                result = inferer(stack, network, condition=condition)
            else:
                result = inferer(stack, network)
            output[..., z0:z1] = result[0]
    if region is not None:  # back onto the input's in-plane extent
        output = torch.nn.functional.pad(output, tuple(-p for p in pads), value=-1.0)
    return output.clamp_(-1.0, 1.0)


def _body_region(body: torch.Tensor, tile_size: int) -> Optional[tuple[int, int, int, int]]:
    """The in-plane region to run, as pads ``(x_low, x_high, y_low, y_high)`` of the volume (negative: crop).

    A ``tile_size`` window centred on the body's in-plane bounding box over all slices, as
    :func:`medcycle.transforms.plan_tiles` cuts training tiles (so instance norm sees the statistics
    it was trained on, and a head that fits one tile costs one window per slice instead of up to
    four overlapping ones), widened to hold the body grown by ``MASK_MARGIN`` where that exceeds it.
    None when there is no body.
    """
    in_plane = (body[0] > 0).any(dim=-1)
    if not bool(in_plane.any()):
        return None
    grown = _grow(in_plane[None, :, :, None].float())[0, :, :, 0] > 0
    pads = []
    for axis in (0, 1):
        size = in_plane.shape[axis]
        inside = torch.nonzero(in_plane.any(dim=1 - axis)).flatten()
        reach = torch.nonzero(grown.any(dim=1 - axis)).flatten()
        start = (int(inside[0]) + int(inside[-1]) + 1) // 2 - tile_size // 2
        low, high = min(start, int(reach[0])), max(start + tile_size, int(reach[-1]) + 1)
        pads += [-low, high - size]
    return tuple(pads)


# The name used in docs/ARCHITECTURE.md.
synthesize_volume = synthesize


def _cpu_copy(generator: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
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


def _flip(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return tensor.flip(dims) if dims else tensor


def _grow(mask: torch.Tensor) -> torch.Tensor:
    """(1, X, Y, z) float 0/1: the body mask grown in-plane by ``MASK_MARGIN`` voxels."""
    slices = (mask[0] > 0).float().permute(2, 0, 1)[:, None].contiguous()  # (z, 1, X, Y): 2D pooling is 2x faster
    grown = torch.nn.functional.max_pool2d(slices, 2 * MASK_MARGIN + 1, stride=1, padding=MASK_MARGIN)
    return grown[:, 0].permute(1, 2, 0)[None]


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain torch.Tensor (MetaTensor's metadata tracking slows every indexing operation)."""
    if hasattr(tensor, "as_tensor"):
        return tensor.as_tensor()
    return torch.as_tensor(tensor)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
