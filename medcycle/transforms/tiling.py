"""Axial 2D (2.5D) tiles: where a volume's training tiles come from, and cutting them.

:func:`plan_tiles` centres a ``data.tile_size`` window on the body's in-plane bounding box, keeps
the axial slices whose tile holds at least ``data.min_body_fraction`` of body and says how much body
the window leaves out (:meth:`TilePlan.cut_warning` is the line to tell the user);
:func:`extract_tiles` cuts the float16 image tiles and uint8 mask tiles (2.5D: the ``k`` neighbouring
slices as channels), with everything outside the body set to air (:func:`air_outside_body`), so the
networks never see a head holder, a couch or a frame. The converter places its windows the same way
(:mod:`medcycle.inferers`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, SpatialCrop

from medcycle.config import DataConfig
from medcycle.image import ArrayLike, voxels

BACKGROUND = -1.0  # normalised value of air; tiles are padded with it
SIDE_NAMES = {"L": "left", "R": "right", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass
class TilePlan:
    """Where the tiles of a volume come from (the in-plane window, the kept axial slices) and what they cut."""

    start: tuple[int, int]  # window origin (x, y) in volume voxels; may be negative (padding)
    size: int
    slices: np.ndarray  # kept axial slice indices (int64, increasing)
    body_fraction: np.ndarray  # body fraction of every axial slice's tile
    cut_fraction: float = 0.0  # share of the body's voxels outside the window (in-plane, every slice)
    dropped_fraction: float = 0.0  # share of the body's voxels on slices not kept (min_body_fraction)
    overhang_mm: dict = field(default_factory=dict)  # side name -> mm of body beyond that edge of the window
    extent_mm: tuple[float, float] = (0.0, 0.0)  # the body's in-plane extent along x and y
    spacing: tuple[float, float] = (1.0, 1.0)  # in-plane mm of the grid the plan is on

    def size_needed(self) -> int:
        """The smallest tile size (a multiple of 16) that holds the body's extent at this spacing."""
        pixels = max(e / s for e, s in zip(self.extent_mm, self.spacing))
        return int(np.ceil(pixels / 16.0 - 1e-9) * 16)

    def cut_warning(self) -> Optional[str]:
        """One line for the user when the window leaves body out, naming what would hold it; else None."""
        if self.cut_fraction <= 0.0:
            return None
        sides = ", ".join(f"{mm:.0f} mm {side}" for side, mm in self.overhang_mm.items() if mm > 0)
        extent = max(self.extent_mm)
        return (f"the {self.size} x {self.size} tile ({self.size * self.spacing[0]:.0f} x {self.size * self.spacing[1]:.0f} mm) "
                f"leaves {100.0 * self.cut_fraction:.1f} % of the body out ({sides}); data.tile_size={self.size_needed()} "
                f"or data.spacing={extent / self.size:.2f} would hold its {extent:.0f} mm")


def plan_tiles(mask: ArrayLike, cfg: DataConfig) -> TilePlan:
    """Centre a ``tile_size`` window on the body's in-plane bounding box; keep slices with enough body.

    The plan also says what the window cuts: the share of body voxels outside it, and by how many mm
    the body overhangs each edge (sides named from ``data.orientation``, in-plane spacing ``data.spacing``).
    """
    m = voxels(mask) > 0
    size = int(cfg.tile_size)
    # the grid's in-plane spacing and axis codes (a bare namespace with tile_size alone: 1 mm, RAS)
    spacing = tuple(float(s) for s in getattr(cfg, "spacing", (1.0, 1.0)))
    codes = str(getattr(cfg, "orientation", "RAS")).upper()
    nx, ny, nz = m.shape
    in_plane = m.any(axis=2)
    if not in_plane.any():
        start = (nx // 2 - size // 2, ny // 2 - size // 2)
        return TilePlan(start=start, size=size, slices=np.zeros(0, dtype=np.int64), body_fraction=np.zeros(nz),
                        spacing=spacing)
    xs, ys = np.nonzero(in_plane.any(axis=1))[0], np.nonzero(in_plane.any(axis=0))[0]
    cx, cy = (int(xs[0]) + int(xs[-1]) + 1) // 2, (int(ys[0]) + int(ys[-1]) + 1) // 2
    start = (cx - size // 2, cy - size // 2)
    in_tile = window(m.astype(np.uint8), start, size, pad_value=0).reshape(size * size, nz).sum(axis=0)
    fraction = in_tile / float(size * size)
    slices = np.nonzero(fraction >= float(cfg.min_body_fraction))[0].astype(np.int64)
    per_slice = m.reshape(nx * ny, nz).sum(axis=0)
    body = float(per_slice.sum())
    kept = np.zeros(nz, dtype=bool)
    kept[slices] = True
    overhang = {}
    for axis, (first, last, origin) in enumerate(((xs[0], xs[-1], start[0]), (ys[0], ys[-1], start[1]))):
        code = codes[axis]  # voxel indices increase towards this side
        overhang[SIDE_NAMES[OPPOSITE[code]]] = max(0, origin - int(first)) * spacing[axis]
        overhang[SIDE_NAMES[code]] = max(0, int(last) + 1 - (origin + size)) * spacing[axis]
    return TilePlan(start=start, size=size, slices=slices, body_fraction=fraction,
                    cut_fraction=float(per_slice.sum() - in_tile.sum()) / body,
                    dropped_fraction=float(per_slice[~kept].sum()) / body, overhang_mm=overhang,
                    extent_mm=((int(xs[-1]) - int(xs[0]) + 1) * spacing[0], (int(ys[-1]) - int(ys[0]) + 1) * spacing[1]),
                    spacing=spacing)


def air_outside_body(image: ArrayLike, mask: ArrayLike) -> np.ndarray:
    """(X, Y, Z) float32 copy of normalised `image` with every voxel outside the body `mask` set to air (-1)."""
    return np.where(voxels(mask) > 0, voxels(image).astype(np.float32, copy=False), np.float32(BACKGROUND))


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
    replicated), so the centre channel is the slice itself. Everything outside the body `mask` is air
    (the background value -1, which also pads), in every channel by its own slice's mask.
    """
    plan = plan or plan_tiles(mask, cfg)
    context = int(cfg.context_slices)
    mask_tiles = _tiles_of((voxels(mask) > 0).astype(np.uint8), plan, 1, 0, np.uint8)
    if isinstance(image, Mapping):
        tiles: Any = {key: _tiles_of(air_outside_body(value, mask), plan, context, BACKGROUND, np.float16)
                      for key, value in image.items()}
    else:
        tiles = _tiles_of(air_outside_body(image, mask), plan, context, BACKGROUND, np.float16)
    return tiles, mask_tiles, plan.slices.copy()


__all__ = ["BACKGROUND", "TilePlan", "air_outside_body", "extract_tiles", "plan_tiles", "window"]
