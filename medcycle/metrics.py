"""SynthRAD2023 image metrics in HU inside a body mask, as the challenge's official evaluation computes them.

Reference: repository SynthRAD2023/metrics, ``functions/image_metrics.py`` (class ``ImageMetrics``;
see also ``../shared/reference/synthrad2023-metrics.md``). With ``(lo, hi) = window`` (default
``(-1024, 3000)``, data range ``hi - lo`` = 4024; SynthRAD2025 uses ``(-1024, 3071)``, 4095):

* mask: binarised, ``mask > 0``;
* MAE: mean of ``|pred - ref|`` over the mask voxels, values NOT clipped;
* PSNR: both clipped to the window, then scikit-image ``peak_signal_noise_ratio`` on the mask voxels
  only with ``data_range = hi - lo`` (``10 log10(range^2 / MSE)``; identical volumes give ``inf``);
* SSIM: both clipped to the window, voxels outside the mask set to ``lo``, both shifted by ``-lo``,
  scikit-image ``structural_similarity`` (7-voxel uniform window, sample covariance, K1 0.01,
  K2 0.03, ``data_range = hi - lo``) and the mean of its SSIM map over the mask voxels that are not
  in the 3-voxel strip along every border of the array (the official code's
  ``crop(ssim_map, 3)[crop(mask, 3)]``). A mask lying wholly in that strip gives NaN.

Like the official code (which casts the images to float32 with SimpleITK), images are taken as
float32; the MAE and the PSNR's MSE are summed in float64.

The SSIM map at a voxel depends only on the 7-voxel window around it, and outside the mask both
images are the same constant, so the map is computed on the bounding box of the scored voxels
grown by 3 voxels (always inside the array): the same numbers as on the whole array, faster
for a head in a large field of view.

Besides the official three, :func:`image_metrics` reports the MAE in three tissue classes of the
reference inside the mask: bone (``ref >= 250`` HU), air (``ref < -400`` HU, e.g. sinuses and
airways) and soft tissue (the rest); a class without voxels gives NaN.

Arrays are numpy, 2D (e.g. the trainer's validation tiles, at least 7x7) or 3D, all of one shape.

:func:`ms_ssim` is SynthRAD2025's masked multi-scale SSIM (repository SynthRAD2025/evaluation,
``image_metrics.py``, ``ImageMetrics.ms_ssim``), 3D only; see its docstring.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

SYNTHRAD2023_WINDOW = (-1024.0, 3000.0)
SYNTHRAD2025_WINDOW = (-1024.0, 3071.0)
WINDOWS = {"synthrad2023": SYNTHRAD2023_WINDOW, "synthrad2025": SYNTHRAD2025_WINDOW}
BONE_HU = 250.0  # reference >= this (inside the mask): bone
AIR_HU = -400.0  # reference < this (inside the mask): air
SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
METRIC_KEYS = ("mae", "psnr", "ssim", "mae_bone", "mae_air", "mae_soft")
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, one per scale
MS_SSIM_MIN_SIZE = 97  # SynthRAD2025 pads every axis to this (edge values) before the 5 scales

__all__ = [
    "AIR_HU",
    "BONE_HU",
    "METRIC_KEYS",
    "SYNTHRAD2023_WINDOW",
    "SYNTHRAD2025_WINDOW",
    "WINDOWS",
    "check_window",
    "image_metrics",
    "mae",
    "ms_ssim",
    "psnr",
    "region_mae",
    "ssim",
]


# --------------------------------------------------------------------------------------------------
# validation


def check_window(window: tuple[float, float] | str) -> tuple[float, float]:
    """`window` as two floats ``(lo, hi)``: a pair of numbers, or the name of a challenge's window
    (:data:`WINDOWS`: ``synthrad2023``, ``synthrad2025``); ValueError unless finite with ``hi > lo``."""
    if isinstance(window, str):
        try:
            return WINDOWS[window.lower()]
        except KeyError:
            raise ValueError(f"window must be two numbers (lo, hi) or one of {', '.join(WINDOWS)}, "
                             f"got {window!r}") from None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be two numbers (lo, hi) or one of {', '.join(WINDOWS)}, got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"window must be finite with hi > lo, got {window!r}")
    return lo, hi


def _as_image(value: object, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _prepare(pred: object, ref: object, mask: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred, ref) as float32 and the boolean mask (all voxels when None); refuse mismatches."""
    pred_a = _as_image(pred, "pred")
    ref_a = _as_image(ref, "ref")
    if pred_a.shape != ref_a.shape:
        raise ValueError(f"pred and ref differ in shape: {pred_a.shape} vs {ref_a.shape}")
    if mask is None:
        mask_a = np.ones(ref_a.shape, dtype=bool)
    else:
        mask_a = np.asarray(mask)
        if mask_a.shape != ref_a.shape:
            raise ValueError(f"mask shape {mask_a.shape} differs from the images' {ref_a.shape}")
        mask_a = mask_a > 0
        if not mask_a.any():
            raise ValueError("the mask is empty: no voxel > 0, nothing to score")
    return pred_a, ref_a, mask_a


# --------------------------------------------------------------------------------------------------
# the metrics on prepared arrays


def _mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(pred[mask] - ref[mask]).mean(dtype=np.float64))


def _psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    # clipping the selected voxels is clipping the volumes, then selecting (as the official code does)
    p = np.clip(pred[mask], lo, hi)
    r = np.clip(ref[mask], lo, hi)
    if np.array_equal(p, r):
        return math.inf  # MSE 0 (scikit-image would return inf with a divide-by-zero warning)
    return float(peak_signal_noise_ratio(r, p, data_range=hi - lo))


def _ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> float:
    from skimage.metrics import structural_similarity

    pad = (SSIM_WIN_SIZE - 1) // 2
    if min(ref.shape) < SSIM_WIN_SIZE:
        raise ValueError(f"SSIM needs arrays of at least {SSIM_WIN_SIZE} voxels along every axis, got {ref.shape}")
    # the scored voxels: the mask without the `pad`-voxel strip along every border
    inner = tuple(slice(pad, n - pad) for n in ref.shape)
    scored = mask[inner]
    if not scored.any():
        return math.nan
    # their bounding box (in `inner` coordinates) grown by `pad`: `box` in array coordinates
    lows, highs = [], []
    for axis in range(scored.ndim):
        hit = np.flatnonzero(scored.any(axis=tuple(a for a in range(scored.ndim) if a != axis)))
        lows.append(int(hit[0]))
        highs.append(int(hit[-1]) + 1)
    box = tuple(slice(l, h + 2 * pad) for l, h in zip(lows, highs))
    box_mask = mask[box]

    def prepared(image: np.ndarray) -> np.ndarray:
        values = np.clip(image[box], lo, hi)
        values[~box_mask] = lo
        values -= lo
        return values

    _, ssim_map = structural_similarity(
        prepared(ref), prepared(pred), win_size=SSIM_WIN_SIZE, data_range=hi - lo,
        K1=SSIM_K1, K2=SSIM_K2, gaussian_weights=False, use_sample_covariance=True, full=True,
    )
    core = tuple(slice(pad, n - pad) for n in ssim_map.shape)
    return float(ssim_map[core][box_mask[core]].mean(dtype=np.float64))


def _region_maes(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    ref_in = ref[mask]
    error = np.abs(pred[mask] - ref_in)
    bone = ref_in >= BONE_HU
    air = ref_in < AIR_HU
    soft = ~(bone | air)

    def mean(selected: np.ndarray) -> float:
        return float(error[selected].mean(dtype=np.float64)) if selected.any() else math.nan

    return {"mae_bone": mean(bone), "mae_air": mean(air), "mae_soft": mean(soft)}


# --------------------------------------------------------------------------------------------------
# public API


def mae(pred: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray]) -> float:
    """Mean absolute error in HU over the voxels where ``mask > 0`` (values not clipped).

    ``mask=None`` scores every voxel. Raises ValueError for arrays that are not 2D/3D, differ in
    shape, or an empty mask.
    """
    pred_a, ref_a, mask_a = _prepare(pred, ref, mask)
    return _mae(pred_a, ref_a, mask_a)


def psnr(pred: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray],
         window: tuple[float, float] | str = SYNTHRAD2023_WINDOW) -> float:
    """PSNR in dB over the mask voxels, both images clipped to `window`, data range ``hi - lo``.

    ``inf`` when the clipped images agree on every mask voxel.
    """
    lo, hi = check_window(window)
    pred_a, ref_a, mask_a = _prepare(pred, ref, mask)
    return _psnr(pred_a, ref_a, mask_a, lo, hi)


def ssim(pred: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray],
         window: tuple[float, float] | str = SYNTHRAD2023_WINDOW) -> float:
    """Masked SSIM as SynthRAD2023 computes it (see the module docstring).

    Both clipped to `window`, set to ``lo`` outside the mask and shifted by ``-lo``; scikit-image
    SSIM (7-voxel uniform window, K1 0.01, K2 0.03, data range ``hi - lo``) on the whole array; the
    map's mean over the mask voxels at least 3 voxels from every border (NaN when there is none).
    Arrays must be at least 7 voxels along every axis.
    """
    lo, hi = check_window(window)
    pred_a, ref_a, mask_a = _prepare(pred, ref, mask)
    return _ssim(pred_a, ref_a, mask_a, lo, hi)


def region_mae(pred: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray]) -> dict[str, float]:
    """MAE in HU per tissue class of the reference inside the mask: ``mae_bone`` (ref >= 250 HU),
    ``mae_air`` (ref < -400 HU) and ``mae_soft`` (the rest); NaN for a class with no voxel."""
    pred_a, ref_a, mask_a = _prepare(pred, ref, mask)
    return _region_maes(pred_a, ref_a, mask_a)


def image_metrics(pred: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray],
                  window: tuple[float, float] | str = SYNTHRAD2023_WINDOW) -> dict[str, float]:
    """All metrics of one prediction: ``mae``, ``psnr``, ``ssim``, ``mae_bone``, ``mae_air``, ``mae_soft``.

    `pred` and `ref` in HU, 2D (at least 7x7) or 3D arrays of one shape; `mask` > 0 marks the voxels
    scored (None: all). Raises ValueError for mismatched shapes, a bad window or an empty mask.
    """
    lo, hi = check_window(window)
    pred_a, ref_a, mask_a = _prepare(pred, ref, mask)
    result = {
        "mae": _mae(pred_a, ref_a, mask_a),
        "psnr": _psnr(pred_a, ref_a, mask_a, lo, hi),
        "ssim": _ssim(pred_a, ref_a, mask_a, lo, hi),
    }
    result.update(_region_maes(pred_a, ref_a, mask_a))
    return result


def _ms_ssim_components(x: np.ndarray, y: np.ndarray, data_range: float, weight: float) -> np.ndarray:
    """The SSIM map of one scale with contrast and structure raised to `weight` and no luminance
    term, as SynthRAD2025's ``structural_similarity_at_scale`` computes it (7-voxel uniform window,
    sample covariance, C3 = C2 / 2, each factor clipped at 0)."""
    from scipy.ndimage import uniform_filter

    cov_norm = SSIM_WIN_SIZE**x.ndim / (SSIM_WIN_SIZE**x.ndim - 1)
    ux, uy = uniform_filter(x, SSIM_WIN_SIZE), uniform_filter(y, SSIM_WIN_SIZE)
    vx = cov_norm * (uniform_filter(x * x, SSIM_WIN_SIZE) - ux * ux)
    vy = cov_norm * (uniform_filter(y * y, SSIM_WIN_SIZE) - uy * uy)
    vxy = cov_norm * (uniform_filter(x * y, SSIM_WIN_SIZE) - ux * uy)
    sx, sy = np.sqrt(np.clip(vx, 0, None)), np.sqrt(np.clip(vy, 0, None))
    c2 = (SSIM_K2 * data_range) ** 2
    c3 = c2 / 2
    contrast = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
    structure = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
    return contrast**weight * structure**weight


def ms_ssim(pred: np.ndarray, ref: np.ndarray, mask: Optional[np.ndarray],
            window: tuple[float, float] | str = SYNTHRAD2025_WINDOW) -> float:
    """Masked MS-SSIM of 3D volumes as SynthRAD2025's official evaluation computes it.

    Both clipped to `window` (default -1024..3071 HU, data range 4095), set to ``lo`` outside the
    mask and shifted by ``-lo``; every axis padded to 97 voxels with edge values (image and mask);
    then at each of 5 scales the SSIM map (:func:`_ms_ssim_components`, contrast and structure
    raised to the scale's weight 0.0448, 0.2856, 0.3001, 0.2363, 0.1333) is averaged over the mask
    voxels at least 3 voxels from every border, and the images are smoothed by a 2x2x2 mean
    (``fftconvolve``, ``same``) and subsampled by 2 (the mask subsampled only). The score is the
    product of the 5 means, each clipped to [0, 1]. As in the official code, no scale has a
    luminance term (its luminance weights list six entries for five scales, all used ones 0), and
    a scale whose subsampled mask lies wholly in the border strip gives NaN.
    """
    from scipy.signal import fftconvolve

    lo, hi = check_window(window)
    pred_a, ref_a, mask_a = _prepare(pred, ref, mask)
    if ref_a.ndim != 3:
        raise ValueError(f"MS-SSIM needs 3D volumes, got shape {ref_a.shape}")

    def prepared(image: np.ndarray) -> np.ndarray:
        values = np.clip(image.astype(np.float64), lo, hi)
        values[~mask_a] = lo
        return values - lo

    pads = [(max(MS_SSIM_MIN_SIZE - n, 0) // 2, max(MS_SSIM_MIN_SIZE - n, 0) - max(MS_SSIM_MIN_SIZE - n, 0) // 2)
            for n in ref_a.shape]
    x = np.pad(prepared(ref_a), pads, mode="edge")
    y = np.pad(prepared(pred_a), pads, mode="edge")
    scored = np.pad(mask_a, pads, mode="edge")
    box = np.ones((2, 2, 2)) / 8
    pad = (SSIM_WIN_SIZE - 1) // 2
    means = []
    for level, weight in enumerate(MS_SSIM_WEIGHTS):
        ssim_map = _ms_ssim_components(x, y, hi - lo, weight)
        inner = tuple(slice(pad, n - pad) for n in ssim_map.shape)
        selected = ssim_map[inner][scored[inner]]
        means.append(float(selected.mean(dtype=np.float64)) if selected.size else math.nan)
        if level < len(MS_SSIM_WEIGHTS) - 1:
            x = fftconvolve(x, box, mode="same")[::2, ::2, ::2]
            y = fftconvolve(y, box, mode="same")[::2, ::2, ::2]
            scored = scored[::2, ::2, ::2]
    return float(np.prod(np.clip(means, 0, 1)))
