"""Whole-volume synthesis: a 2D (or 2.5D) generator applied to every axial slice of an MRI.

:func:`synthesize` runs MONAI's :class:`~monai.inferers.SliceInferer` over the last (axial) axis of a
volume already on the model grid (oriented, resampled in-plane, normalised to [-1, 1]):

* every axial slice is cut into ``tile_size`` x ``tile_size`` windows overlapping by 25 %, blended
  with gaussian weights; a slice smaller than the tile is padded with -1 (the normalised background);
* with a body ``mask``, only the body's in-plane region runs: a tile centred on the body's bounding
  box, as training tiles are cut (:func:`medcycle.transforms.plan_tiles`), widened where the body
  (grown by ``MASK_MARGIN``) reaches beyond it; outside it the output is -1. A head that fits one
  tile then costs one window per slice instead of up to four overlapping ones; windows with no body
  voxel within ``MASK_MARGIN`` voxels are not run at all (the caller sets everything outside the mask
  to air anyway, and the margin keeps every voxel that interpolation back to the input grid reads at
  the mask's edge real);
* 2.5D: with ``context_slices = k > 1`` the k neighbouring slices (edge slices replicated) are given
  as channels and the centre output channel is kept;
* ``tta="mirror"`` averages the outputs of the four in-plane mirrorings of each window (none,
  left-right, front-back, both), the mirroring test-time augmentation of nnU-Net: the CycleGAN invents
  texture that differs between mirrorings and the average cancels part of it, at four times the compute;
* with ``keep_mirrorings`` each mirroring's own output comes back too (for an uncertainty map);
* the volume is processed in chunks of axial slices, so memory stays bounded for large volumes
  (the result is identical: windows never span slices).

How each batch of windows runs on the device (precision, memory format, batch size) is the
:class:`~medcycle.inferers.runtime.GeneratorRunner`'s business.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from monai.inferers import SliceInferer

from medcycle.inferers.runtime import GeneratorRunner, Runtime

#: Test-time augmentation: ``none``, or ``mirror`` (the mean over the four in-plane mirrorings).
TTA_MODES = ("none", "mirror")
_MIRRORINGS = ((), (2,), (3,), (2, 3))  # flipped dims of a (B, k, X, Y) window

# In-plane voxels by which the body mask is grown before deciding which windows to skip.
MASK_MARGIN = 2
# Voxels of the (k-channel) input built at a time; bounds memory for 512 x 512 x 300 volumes.
CHUNK_VOXELS = 24_000_000


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
    mask: Optional[torch.Tensor] = None,
    tta: str = "none",
    runtime: Optional[Runtime] = None,
    keep_mirrorings: bool = False,
) -> torch.Tensor:
    """The generator's output for every axial slice of `mr_norm`, on the same grid.

    Args:
        generator: a module (or callable) mapping (N, k, H, W) in [-1, 1] to (N, k, H, W).
        mr_norm: (1, X, Y, Z) normalised MR on the model grid (axial slices along the last axis).
        tile_size: the square window the generator was trained on.
        context_slices: k, the number of neighbouring slices given as channels (odd).
        mask: optional (1, X, Y, Z) body mask: only the body's region runs (output -1 elsewhere).
        tta: ``"none"`` or ``"mirror"`` (average over the four in-plane mirrorings of each window).
        runtime: device, AMP setting, batch size (default: the generator's device, fp32, 8 windows).
        keep_mirrorings: also return the output of each mirroring (one for ``tta="none"``).

    Returns:
        (1, X, Y, Z) float32 tensor on the CPU, values in [-1, 1]; with `keep_mirrorings`
        (1 + T, X, Y, Z): that output, then the output of each of the T mirrorings.
    """
    if mr_norm.ndim != 4 or mr_norm.shape[0] != 1:
        raise ValueError(f"mr_norm must be (1, X, Y, Z), got {tuple(mr_norm.shape)}")
    if context_slices < 1 or context_slices % 2 == 0:
        raise ValueError(f"context_slices must be odd and >= 1, got {context_slices}")
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if mask is not None and tuple(mask.shape) != tuple(mr_norm.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from mr_norm {tuple(mr_norm.shape)}")
    runner = GeneratorRunner(generator, tile_size, runtime or Runtime())
    volume = _plain(mr_norm).float().cpu()
    body = _plain(mask).cpu() if mask is not None else None
    region = _body_region(body, tile_size) if body is not None else None
    if region is not None:  # F.pad takes the last axis first: (z, z, y_low, y_high, x_low, x_high)
        pads = (0, 0, *region[2:], *region[:2])
        volume = torch.nn.functional.pad(volume, pads, value=-1.0)
        body = torch.nn.functional.pad(body, pads, value=0.0)
    mirrorings = _MIRRORINGS if tta == "mirror" else _MIRRORINGS[:1]
    network = _window_network(runner, context_slices // 2, mirrorings, keep_mirrorings)
    channels = 1 + len(mirrorings) if keep_mirrorings else 1
    output = _over_slices(network, runner, volume, body, tile_size, context_slices, channels)
    if region is not None:  # back onto the input's in-plane extent
        output = torch.nn.functional.pad(output, tuple(-p for p in pads), value=-1.0)
    return output.clamp_(-1.0, 1.0)


def _window_network(runner: GeneratorRunner, centre: int, mirrorings: tuple[tuple[int, ...], ...],
                    keep_mirrorings: bool = False) -> Callable:
    """The network SliceInferer calls: windows without body skipped, the centre channel of the mean
    over `mirrorings` kept (then, with `keep_mirrorings`, that of each mirroring)."""
    channels = 1 + len(mirrorings) if keep_mirrorings else 1

    def network(window: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        # window: (B, k, tile, tile) from SliceInferer; condition: the matching mask windows.
        out = torch.full((window.shape[0], channels, *window.shape[2:]), -1.0, dtype=torch.float32, device=window.device)
        keep = None
        if condition is not None:
            keep = (condition > 0).flatten(1).any(1)
            if not bool(keep.any()):
                return out
            if bool(keep.all()):
                keep = None
        batch = runner.put(window if keep is None else window[keep])
        result, parts = None, []
        for dims in mirrorings:
            part = _flip(runner(_flip(batch, dims))[:, centre : centre + 1].float(), dims)
            if keep_mirrorings:
                parts.append(part.clone())
            result = part if result is None else result.add_(part)
        result = torch.cat([result.div_(len(mirrorings)), *parts], dim=1).to(out.device)
        if keep is None:
            return result.contiguous()
        out[keep] = result
        return out

    return network


def _over_slices(network: Callable, runner: GeneratorRunner, volume: torch.Tensor, body: Optional[torch.Tensor],
                 tile_size: int, k: int, channels: int = 1) -> torch.Tensor:
    """SliceInferer over the axial slices of (1, X, Y, Z) `volume`, chunk by chunk (bounded memory);
    (`channels`, X, Y, Z) out."""
    _, x_size, y_size, z_size = volume.shape
    inferer = SliceInferer(
        spatial_dim=2,
        roi_size=(tile_size, tile_size),
        sw_batch_size=runner.batch_size,
        overlap=0.25,
        mode="gaussian",
        padding_mode="constant",
        cval=-1.0,
        sw_device=runner.device,
        device=torch.device("cpu"),
        progress=False,
    )
    padded = max(x_size, tile_size) * max(y_size, tile_size)
    chunk_slices = max(1, min(z_size, CHUNK_VOXELS // (padded * (k + 2))))
    output = torch.empty((channels, x_size, y_size, z_size), dtype=torch.float32)
    with torch.inference_mode():
        for z0 in range(0, z_size, chunk_slices):
            z1 = min(z_size, z0 + chunk_slices)
            grown = _grow(body[..., z0:z1]) if body is not None else None
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
    return output


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


__all__ = ["MASK_MARGIN", "TTA_MODES", "Runtime", "context_stack", "synthesize"]
