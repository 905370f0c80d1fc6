"""Back onto the input's grid: the one way a result on the model grid returns to the file's voxels.

World-coordinate resampling with MONAI ``SpatialResample`` onto the affine and shape of the file the
image was read from (:func:`medcycle.image.source_grid`): it undoes ``Orientationd`` and ``Spacingd``
exactly, whatever the input's orientation, obliquity or spacing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from medcycle.image import ArrayLike, source_grid

# Output voxels resampled per SpatialResample call (its sampling grid is 3 floats per voxel).
RESAMPLE_CHUNK_VOXELS = 4_000_000


def _resample(values: torch.Tensor, values_affine: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
              mode: str) -> np.ndarray:
    source = MetaTensor(values[None].to(torch.float32), affine=torch.as_tensor(values_affine))
    resample = SpatialResample(mode=mode, padding_mode="border", align_corners=False, dtype=torch.float32)
    out = resample(source, dst_affine=torch.as_tensor(affine), spatial_size=shape)
    return torch.as_tensor(out)[0].detach().cpu().numpy()


def to_input_grid(values: ArrayLike, values_affine: np.ndarray, like: MetaTensor, mode: str = "bilinear",
                  post: Optional[Callable[[np.ndarray], np.ndarray]] = None, dtype: Any = np.float32) -> np.ndarray:
    """Resample `values` ``(X', Y', Z')`` on `values_affine` onto the ``(X, Y, Z)`` grid of `like`'s file.

    In chunks of the input's last axis, to bound memory; `post` maps each float32 chunk (e.g.
    rounding to int16, thresholding a mask) into the `dtype` result. ``padding_mode='border'``.
    """
    affine, (x_size, y_size, z_size) = source_grid(like)
    values_affine = np.asarray(values_affine, dtype=np.float64)
    values = values.as_tensor() if isinstance(values, MetaTensor) else torch.as_tensor(values)
    values = values.reshape(values.shape[-3:])
    result = np.empty((x_size, y_size, z_size), dtype=dtype)
    if tuple(values.shape) == (x_size, y_size, z_size) and np.allclose(values_affine, affine, atol=1e-6):
        chunk = values.to(torch.float32).numpy()
        result[...] = post(chunk) if post else chunk
        return result
    step = max(1, RESAMPLE_CHUNK_VOXELS // (x_size * y_size))
    for z0 in range(0, z_size, step):
        z1 = min(z_size, z0 + step)
        shift = np.eye(4)
        shift[2, 3] = z0
        chunk = _resample(values, values_affine, affine @ shift, (x_size, y_size, z1 - z0), mode)
        result[..., z0:z1] = post(chunk) if post else chunk
    return result


__all__ = ["to_input_grid"]
