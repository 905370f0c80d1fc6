"""The body mask: which voxels are the patient (one owner for preprocess, convert and evaluate).

:func:`compute_body_mask` thresholds a volume (the MR with an Otsu-based threshold, a CT above
``CT_BODY_THRESHOLD_HU``), cuts off devices attached by thin parts (head holders, couch tops, frame
rings and pins), closes, fills holes and keeps the largest component; its intensity statistics are
robust, so a few extreme or non-finite voxels do not move it. :class:`BodyMaskd` puts either a given
mask (binarised) or the computed one into the data dict; :func:`binary_mask` is the one check that a
given mask has voxels inside.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
from monai.transforms import MapTransform

from medcycle.errors import InputError
from medcycle.image import affine_of, name_of, spacing_of, voxels, with_values

IMAGE_KEYS = ("mr", "ct")
MASK_KEY = "mask"
CT_BODY_THRESHOLD_HU = -500.0  # body threshold for a CT-only case (no MR to threshold)
# Intensity fences: values beyond the (0.5, 99.5) percentiles by more than once their spread are
# artefacts (a hot pixel of 1e30, a padding value of -1e6); inside the fences nothing changes.
ROBUST_PERCENTILES = (0.5, 99.5)
FENCE_SPREADS = 1.0
# Devices are thin (holder shells and couch tops 2-5 mm, frame pins 3-6 mm) or touch the body through
# thin parts: an in-plane opening with a disk of this radius cuts them off ...
DETACH_RADIUS_MM = 3.0
# ... and each piece the opening shaved off the body is given back when it touches the body and is at
# most this big (an ear: ~10 cm3; one arm of a real head holder: ~60 cm3).
DETACH_GIVE_BACK_CM3 = 30.0


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


def robust_values(volume: np.ndarray, threshold: Optional[float] = None) -> tuple[np.ndarray, float, float]:
    """`volume` as float32 with non-finite values replaced and values beyond the fences clipped, and the
    ``ROBUST_PERCENTILES`` (low, high) of its finite values.

    The fences lie ``FENCE_SPREADS`` times the spread of the percentiles beyond them, so an ordinary
    scan is returned unchanged (no copy) while a few extreme voxels (1e30, -1e6, NaN, inf) become
    ordinary ones (NaN and -inf: the low fence; +inf: the high fence). With a fixed `threshold` (a CT
    in HU) the fences are widened to lie at least as far above it as below, so that a body of under
    0.5 % of the volume is not clipped under its own threshold.
    """
    values = np.asarray(volume, dtype=np.float32)
    sample = values[::2, ::2, ::2] if values.size > 1_000_000 else values
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32), 0.0, 0.0
    p_low, p_high = (float(v) for v in np.percentile(finite, ROBUST_PERCENTILES))
    spread = p_high - p_low
    low, high = p_low - FENCE_SPREADS * spread, p_high + FENCE_SPREADS * spread
    if threshold is not None:
        low, high = min(low, 2 * threshold - high), max(high, 2 * threshold - low)
    if not (float(values.min()) >= low and float(values.max()) <= high):  # NaN compares False
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        np.clip(values, np.float32(low), np.float32(high), out=values)
    return values, p_low, p_high


def in_plane_disk(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """An in-plane (X, Y, 1) disk footprint of `radius_mm` on a grid of `spacing` mm."""
    rx, ry = (int(np.floor(radius_mm / float(s))) for s in spacing[:2])
    x, y = np.ogrid[-rx:rx + 1, -ry:ry + 1]
    return ((x * float(spacing[0])) ** 2 + (y * float(spacing[1])) ** 2 <= radius_mm ** 2)[:, :, None]


def detach_thin_parts(foreground: np.ndarray, spacing: Sequence[float], radius_mm: float = DETACH_RADIUS_MM,
                      give_back_cm3: float = DETACH_GIVE_BACK_CM3) -> np.ndarray:
    """The largest body of boolean (X, Y, Z) `foreground`, cut free of devices attached by thin parts.

    An in-plane opening with a disk of `radius_mm` cuts thin devices (and what they attach) off the
    body before its largest component, the core, is taken. The opening also shaves the body's own thin
    parts (ears, nose tip, skin folds): each piece it removed is given back when it touches the core
    and holds at most `give_back_cm3`.
    """
    from scipy import ndimage

    disk = in_plane_disk(radius_mm, spacing)
    core = _largest_component(ndimage.binary_opening(foreground, structure=disk) if disk.size > 1 else foreground)
    if not core.any():  # thinner than the disk everywhere: nothing to tell devices from
        return _largest_component(foreground)
    labels, count = ndimage.label(foreground & ~core)
    if count == 0:
        return core
    voxel_cm3 = float(np.prod([float(s) for s in spacing])) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_cm3
    touching = np.zeros(count + 1, dtype=bool)
    touching[np.unique(labels[ndimage.binary_dilation(core) & (labels > 0)])] = True
    keep = touching & (sizes <= give_back_cm3)
    keep[0] = False
    return core | keep[labels]


def compute_body_mask(volume: np.ndarray, threshold: Optional[float] = None,
                      spacing: Optional[Sequence[float]] = None, otsu_fraction: float = 0.5,
                      closing_iterations: int = 2, in_plane_factor: Optional[int] = None) -> np.ndarray:
    """Boolean body mask of an (X, Y, Z) volume with voxels of `spacing` mm (default 1 mm); the last axis is axial.

    1. intensities made robust (:func:`robust_values`: a few extreme or non-finite voxels are clipped
       to fences that ordinary values never reach); smooth and threshold: a CT at the fixed
       `threshold` (HU) after a light in-plane smoothing (sigma 0.5 voxel, which keeps a 4 mm holder
       thin), an MR after a gaussian of sigma 1 voxel at ``otsu_fraction`` of the way from its minimum
       (never below its 0.5 percentile) to Otsu's threshold (low enough to keep dark tissue such as
       fat-suppressed regions);
    2. CT: cut off devices attached by thin parts (:func:`detach_thin_parts`) before any hole is
       filled: the head is solid above the threshold, while a holder or frame ring touching it at two
       places encloses air that hole filling would make body;
    3. close a little (`closing_iterations` voxels) and fill the holes of every axial slice (which
       also fills every 3D hole), so dark bone, sinuses and air cavities inside the head belong to
       the body; keep the largest connected component: background noise is not body;
    4. refine the boundary: within one (coarse) voxel of it the unsmoothed values decide, with the
       same threshold, so the smoothing does not grow the body; holes are filled again.

    Holders, couches and frames give no MR signal; an MR-visible localiser that does not touch the
    head is not the largest component. One touching it is kept: the MR's smoothing and closing widen
    a thin strut beyond what an opening could cut without shaving the head (measured; the MR path is
    otherwise today's, so every phantom MR mask is unchanged).

    Large slices (both in-plane sizes >= 160, unless `in_plane_factor` says otherwise) go through
    steps 1-3 on a grid 2x coarser in-plane (2x2 block means, which also smooth); step 4 then works
    at full resolution: the same mask to about a voxel, twice as fast.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    values, p_low, _ = robust_values(volume, threshold)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    nx, ny, nz = values.shape
    factor = int(in_plane_factor) if in_plane_factor else (2 if min(nx, ny) >= 160 else 1)
    if factor > 1:
        px, py = (-nx) % factor, (-ny) % factor
        padded = np.pad(values, ((0, px), (0, py), (0, 0)), mode="edge") if px or py else values
        coarse = np.zeros(((nx + px) // factor, (ny + py) // factor, nz), dtype=np.float32)
        for i in range(factor):
            for j in range(factor):
                coarse += padded[i::factor, j::factor]
        coarse /= factor * factor
    else:
        coarse = values
    solid = threshold is not None
    sigma = (0.5, 0.5, 0.0) if solid else 1.0
    smoothed = ndimage.gaussian_filter(coarse, sigma=sigma, mode="nearest", truncate=2.0)
    if threshold is None:
        sample = smoothed[::2, ::2, ::2] if smoothed.size > 1_000_000 else smoothed
        low, high = max(float(sample.min()), p_low), float(sample.max())
        if high <= low:
            return np.zeros(values.shape, dtype=bool)
        threshold = low + otsu_fraction * (float(threshold_otsu(sample)) - low)
    foreground = smoothed > threshold
    del smoothed
    if not foreground.any():
        return np.zeros(values.shape, dtype=bool)
    if solid:
        foreground = detach_thin_parts(foreground, (spacing[0] * factor, spacing[1] * factor, spacing[2]))
    # closing and hole filling: a scalp ring separated from the brain by dark bone then encloses both,
    # and the largest component is the whole head rather than the brain alone
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
    refined |= up(band[cx0:cx1, cy0:cy1])[: fx1 - fx0, : fy1 - fy0] & (values[fx0:fx1, fy0:fy1] > threshold)
    mask = np.zeros(values.shape, dtype=bool)
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
        spacing = spacing_of(affine_of(image)) if hasattr(image, "affine") else None
        mask = compute_body_mask(voxels(image), threshold=threshold, spacing=spacing)
        d[self.mask_key] = with_values(image, mask[None].astype(np.float32), source=f"body mask computed from {name_of(image)}")
        d[self.mask_key].meta["mask_source"] = f"computed from {source}"
        return d


__all__ = ["BodyMaskd", "CT_BODY_THRESHOLD_HU", "IMAGE_KEYS", "MASK_KEY", "binary_mask", "compute_body_mask",
           "detach_thin_parts", "in_plane_disk", "robust_values"]
