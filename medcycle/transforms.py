"""MONAI dictionary transforms shared by ``medcycle preprocess`` and ``medcycle convert``.

:func:`volume_transforms` is the one volume-level chain both jobs run, so a model sees at conversion
exactly the preprocessing it was trained with::

    LoadVolumed -> CheckSameGridd -> Orientationd -> Spacingd -> BodyMaskd -> NormalizeMRd
    -> CTWindowd (a ScaleIntensityRanged with data.ct_window -> [-1, 1], clipped)
    -> CTCurved (only with data.ct_knots: a piecewise-linear contrast curve on [-1, 1])

Keys are any of ``mr``, ``ct`` and ``mask`` (at least one image). After the chain every present
key holds a float32 :class:`monai.data.MetaTensor` ``(1, X', Y', Z')`` on the model grid (RAS-like
orientation ``data.orientation``, in-plane spacing ``data.spacing``, the slice spacing kept), and
``mask`` always exists (the given mask binarised, or computed from the MR, or from the CT for a
CT-only case).

Mapping a result back onto the input's grid (what the converter does): resample in world
coordinates onto the input's affine and shape, i.e. MONAI ``ResampleToMatch`` / ``SpatialResample``
with ``dst_affine`` = the input affine (``meta["original_affine"]`` of the output) and
``spatial_size`` = the input shape (``meta["spatial_shape"]`` before the chain, kept in
``meta[ORIGINAL_SHAPE_KEY]``). :func:`to_original_grid` does that. ``Compose.inverse`` works too:
:func:`invert_to_original` puts the result under the ``mr`` key with the MR's applied operations
and inverts Spacingd and Orientationd.

:func:`extract_tiles` cuts the axial 2D (2.5D when ``data.context_slices > 1``) training tiles.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    Compose,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    SpatialCrop,
    Spacingd,
)

from medcycle.config import DataConfig
from medcycle.errors import InputError, MedcycleError
from medcycle.io import dicom_series_files, load_volume

IMAGE_KEYS = ("mr", "ct")
MASK_KEY = "mask"
ORIGINAL_SHAPE_KEY = "medcycle_original_shape"  # meta key: (X, Y, Z) of the file, before the chain
ORIGINAL_AFFINE_KEY = "medcycle_original_affine"  # meta key: the file's RAS affine, before the chain
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # affines here are always voxel-to-RAS
BACKGROUND = -1.0  # normalised value of air; tiles are padded with it
CT_BODY_THRESHOLD_HU = -500.0  # body threshold for a CT-only case (no MR to threshold)

ArrayLike = Union[np.ndarray, torch.Tensor]


def _filename(value: Any) -> str:
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in memory>"))


def _numpy(value: ArrayLike) -> np.ndarray:
    """The values of a tensor / MetaTensor / array as numpy (no copy where possible)."""
    if isinstance(value, MetaTensor):
        value = value.as_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _spatial(value: ArrayLike) -> np.ndarray:
    """(X, Y, Z) numpy view of a (1, X, Y, Z) or (X, Y, Z) volume."""
    array = _numpy(value)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {array.shape}")
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (1, X, Y, Z) or (X, Y, Z) volume, got shape {array.shape}")
    return array


def _like(reference: MetaTensor, values: np.ndarray, filename: Optional[str] = None) -> MetaTensor:
    """A MetaTensor holding `values` (1, X, Y, Z) with the geometry and history of `reference`."""
    out = MetaTensor(torch.from_numpy(np.ascontiguousarray(values)), meta=copy.deepcopy(dict(reference.meta)),
                     applied_operations=copy.deepcopy(reference.applied_operations))
    if filename is not None:
        out.meta["filename_or_obj"] = filename
    return out


# --------------------------------------------------------------------------------------------------
# loading and checks


class LoadVolumed(MapTransform):
    """Load each key's path with :func:`medcycle.io.load_volume` into a float32 MetaTensor (1, X, Y, Z).

    The MetaTensor carries the RAS affine, ``filename_or_obj``, ``original_affine`` and the file's
    shape. Masks (``mask_keys``) may be all one value; images are refused when constant. Values that
    already are MetaTensors pass through unchanged.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False,
                 mask_keys: Sequence[str] = (MASK_KEY,)) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = tuple(mask_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                continue
            if Path(d[key]).is_dir():  # one DICOM series, refused otherwise (before MONAI's reader fallbacks)
                dicom_series_files(Path(d[key]))
            volume = load_volume(d[key], allow_constant=key in self.mask_keys)
            array = np.ascontiguousarray(volume.array, dtype=np.float32)[None]
            affine = torch.as_tensor(volume.affine, dtype=torch.float64)
            meta = {
                "filename_or_obj": str(volume.path),
                "original_affine": volume.affine.copy(),
                ORIGINAL_AFFINE_KEY: volume.affine.copy(),
                ORIGINAL_SHAPE_KEY: tuple(int(s) for s in volume.shape),
                "spatial_shape": np.array(volume.shape),
                "space": "RAS",
                "original_channel_dim": "no_channel",
            }
            d[key] = MetaTensor(torch.from_numpy(array), affine=affine, meta=meta)
        return d


class CheckSameGridd(MapTransform):
    """Refuse keys whose voxel grid (shape, affine) differs from `reference_key`'s, before any resampling.

    The refusal is an :class:`~medcycle.errors.InputError` naming the offending file (e.g. the CT).
    """

    def __init__(self, keys: KeysCollection, reference_key: Optional[str] = None, tolerance_mm: float = 1e-3,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.tolerance_mm = tolerance_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = [k for k in self.key_iterator(d)]
        reference = self.reference_key if self.reference_key in d else (present[0] if present else None)
        if reference is None:
            return d
        ref = d[reference]
        ref_shape, ref_affine = tuple(ref.shape[1:]), np.asarray(ref.affine, dtype=np.float64)
        for key in present:
            if key == reference:
                continue
            other = d[key]
            shape = tuple(other.shape[1:])
            if shape != ref_shape:
                raise InputError(f"{_filename(other)}: grid {shape} differs from {_filename(ref)} {ref_shape}; "
                                 "resample them onto one grid first")
            if not np.allclose(np.asarray(other.affine, dtype=np.float64), ref_affine, atol=self.tolerance_mm):
                raise InputError(f"{_filename(other)}: affine differs from {_filename(ref)} "
                                 "(same shape, different position or orientation)")
        return d


# --------------------------------------------------------------------------------------------------
# body mask


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
            binary = (_numpy(given) > 0).astype(np.float32)
            if not binary.any():
                raise InputError(f"{_filename(given)}: the mask is empty (no voxel > 0)")
            d[self.mask_key] = _like(given, binary)
            d[self.mask_key].meta["mask_source"] = "given"
            return d
        source = next((k for k in self.source_keys if k in d), None)
        if source is None:
            raise KeyError(f"BodyMaskd needs one of {self.source_keys} or '{self.mask_key}'")
        image = d[source]
        threshold = self.ct_threshold if source == "ct" else None
        mask = compute_body_mask(_spatial(image), threshold=threshold)
        d[self.mask_key] = _like(image, mask[None].astype(np.float32), filename=f"body mask computed from {_filename(image)}")
        d[self.mask_key].meta["mask_source"] = f"computed from {source}"
        return d


# --------------------------------------------------------------------------------------------------
# intensities


def percentile_range(values: np.ndarray, mask: Optional[np.ndarray], percentiles: Sequence[float]) -> tuple[float, float]:
    """(low, high) percentiles of `values` inside `mask` (everywhere when the mask is empty or flat there)."""
    inside = values[mask] if mask is not None and mask.any() else values.ravel()
    low, high = (float(v) for v in np.percentile(inside, list(percentiles)))
    if high <= low:
        low, high = (float(v) for v in np.percentile(values, list(percentiles)))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return low, high


def _affine_map(values: np.ndarray, a_min: float, a_max: float, b_min: float, b_max: float, clip: bool) -> np.ndarray:
    """``(values - a_min) / (a_max - a_min) * (b_max - b_min) + b_min`` (clipped), float32, in place.

    The operations run in MONAI's order, so that ``a_min`` and ``a_max`` map exactly onto ``b_min``
    and ``b_max``.
    """
    out = np.subtract(values, np.float32(a_min), dtype=np.float32)
    out /= np.float32(a_max - a_min)
    out *= np.float32(b_max - b_min)
    out += np.float32(b_min)
    if clip:
        np.clip(out, b_min, b_max, out=out)
    return out


class NormalizeMRd(MapTransform):
    """Map the MR linearly from its (low, high) percentiles inside the body mask to [-1, 1], clipped.

    ``mr_low`` and ``mr_high`` (input units) are stored in the MR's meta so the mapping is recorded.
    """

    def __init__(self, keys: KeysCollection = ("mr",), mask_key: str = MASK_KEY,
                 percentiles: Sequence[float] = (0.5, 99.5), b_min: float = -1.0, b_max: float = 1.0,
                 clip: bool = True, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.percentiles = tuple(float(p) for p in percentiles)
        self.b_min, self.b_max, self.clip = float(b_min), float(b_max), clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = _spatial(d[self.mask_key]) > 0 if self.mask_key in d else None
        for key in self.key_iterator(d):
            image = d[key]
            values = _spatial(image)
            low, high = percentile_range(values, mask, self.percentiles)
            out = _affine_map(values, low, high, self.b_min, self.b_max, self.clip)
            result = _like(image, out[None]) if isinstance(image, MetaTensor) else torch.from_numpy(out[None])
            if isinstance(result, MetaTensor):
                result.meta["mr_low"], result.meta["mr_high"] = low, high
            d[key] = result
        return d


class CTWindowd(ScaleIntensityRanged):
    """MONAI ``ScaleIntensityRanged`` for the CT window, evaluated in place with numpy.

    Same parameters and result as its parent (``(x - a_min) / (a_max - a_min) * (b_max - b_min) +
    b_min``, clipped, float32; exact -1 and 1 at the window's ends) without the temporaries of the
    tensor version, which took a tenth of a second per 256 x 256 x 160 volume on one CPU thread.
    Keys holding anything other than a MetaTensor/tensor/array go to the parent.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        scaler = self.scaler
        if scaler.a_min is None or scaler.a_max is None or scaler.a_max == scaler.a_min or scaler.b_min is None \
                or scaler.b_max is None:
            return super().__call__(data)
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = _numpy(image)
            out = _affine_map(values, scaler.a_min, scaler.a_max, scaler.b_min, scaler.b_max, scaler.clip)
            if isinstance(image, MetaTensor):
                d[key] = _like(image, out)
            else:
                d[key] = torch.from_numpy(out) if isinstance(image, torch.Tensor) else out
        return d


def _piecewise_(values: torch.Tensor, xs: Sequence[float], ys: Sequence[float]) -> torch.Tensor:
    """Map `values` (inside [xs[0], xs[-1]]) through the rising piecewise-linear curve xs -> ys, in place."""
    original = values.clone()
    values.fill_(ys[0])
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        values.add_((original - x0).clamp_(0.0, x1 - x0), alpha=(y1 - y0) / (x1 - x0))
    return values


class CTCurve:
    """The contrast curve of ``data.ct_knots`` on the windowed CT, [-1, 1] -> [-1, 1].

    :class:`CTWindowd` maps the HU window linearly onto [-1, 1]; the curve then moves each knot's HU
    onto its value, linearly in between (e.g. (-200, -0.85) and (200, -0.3) give the soft-tissue
    range 2.8x the share of [-1, 1] it has linearly). Without knots it is the identity. Calls and
    :meth:`inverse` work in place on float tensors (numpy arrays through ``torch.from_numpy``).
    """

    def __init__(self, ct_window: Sequence[float], knots: Sequence[Sequence[float]] = ()) -> None:
        lo, hi = (float(v) for v in ct_window)
        self.linear = [-1.0, *(2 * (float(h) - lo) / (hi - lo) - 1 for h, _ in knots), 1.0]
        self.curved = [-1.0, *(float(v) for _, v in knots), 1.0]

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "CTCurve":
        return cls(cfg.ct_window, cfg.ct_knots)

    @property
    def is_identity(self) -> bool:
        return len(self.linear) == 2

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.is_identity else _piecewise_(values.clamp_(-1.0, 1.0), self.linear, self.curved)

    def inverse(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.is_identity else _piecewise_(values.clamp_(-1.0, 1.0), self.curved, self.linear)


class CTCurved(MapTransform):
    """:class:`CTCurve` on the windowed CT (after :class:`CTWindowd`), in place."""

    def __init__(self, keys: KeysCollection, curve: CTCurve, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.curve = curve

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            self.curve(image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))
        return d


def norm_to_hu(values: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """HU of the networks' CT values: the inverse of :class:`CTWindowd` and :class:`CTCurved`, in place."""
    lo, hi = (float(v) for v in cfg.ct_window)
    CTCurve.from_config(cfg).inverse(values.clamp_(-1.0, 1.0))
    return values.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5 * (hi - lo)).add_(lo)


# --------------------------------------------------------------------------------------------------
# the shared chain


class VolumeCompose(Compose):
    """A MONAI ``Compose`` that lets medcycle's user errors through unwrapped.

    MONAI wraps any exception of a transform in ``RuntimeError("applying transform ...")``; an
    :class:`~medcycle.errors.MedcycleError` (e.g. an unreadable file, a CT on another grid) is
    re-raised as itself so callers and the CLI report its one line naming the file.
    """

    def __call__(self, input_, *args: Any, **kwargs: Any):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            cause: Optional[BaseException] = exc
            while cause is not None:
                if isinstance(cause, MedcycleError):
                    raise cause from None
                cause = cause.__cause__
            raise


def volume_transforms(cfg: DataConfig, keys: Sequence[str]) -> Compose:
    """The volume-level chain of preprocess and convert for `keys` (a subset of mr, ct, mask).

    Input: a dict of paths (or MetaTensors). Output: float32 MetaTensors (1, X', Y', Z') on the model
    grid for every key plus ``mask`` (always): MR in [-1, 1] (``meta['mr_low'/'mr_high']``), CT in
    [-1, 1] through ``data.ct_window`` and ``data.ct_knots`` (:func:`norm_to_hu` inverts), mask 0/1.
    Raises :class:`InputError` naming the file for unreadable inputs and for a CT or mask whose grid
    differs from the MR's.
    """
    keys = [str(k) for k in keys]
    unknown = sorted(set(keys) - {*IMAGE_KEYS, MASK_KEY})
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected a subset of mr, ct, mask")
    images = [k for k in IMAGE_KEYS if k in keys]
    if not images:
        raise ValueError("volume_transforms needs 'mr' or 'ct' among its keys")
    spatial_keys = images + ([MASK_KEY] if MASK_KEY in keys else [])
    modes = ["nearest" if k == MASK_KEY else "bilinear" for k in spatial_keys]
    sx, sy = (float(s) for s in cfg.spacing)
    chain: list = [
        LoadVolumed(spatial_keys),
        CheckSameGridd(spatial_keys, reference_key=images[0]),
        Orientationd(spatial_keys, axcodes=cfg.orientation, labels=RAS_LABELS, allow_missing_keys=True),
        Spacingd(spatial_keys, pixdim=(sx, sy, -1.0), mode=modes, padding_mode="border", dtype=np.float32,
                 allow_missing_keys=True),
        BodyMaskd(source_keys=images, mask_key=MASK_KEY),
    ]
    if "mr" in images:
        chain.append(NormalizeMRd("mr", mask_key=MASK_KEY, percentiles=cfg.mr_percentiles))
    if "ct" in images:
        lo, hi = (float(v) for v in cfg.ct_window)
        chain.append(CTWindowd("ct", a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True, dtype=np.float32))
        if cfg.ct_knots:
            chain.append(CTCurved("ct", CTCurve.from_config(cfg)))
    return VolumeCompose(chain, log_stats=False)


def to_original_grid(values: ArrayLike, values_affine: Any, original_affine: Any, original_shape: Sequence[int],
                     mode: str = "bilinear") -> MetaTensor:
    """Resample (1, X', Y', Z') `values` on `values_affine` onto the original grid (MONAI SpatialResample).

    World-coordinate resampling: it undoes Orientationd and Spacingd exactly (same affine and shape
    as the input file). ``padding_mode='border'``, float32.
    """
    from monai.transforms import SpatialResample

    tensor = values.as_tensor() if isinstance(values, MetaTensor) else torch.as_tensor(values)
    if tensor.ndim == 3:
        tensor = tensor[None]
    source = MetaTensor(tensor.to(torch.float32), affine=torch.as_tensor(np.asarray(values_affine, dtype=np.float64)))
    resample = SpatialResample(mode=mode, padding_mode="border", align_corners=False, dtype=torch.float32)
    out = resample(source, dst_affine=torch.as_tensor(np.asarray(original_affine, dtype=np.float64)),
                   spatial_size=tuple(int(s) for s in original_shape))
    return out


def invert_to_original(transforms: Compose, values: ArrayLike, reference: MetaTensor, key: str = "mr") -> MetaTensor:
    """``Compose.inverse`` of `transforms` applied to `values` as if it were `reference` (under `key`).

    `values` (1, X', Y', Z') lies on the model grid of `reference` (the transformed MR); the result is
    on the input file's grid (Spacingd and Orientationd undone; intensity steps are not inverted).
    """
    tensor = values.as_tensor() if isinstance(values, MetaTensor) else torch.as_tensor(values)
    if tensor.ndim == 3:
        tensor = tensor[None]
    carrier = MetaTensor(tensor.to(torch.float32), meta=copy.deepcopy(dict(reference.meta)),
                         applied_operations=copy.deepcopy(reference.applied_operations))
    return transforms.inverse({key: carrier})[key]


# --------------------------------------------------------------------------------------------------
# tiles


@dataclass
class TilePlan:
    """Where the tiles of a volume come from: the in-plane window and the kept axial slices."""

    start: tuple[int, int]  # window origin (x, y) in volume voxels; may be negative (padding)
    size: int
    slices: np.ndarray  # kept axial slice indices (int64, increasing)
    body_fraction: np.ndarray  # body fraction of every axial slice's tile


def plan_tiles(mask: ArrayLike, cfg: DataConfig) -> TilePlan:
    """Centre a ``tile_size`` window on the body's in-plane bounding box; keep slices with enough body."""
    m = _spatial(mask) > 0
    size = int(cfg.tile_size)
    nx, ny, nz = m.shape
    in_plane = m.any(axis=2)
    if in_plane.any():
        xs, ys = np.nonzero(in_plane.any(axis=1))[0], np.nonzero(in_plane.any(axis=0))[0]
        cx, cy = (int(xs[0]) + int(xs[-1]) + 1) // 2, (int(ys[0]) + int(ys[-1]) + 1) // 2
    else:
        cx, cy = nx // 2, ny // 2
    start = (cx - size // 2, cy - size // 2)
    window = _window(m.astype(np.uint8), start, size, pad_value=0)
    fraction = window.reshape(size * size, nz).sum(axis=0) / float(size * size)
    slices = np.nonzero(fraction >= float(cfg.min_body_fraction))[0].astype(np.int64)
    if not in_plane.any():
        slices = np.zeros(0, dtype=np.int64)
    return TilePlan(start=start, size=size, slices=slices, body_fraction=fraction)


def _window(volume: np.ndarray, start: tuple[int, int], size: int, pad_value: float) -> np.ndarray:
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
    window = _window(volume, plan.start, plan.size, pad_value)  # (T, T, Z)
    nz = window.shape[2]
    half = context // 2
    if context == 1:  # 2D: copy each kept slice straight into its tile
        tiles = np.empty((len(plan.slices), 1, plan.size, plan.size), dtype=dtype)
        for n, z in enumerate(plan.slices):
            tiles[n, 0] = window[:, :, z]
        return tiles
    needed = np.unique(np.clip(plan.slices[:, None] + np.arange(-half, half + 1)[None], 0, nz - 1))
    # one pass: the needed slices, slice-first and cast (cache-friendly copies of whole slices after)
    planes = np.empty((len(needed), plan.size, plan.size), dtype=dtype)
    for i, z in enumerate(needed):
        planes[i] = window[:, :, z]
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
    mask_tiles = _tiles_of((_spatial(mask) > 0).astype(np.uint8), plan, 1, 0, np.uint8)
    if isinstance(image, Mapping):
        tiles: Any = {key: _tiles_of(_spatial(value).astype(np.float32, copy=False), plan, context, BACKGROUND, np.float16)
                      for key, value in image.items()}
    else:
        tiles = _tiles_of(_spatial(image).astype(np.float32, copy=False), plan, context, BACKGROUND, np.float16)
    return tiles, mask_tiles, plan.slices.copy()


__all__ = [
    "BodyMaskd",
    "CTWindowd",
    "CheckSameGridd",
    "LoadVolumed",
    "NormalizeMRd",
    "TilePlan",
    "compute_body_mask",
    "extract_tiles",
    "invert_to_original",
    "percentile_range",
    "plan_tiles",
    "to_original_grid",
    "volume_transforms",
]
