"""Anatomy metrics of a synthetic CT: Dice and HD95 of bone and air cavities against the CT.

SynthRAD2025 scores an sCT by segmenting structures on it and on the CT (TotalSegmentator) and
comparing the segmentations with MONAI's Dice and 95th-percentile Hausdorff distance (repository
SynthRAD2025/evaluation, ``segmentation_metrics.py``). medcycle segments by threshold instead,
with no model to download, on both images alike:

* bone: ``HU >= 250`` inside the body;
* air cavities: ``HU < -400`` inside the body eroded by 3 mm (sinuses, nasal cavity, mastoid
  cells, airway), so that the partial-volume rim at the skin and the air of a dilated body mask
  are not counted as cavities.

"The body" is the reference CT's (:func:`medcycle.transforms.compute_body_mask` at the CT
threshold), within the given mask when there is one, and is the same region for both images.
Dice and HD95 (in mm, with the voxel spacing) come from ``monai.metrics.compute_dice`` and
``monai.metrics.compute_hausdorff_distance`` (``percentile=95``, symmetric). A structure absent
from both images gives NaN (nothing to compare); absent from one only, Dice 0 and HD95 ``inf``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np

BONE_HU = 250.0
AIR_HU = -400.0
CAVITY_EROSION_MM = 3.0
ANATOMY_KEYS = ("dice_bone", "hd95_bone", "dice_air", "hd95_air")

__all__ = ["ANATOMY_KEYS", "AIR_HU", "BONE_HU", "anatomy_metrics", "overlap_metrics", "structures"]


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm, got {spacing!r}")
    return values


def overlap_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(Dice, HD95 in mm) of two boolean masks of one shape (2D or 3D), with MONAI; see the module
    docstring for empty masks."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"the masks differ in shape: {p.shape} vs {r.shape}")
    sp = _spacing(spacing, p.ndim)
    if not p.any() and not r.any():
        return math.nan, math.nan
    if not p.any() or not r.any():
        return 0.0, math.inf
    pt = torch.from_numpy(p)[None, None].float()
    rt = torch.from_numpy(r)[None, None].float()
    dice = float(compute_dice(pt, rt, include_background=True)[0, 0])
    with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument it passes to itself
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = float(compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=sp)[0, 0])
    return dice, hd95


def structures(image: np.ndarray, body: np.ndarray, spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """``bone`` and ``air`` masks of an image in HU within `body` (see the module docstring)."""
    from scipy import ndimage

    hu = np.asarray(image)
    inner = ndimage.distance_transform_edt(body, sampling=_spacing(spacing, hu.ndim)) > CAVITY_EROSION_MM
    return {"bone": body & (hu >= BONE_HU), "air": inner & (hu < AIR_HU)}


def anatomy_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                    mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """``dice_bone``, ``hd95_bone``, ``dice_air``, ``hd95_air`` of the sCT `pred` against the CT `ref`
    (HU, 3D (X, Y, Z) arrays of one shape, voxel size `spacing` in mm), inside the CT's body (and
    `mask` > 0 when given)."""
    from medcycle.transforms import CT_BODY_THRESHOLD_HU, compute_body_mask

    p, r = np.asarray(pred), np.asarray(ref)
    if r.ndim != 3 or p.shape != r.shape:
        raise ValueError(f"pred and ref must be 3D arrays of one shape, got {p.shape} and {r.shape}")
    body = compute_body_mask(r, threshold=CT_BODY_THRESHOLD_HU)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != r.shape:
            raise ValueError(f"mask shape {m.shape} differs from the images' {r.shape}")
        body &= m > 0
    if not body.any():
        raise ValueError("no body in the reference CT (inside the mask): nothing to score")
    ref_structures = structures(r, body, spacing)
    pred_structures = structures(p, body, spacing)
    result = {}
    for name in ("bone", "air"):
        dice, hd95 = overlap_metrics(pred_structures[name], ref_structures[name], spacing)
        result[f"dice_{name}"], result[f"hd95_{name}"] = dice, hd95
    return result
