"""Axial 2D (2.5D) tiles: where a volume's training tiles come from, and cutting them.

:func:`plan_tiles` centres a ``data.tile_size`` window on the body's in-plane bounding box and keeps
the axial slices whose tile holds at least ``data.min_body_fraction`` of body;
:func:`extract_tiles` cuts the float16 image tiles and uint8 mask tiles (2.5D: the ``k`` neighbouring
slices as channels). The converter places its windows the same way (:mod:`medcycle.inferers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, SpatialCrop

from medcycle.config import DataConfig
from medcycle.image import ArrayLike, voxels

BACKGROUND = -1.0  # normalised value of air; tiles are padded with it


@dataclass
class TilePlan:
    """Where the tiles of a volume come from: the in-plane window and the kept axial slices."""

    start: tuple[int, int]  # window origin (x, y) in volume voxels; may be negative (padding)
    size: int
    slices: np.ndarray  # kept axial slice indices (int64, increasing)
    body_fraction: np.ndarray  # body fraction of every axial slice's tile


def plan_tiles(mask: ArrayLike, cfg: DataConfig) -> TilePlan:
    """Centre a ``tile_size`` window on the body's in-plane bounding box; keep slices with enough body."""
    m = voxels(mask) > 0
    size = int(cfg.tile_size)
    nx, ny, nz = m.shape
    in_plane = m.any(axis=2)
    if in_plane.any():
        xs, ys = np.nonzero(in_plane.any(axis=1))[0], np.nonzero(in_plane.any(axis=0))[0]
        cx, cy = (int(xs[0]) + int(xs[-1]) + 1) // 2, (int(ys[0]) + int(ys[-1]) + 1) // 2
    else:
        cx, cy = nx // 2, ny // 2
    start = (cx - size // 2, cy - size // 2)
    in_tile = window(m.astype(np.uint8), start, size, pad_value=0)
    fraction = in_tile.reshape(size * size, nz).sum(axis=0) / float(size * size)
    slices = np.nonzero(fraction >= float(cfg.min_body_fraction))[0].astype(np.int64)
    if not in_plane.any():
        slices = np.zeros(0, dtype=np.int64)
    return TilePlan(start=start, size=size, slices=slices, body_fraction=fraction)


def window(volume: np.ndarray, start: tuple[int, int], size: int, pad_value: float) -> np.ndarray:
    """The (size, size, Z) in-plane window at `start` of (X, Y, Z) `volume`, padded with `pad_value`.

    MONAI ``SpatialCrop`` takes the part inside the volume, ``BorderPad`` (constant) fills the rest.
    """
    nx, ny, _ = volume.shape
    x0, y0 = start
    x1, y1 = x0 + size, y0 + size
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, nx), min(y1, ny)
    tensor = torch.from_numpy(np.ascontiguousarray(volume))[None]
    if cx1 <= cx0 or cy1 <= cy0:  # the window misses the volume entirely
        return np.full((size, size, volume.shape[2]), pad_value, dtype=volume.dtype)
    cropped = SpatialCrop(roi_start=(cx0, cy0, 0), roi_end=(cx1, cy1, volume.shape[2]))(tensor)
    border = (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1, 0, 0)
    if any(border):
        cropped = BorderPad(spatial_border=border, mode="constant", value=pad_value)(cropped)
    out = cropped.as_tensor() if isinstance(cropped, MetaTensor) else cropped
    return np.asarray(out[0].numpy())


def _tiles_of(volume: np.ndarray, plan: TilePlan, context: int, pad_value: float, dtype: Any) -> np.ndarray:
    cut = window(volume, plan.start, plan.size, pad_value)  # (T, T, Z)
    nz = cut.shape[2]
    half = context // 2
    if context == 1:  # 2D: copy each kept slice straight into its tile
        tiles = np.empty((len(plan.slices), 1, plan.size, plan.size), dtype=dtype)
        for n, z in enumerate(plan.slices):
            tiles[n, 0] = cut[:, :, z]
        return tiles
    needed = np.unique(np.clip(plan.slices[:, None] + np.arange(-half, half + 1)[None], 0, nz - 1))
    # one pass: the needed slices, slice-first and cast (cache-friendly copies of whole slices after)
    planes = np.empty((len(needed), plan.size, plan.size), dtype=dtype)
    for i, z in enumerate(needed):
        planes[i] = cut[:, :, z]
    position = np.full(nz, -1, dtype=np.int64)
    position[needed] = np.arange(len(needed))
    tiles = np.empty((len(plan.slices), context, plan.size, plan.size), dtype=dtype)
    for j in range(context):  # channel j holds slice z - half + j (edges replicated); centre = z itself
        tiles[:, j] = planes[position[np.clip(plan.slices - half + j, 0, nz - 1)]]
    return tiles


def extract_tiles(image: Union[ArrayLike, Mapping[str, ArrayLike]], mask: ArrayLike, cfg: DataConfig,
                  plan: Optional[TilePlan] = None):
    """Axial tiles ``(N, k, T, T)`` float16, mask tiles ``(N, 1, T, T)`` uint8 and kept slice indices.

    `image` is a (1, X, Y, Z) or (X, Y, Z) normalised volume, or a mapping of them (e.g. ``{"mr": ..,
    "ct": ..}``) that then all use the same slices and crop (the result's first item is then a dict).
    Tile axes are (x, y) of the volume; channel j of a 2.5D tile is slice ``z - k//2 + j`` (edges
    replicated), so the centre channel is the slice itself. Padding uses the background value -1.
    """
    plan = plan or plan_tiles(mask, cfg)
    context = int(cfg.context_slices)
    mask_tiles = _tiles_of((voxels(mask) > 0).astype(np.uint8), plan, 1, 0, np.uint8)
    if isinstance(image, Mapping):
        tiles: Any = {key: _tiles_of(voxels(value).astype(np.float32, copy=False), plan, context, BACKGROUND, np.float16)
                      for key, value in image.items()}
    else:
        tiles = _tiles_of(voxels(image).astype(np.float32, copy=False), plan, context, BACKGROUND, np.float16)
    return tiles, mask_tiles, plan.slices.copy()


__all__ = ["BACKGROUND", "TilePlan", "extract_tiles", "plan_tiles", "window"]
