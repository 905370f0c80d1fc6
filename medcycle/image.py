"""The one image type: a MONAI ``MetaTensor`` ``(1, X, Y, Z)`` that carries its geometry.

:func:`medcycle.io.load_volume` reads a file once into such an image; it then travels through the
MONAI transforms (which keep and update ``affine``), the network and the way back onto the input
grid to the writer. Besides MONAI's own keys (``affine``, ``filename_or_obj``, ``original_affine``,
``spatial_shape``) its meta holds, unchanged by every transform:

* ``ORIGINAL_AFFINE_KEY`` / ``ORIGINAL_SHAPE_KEY``: the voxel-to-RAS affine and ``(X, Y, Z)`` shape of
  the file it was read from, i.e. the grid every output goes back onto;
* ``NIFTI_HEADER_KEY``: the NIfTI header of a NIfTI input, so outputs keep sform, qform and their codes.

Voxels are ``(X, Y, Z)`` in the file's voxel order; affines map voxels to RAS millimetres.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import numpy as np
import torch
from monai.data import MetaTensor

from medcycle.errors import InputError

ORIGINAL_AFFINE_KEY = "medcycle_original_affine"
ORIGINAL_SHAPE_KEY = "medcycle_original_shape"
NIFTI_HEADER_KEY = "medcycle_nifti_header"

ArrayLike = Union[np.ndarray, torch.Tensor]


def make_image(array: np.ndarray, affine: np.ndarray, source: str, header: Any = None) -> MetaTensor:
    """A float32 image ``(1, X, Y, Z)`` read from `source` (a path or a description) on `affine`."""
    values = np.ascontiguousarray(array, dtype=np.float32)[None]
    affine = np.asarray(affine, dtype=np.float64)
    meta = {
        "filename_or_obj": str(source),
        "original_affine": affine.copy(),
        ORIGINAL_AFFINE_KEY: affine.copy(),
        ORIGINAL_SHAPE_KEY: tuple(int(s) for s in array.shape),
        "spatial_shape": np.array(array.shape),
        "space": "RAS",
        "original_channel_dim": "no_channel",
    }
    if header is not None:
        meta[NIFTI_HEADER_KEY] = header
    return MetaTensor(torch.from_numpy(values), affine=torch.as_tensor(affine), meta=meta)


def voxels(image: ArrayLike) -> np.ndarray:
    """The ``(X, Y, Z)`` numpy view of a ``(1, X, Y, Z)`` or ``(X, Y, Z)`` image (no copy where possible)."""
    if isinstance(image, MetaTensor):
        image = image.as_tensor()
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {array.shape}")
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (1, X, Y, Z) or (X, Y, Z) volume, got shape {array.shape}")
    return array


def affine_of(image: MetaTensor) -> np.ndarray:
    """The current voxel-to-RAS affine of `image` (float64 numpy)."""
    return np.asarray(image.affine, dtype=np.float64)


def name_of(image: Any) -> str:
    """Where `image` was read from, for messages."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in memory>"))


def source_grid(image: MetaTensor) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(affine, shape) of the file `image` was read from: the grid its outputs are written on."""
    return np.asarray(image.meta[ORIGINAL_AFFINE_KEY], dtype=np.float64), tuple(image.meta[ORIGINAL_SHAPE_KEY])


def shape_of(image: MetaTensor) -> tuple[int, int, int]:
    """The current ``(X, Y, Z)`` shape of `image`."""
    return tuple(int(s) for s in image.shape[-3:])


def with_values(reference: MetaTensor, values: np.ndarray, source: Optional[str] = None) -> MetaTensor:
    """A MetaTensor holding `values` ``(1, X, Y, Z)`` with the geometry and history of `reference`."""
    out = MetaTensor(torch.from_numpy(np.ascontiguousarray(values)), meta=copy.copy(dict(reference.meta)),
                     applied_operations=copy.deepcopy(reference.applied_operations))
    if source is not None:
        out.meta["filename_or_obj"] = source
    return out


def check_same_grid(reference: MetaTensor, other: MetaTensor, tolerance_mm: float = 1e-3) -> None:
    """Refuse `other` when its voxel grid (shape and affine) differs from `reference`'s."""
    if shape_of(other) != shape_of(reference):
        raise InputError(f"{name_of(other)}: grid {shape_of(other)} differs from {name_of(reference)} "
                         f"{shape_of(reference)}; resample them onto one grid first")
    if not np.allclose(affine_of(other), affine_of(reference), atol=tolerance_mm):
        raise InputError(f"{name_of(other)}: affine differs from {name_of(reference)} "
                         "(same shape, different position or orientation)")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes of a voxel-to-RAS affine."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


__all__ = [
    "NIFTI_HEADER_KEY",
    "ORIGINAL_AFFINE_KEY",
    "ORIGINAL_SHAPE_KEY",
    "affine_of",
    "check_same_grid",
    "make_image",
    "name_of",
    "shape_of",
    "source_grid",
    "spacing_of",
    "voxels",
    "with_values",
]
