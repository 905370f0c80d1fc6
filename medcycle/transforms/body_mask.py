"""The body mask: which voxels are the patient (one owner for preprocess, convert and evaluate).

:func:`compute_body_mask` thresholds a volume (the MR with an Otsu-based threshold, a CT above
``CT_BODY_THRESHOLD_HU``), closes it, fills holes and keeps the largest component;
:class:`BodyMaskd` puts either a given mask (binarised) or the computed one into the data dict;
:func:`binary_mask` is the one check that a given mask has voxels inside.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
from monai.transforms import MapTransform

from medcycle.errors import InputError
from medcycle.image import name_of, voxels, with_values

IMAGE_KEYS = ("mr", "ct")
MASK_KEY = "mask"
CT_BODY_THRESHOLD_HU = -500.0  # body threshold for a CT-only case (no MR to threshold)


def binary_mask(mask: Any, name: Optional[str] = None) -> np.ndarray:
    """A given mask as booleans (> 0); refuses a mask with no voxel inside, naming its file."""
    binary = voxels(mask) > 0
    if not binary.any():
        raise InputError(f"{name or name_of(mask)}: the mask is empty (no voxel > 0)")
    return binary


def _fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial (last-axis) slice of a boolean (X, Y, Z) mask.

    One 2D-connectivity labelling of the background: background regions that do not reach the
    in-plane border of their slice are holes. A hole enclosed in 3D is a hole of each of its axial
    slices too, so this also fills every 3D hole.
    """
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(~mask, structure=structure)
    if count == 0:
        return mask
    outside = np.zeros(count + 1, dtype=bool)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[np.unique(face)] = True
    outside[0] = False
    return ~outside[labels]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _binary_closing(mask: np.ndarray, iterations: int) -> np.ndarray:
    from scipy import ndimage

    if iterations <= 0:
        return mask
    # padded, so that the erosion half of the closing does not eat a body touching the borders
    padded = np.pad(mask, iterations, mode="constant")
    structure = ndimage.generate_binary_structure(3, 1)
    padded = ndimage.binary_closing(padded, structure=structure, iterations=iterations)
    return padded[iterations:-iterations, iterations:-iterations, iterations:-iterations]


def compute_body_mask(volume: np.ndarray, threshold: Optional[float] = None, otsu_fraction: float = 0.5,
                      closing_iterations: int = 2, in_plane_factor: Optional[int] = None) -> np.ndarray:
    """Boolean body mask of an (X, Y, Z) volume; the last axis is axial.

    1. smooth (gaussian, sigma 1 voxel) and threshold at `threshold`, or when None at
       ``otsu_fraction`` of the way from the minimum to Otsu's threshold (low enough to keep dark
       tissue such as fat-suppressed regions);
    2. close a little (`closing_iterations` voxels) and fill the holes of every axial slice (which
       also fills every 3D hole), so dark bone, sinuses and air cavities inside the head belong to
       the body; a scalp ring separated from the brain by dark bone thus encloses both;
    3. keep the largest connected component: background noise and the table are not body;
    4. refine the boundary: within one (coarse) voxel of it the unsmoothed values decide, with the
       same threshold, so the smoothing does not grow the body; holes are filled again.

    Large slices (both in-plane sizes >= 160, unless `in_plane_factor` says otherwise) go through
    steps 1-3 on a grid 2x coarser in-plane (2x2 block means, which also smooth); step 4 then works
    at full resolution: the same mask to about a voxel, twice as fast.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    volume = np.asarray(volume, dtype=np.float32)
    nx, ny, nz = volume.shape
    factor = int(in_plane_factor) if in_plane_factor else (2 if min(nx, ny) >= 160 else 1)
    if factor > 1:
        px, py = (-nx) % factor, (-ny) % factor
        padded = np.pad(volume, ((0, px), (0, py), (0, 0)), mode="edge") if px or py else volume
        coarse = np.zeros(((nx + px) // factor, (ny + py) // factor, nz), dtype=np.float32)
        for i in range(factor):
            for j in range(factor):
                coarse += padded[i::factor, j::factor]
        coarse /= factor * factor
    else:
        coarse = volume
    smoothed = ndimage.gaussian_filter(coarse, sigma=1.0, mode="nearest", truncate=2.0)
    if threshold is None:
        sample = smoothed[::2, ::2, ::2] if smoothed.size > 1_000_000 else smoothed
        low, high = float(sample.min()), float(sample.max())
        if high <= low:
            return np.zeros(volume.shape, dtype=bool)
        threshold = low + otsu_fraction * (float(threshold_otsu(sample)) - low)
    foreground = smoothed > threshold
    del smoothed
    if not foreground.any():
        return np.zeros(volume.shape, dtype=bool)
    # closing and hole filling first: a scalp ring separated from the brain by dark bone then
    # encloses both, and the largest component is the whole head rather than the brain alone
    foreground = _binary_closing(foreground, closing_iterations)
    foreground = _fill_holes_axial(foreground)
    foreground = _largest_component(foreground)

    def up(mask: np.ndarray) -> np.ndarray:
        if factor == 1:
            return mask
        return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)

    # the boundary (one voxel of the coarse grid either side) is decided by the unsmoothed values,
    # so smoothing neither grows nor shrinks the body

    structure = ndimage.generate_binary_structure(3, 1)
    outer = ndimage.binary_dilation(foreground, structure=structure)
    inner = ndimage.binary_erosion(foreground, structure=structure, border_value=1)
    band = outer & ~inner
    # work in the in-plane bounding box of the dilated body: outside it nothing is body
    xs, ys = np.nonzero(outer.any(axis=(1, 2)))[0], np.nonzero(outer.any(axis=(0, 2)))[0]
    cx0, cx1, cy0, cy1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    fx0, fx1, fy0, fy1 = cx0 * factor, min(nx, cx1 * factor), cy0 * factor, min(ny, cy1 * factor)
    refined = up(inner[cx0:cx1, cy0:cy1])[: fx1 - fx0, : fy1 - fy0]
    refined |= up(band[cx0:cx1, cy0:cy1])[: fx1 - fx0, : fy1 - fy0] & (volume[fx0:fx1, fy0:fy1] > threshold)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[fx0:fx1, fy0:fy1] = _fill_holes_axial(refined)
    return mask


class BodyMaskd(MapTransform):
    """Put a float32 0/1 body mask under `mask_key`: the given mask binarised (> 0), else computed.

    The mask is computed (:func:`compute_body_mask`) from the first present key of `source_keys`:
    the MR with an Otsu-based threshold, or for a CT-only case the CT above ``ct_threshold`` HU.
    A given mask with no voxel inside is refused, naming the mask file.
    """

    def __init__(self, source_keys: Sequence[str] = IMAGE_KEYS, mask_key: str = MASK_KEY,
                 ct_threshold: float = CT_BODY_THRESHOLD_HU) -> None:
        super().__init__(list(source_keys), allow_missing_keys=True)
        self.source_keys = tuple(source_keys)
        self.mask_key = mask_key
        self.ct_threshold = ct_threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.mask_key in d and d[self.mask_key] is not None:
            given = d[self.mask_key]
            d[self.mask_key] = with_values(given, binary_mask(given).astype(np.float32)[None])
            d[self.mask_key].meta["mask_source"] = "given"
            return d
        source = next((k for k in self.source_keys if k in d), None)
        if source is None:
            raise KeyError(f"BodyMaskd needs one of {self.source_keys} or '{self.mask_key}'")
        image = d[source]
        threshold = self.ct_threshold if source == "ct" else None
        mask = compute_body_mask(voxels(image), threshold=threshold)
        d[self.mask_key] = with_values(image, mask[None].astype(np.float32), source=f"body mask computed from {name_of(image)}")
        d[self.mask_key].meta["mask_source"] = f"computed from {source}"
        return d


__all__ = ["BodyMaskd", "CT_BODY_THRESHOLD_HU", "IMAGE_KEYS", "MASK_KEY", "binary_mask", "compute_body_mask"]
