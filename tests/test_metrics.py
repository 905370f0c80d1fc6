"""SynthRAD2023 metrics: hand-computed values, the official definitions, masks, windows, speed."""
import itertools
import math
import time

import numpy as np
import pytest

from medcycle import metrics
from medcycle.metrics import image_metrics, mae, psnr, region_mae, ssim

RANGE_2023 = 4024.0


def _ball(shape, radius_fraction=0.35, centre=None):
    idx = np.indices(shape, dtype=np.float64)
    centre = centre if centre is not None else [(n - 1) / 2 for n in shape]
    r2 = sum(((i - c) / (n * radius_fraction)) ** 2 for i, c, n in zip(idx, centre, shape))
    return r2 < 1


def _pair(shape, seed=0, noise=80.0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(100, 600, shape).astype(np.float32)
    pred = (ref + rng.normal(0, noise, shape)).astype(np.float32)
    return pred, ref


# --------------------------------------------------------------------------------------------------
# independent references


def _direct_ssim(pred, ref, mask, lo, hi):
    """SSIM from its formula, window by window (7 voxels a side, sample covariance), float64; the
    mean over mask voxels at least 3 voxels from every border (where the window fits wholly)."""
    def prepare(image):
        values = np.clip(image.astype(np.float64), lo, hi)
        values[~mask] = lo
        return values - lo

    x, y = prepare(pred), prepare(ref)
    c1, c2 = (0.01 * (hi - lo)) ** 2, (0.03 * (hi - lo)) ** 2
    scores = []
    ranges = [range(3, n - 3) for n in mask.shape]
    for centre in itertools.product(*ranges):
        if not mask[centre]:
            continue
        window = tuple(slice(c - 3, c + 4) for c in centre)
        a, b = x[window].ravel(), y[window].ravel()
        mx, my = a.mean(), b.mean()
        vx, vy = a.var(ddof=1), b.var(ddof=1)
        cov = ((a - mx) * (b - my)).sum() / (a.size - 1)
        scores.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(scores))


def _official_ssim(pred, ref, mask, dynamic_range=(-1024.0, 3000.0)):
    """SynthRAD2023/metrics ImageMetrics.ssim, on the whole array (no bounding-box shortcut)."""
    from skimage.metrics import structural_similarity
    from skimage.util import crop

    gt = np.clip(ref, min(dynamic_range), max(dynamic_range))
    pr = np.clip(pred, min(dynamic_range), max(dynamic_range))
    m = np.where(mask > 0, 1.0, 0.0)
    gt = np.where(m == 0, min(dynamic_range), gt).astype(np.float32) - min(dynamic_range)
    pr = np.where(m == 0, min(dynamic_range), pr).astype(np.float32) - min(dynamic_range)
    _, ssim_map = structural_similarity(gt, pr, data_range=dynamic_range[1] - dynamic_range[0], full=True)
    return float(crop(ssim_map, 3)[crop(m, 3).astype(bool)].mean(dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# MAE


def test_mae_of_a_constant_offset_is_the_offset():
    ref = np.zeros((9, 8, 7), dtype=np.float32)
    mask = _ball(ref.shape)
    assert mae(ref + 12.5, ref, mask) == pytest.approx(12.5, abs=1e-9)
    assert mae(ref - 12.5, ref, mask) == pytest.approx(12.5, abs=1e-9)


def test_mae_hand_computed_and_only_mask_voxels_count():
    ref = np.array([[0.0, 10.0], [20.0, 30.0]])
    pred = np.array([[1.0, 13.0], [20.0, 1000.0]])
    mask = np.array([[1, 1], [1, 0]])
    assert mae(pred, ref, mask) == pytest.approx((1 + 3 + 0) / 3)
    changed = pred.copy()
    changed[1, 1] = -5000.0  # outside the mask
    assert mae(changed, ref, mask) == mae(pred, ref, mask)


def test_mae_mask_is_binarised_and_none_means_everything():
    ref = np.zeros((4, 4))
    pred = np.arange(16.0).reshape(4, 4)
    weights = np.where(pred > 7, 0.3, 0.0)  # any value > 0 is inside, with weight 1
    assert mae(pred, ref, weights) == pytest.approx(np.arange(8, 16).mean())
    assert mae(pred, ref, None) == pytest.approx(pred.mean())


def test_mae_is_not_clipped_but_psnr_is():
    ref = np.full((8, 8), 3000.0)
    pred = np.full((8, 8), 5000.0)
    mask = np.ones((8, 8))
    assert mae(pred, ref, mask) == pytest.approx(2000.0)
    assert psnr(pred, ref, mask) == math.inf  # both clipped to 3000: no error left
    low = np.full((8, 8), -3000.0)
    assert mae(low, np.full((8, 8), -1024.0), mask) == pytest.approx(1976.0)
    assert psnr(low, np.full((8, 8), -1024.0), mask) == math.inf


# --------------------------------------------------------------------------------------------------
# PSNR


def test_psnr_for_a_known_mse():
    ref = np.zeros((10, 9, 8), dtype=np.float32)
    mask = _ball(ref.shape)
    pred = ref + 4.0  # MSE 16
    expected = 10 * math.log10(RANGE_2023**2 / 16.0)
    assert psnr(pred, ref, mask) == pytest.approx(expected, abs=1e-9)
    # half the voxels off by 4, half exact: MSE 8 over the mask voxels
    pred2 = ref.copy()
    inside = np.flatnonzero(mask)
    pred2.flat[inside[::2]] = 4.0
    mse = 16.0 * len(inside[::2]) / len(inside)
    assert psnr(pred2, ref, mask) == pytest.approx(10 * math.log10(RANGE_2023**2 / mse), abs=1e-9)


def test_psnr_ignores_out_of_mask_differences():
    pred, ref = _pair((12, 11, 10))
    mask = _ball(ref.shape)
    before = psnr(pred, ref, mask)
    pred[~mask] += 1500.0
    assert psnr(pred, ref, mask) == before


def test_psnr_clips_to_the_window_hand_computed():
    ref = np.array([[-2000.0, 0.0], [3500.0, 100.0]])
    pred = np.array([[-1500.0, 10.0], [2990.0, 100.0]])
    # clipped: ref [-1024, 0, 3000, 100], pred [-1024, 10, 2990, 100] -> MSE (0 + 100 + 100 + 0) / 4
    expected = 10 * math.log10(RANGE_2023**2 / 50.0)
    assert psnr(pred, ref, None) == pytest.approx(expected, abs=1e-9)


def test_psnr_matches_skimage_on_the_official_recipe():
    from skimage.metrics import peak_signal_noise_ratio

    pred, ref = _pair((14, 12, 9))
    pred[0, 0, 0], ref[1, 1, 1] = 4000.0, -3000.0
    mask = _ball(ref.shape)
    official = peak_signal_noise_ratio(np.clip(ref, -1024, 3000)[mask], np.clip(pred, -1024, 3000)[mask],
                                       data_range=4024)
    assert psnr(pred, ref, mask) == pytest.approx(official, abs=1e-9)


def test_synthrad2025_window():
    ref = np.full((8, 8), 3050.0)
    pred = np.full((8, 8), 3100.0)
    mask = np.ones((8, 8))
    assert psnr(pred, ref, mask) == math.inf  # 2023: both clip to 3000
    # 2025: 3050 vs 3071 -> MSE 21^2, data range 4095
    expected = 10 * math.log10(4095.0**2 / 21.0**2)
    assert psnr(pred, ref, mask, window=metrics.SYNTHRAD2025_WINDOW) == pytest.approx(expected, abs=1e-9)
    assert psnr(pred, ref, mask, window=(-1024, 3071)) == pytest.approx(expected, abs=1e-9)
    assert psnr(pred, ref, mask, window="SynthRAD2025") == pytest.approx(expected, abs=1e-9)  # by name
    assert psnr(pred, ref, mask, window="synthrad2023") == math.inf
    with pytest.raises(ValueError, match="synthrad2023, synthrad2025"):
        psnr(pred, ref, mask, window="synthrad2030")
    p, r = _pair((10, 10, 9))
    m = _ball(r.shape)
    assert ssim(p, r, m, window=(-1024.0, 3071.0)) == pytest.approx(_direct_ssim(p, r, m, -1024.0, 3071.0), abs=2e-5)
    with pytest.raises(ValueError):
        psnr(p, r, m, window=(100.0, 100.0))


# --------------------------------------------------------------------------------------------------
# SSIM


def test_ssim_of_identical_volumes_is_one():
    _, ref = _pair((12, 11, 10))
    mask = _ball(ref.shape)
    assert ssim(ref, ref, mask) == pytest.approx(1.0, abs=1e-6)
    assert ssim(ref[:, :, 4], ref[:, :, 4], mask[:, :, 4]) == pytest.approx(1.0, abs=1e-6)


def test_ssim_matches_the_formula_computed_window_by_window_3d():
    pred, ref = _pair((11, 10, 9), seed=1, noise=300.0)
    ref[2, 3, 4], pred[5, 5, 5] = 3600.0, -2500.0  # exercise the clipping
    mask = _ball(ref.shape, 0.45)
    direct = _direct_ssim(pred, ref, mask, -1024.0, 3000.0)
    assert 0.3 < direct < 0.99
    assert ssim(pred, ref, mask) == pytest.approx(direct, abs=2e-5)


def test_ssim_matches_the_formula_in_2d():
    pred, ref = _pair((16, 13), seed=2, noise=400.0)
    mask = _ball(ref.shape, 0.45)
    assert ssim(pred, ref, mask) == pytest.approx(_direct_ssim(pred, ref, mask, -1024.0, 3000.0), abs=2e-5)


@pytest.mark.parametrize("shape,centre", [((40, 36, 30), None), ((40, 36, 30), (3, 33, 2)), ((64, 48), (60, 5))])
def test_ssim_equals_the_official_whole_volume_computation(shape, centre):
    """The bounding-box shortcut gives the official numbers, also for masks touching the borders."""
    pred, ref = _pair(shape, seed=3, noise=250.0)
    mask = _ball(shape, 0.3, centre)
    assert mask.any()
    assert ssim(pred, ref, mask) == pytest.approx(_official_ssim(pred, ref, mask), abs=1e-9)
    full = np.ones(shape, dtype=bool)
    assert ssim(pred, ref, full) == pytest.approx(_official_ssim(pred, ref, full), abs=1e-9)


def test_ssim_ignores_out_of_mask_differences():
    pred, ref = _pair((14, 13, 12))
    mask = _ball(ref.shape)
    before = ssim(pred, ref, mask)
    pred[~mask] = 2500.0
    ref[~mask] = -600.0
    assert ssim(pred, ref, mask) == before


def test_ssim_of_a_mask_only_in_the_border_strip_is_nan():
    pred, ref = _pair((10, 10, 10))
    mask = np.zeros(ref.shape, dtype=bool)
    mask[0:2, :, :] = True
    assert math.isnan(ssim(pred, ref, mask))
    assert math.isnan(image_metrics(pred, ref, mask)["ssim"])


def test_ssim_needs_7_voxels_per_axis():
    pred, ref = _pair((7, 7))
    assert 0 < ssim(pred, ref, np.ones((7, 7))) <= 1
    with pytest.raises(ValueError, match="at least 7"):
        ssim(*_pair((6, 9)), np.ones((6, 9)))


# --------------------------------------------------------------------------------------------------
# regions, image_metrics, refusals


def test_region_maes():
    ref = np.array([[-1000.0, -500.0, 0.0, 249.0], [250.0, 1000.0, -401.0, -400.0]])
    pred = ref + np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 7.0, 9.0, 11.0]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = region_mae(pred, ref, mask)
    assert out["mae_bone"] == pytest.approx((5 + 7) / 2)  # >= 250
    assert out["mae_air"] == pytest.approx((2 + 9) / 2)  # < -400 inside the mask (the -1000 voxel is outside)
    assert out["mae_soft"] == pytest.approx((3 + 4 + 11) / 3)  # -400 <= ref < 250


def test_a_region_without_voxels_is_nan():
    ref = np.zeros((8, 8))
    out = image_metrics(ref + 3.0, ref, np.ones((8, 8)))
    assert math.isnan(out["mae_bone"]) and math.isnan(out["mae_air"])
    assert out["mae_soft"] == pytest.approx(3.0)


def test_image_metrics_keys_and_consistency():
    pred, ref = _pair((20, 18, 16))
    mask = _ball(ref.shape)
    out = image_metrics(pred, ref, mask)
    assert tuple(out) == metrics.METRIC_KEYS
    assert all(isinstance(v, float) for v in out.values())
    assert out["mae"] == mae(pred, ref, mask)
    assert out["psnr"] == psnr(pred, ref, mask)
    assert out["ssim"] == ssim(pred, ref, mask)
    assert out == image_metrics(pred.astype(np.float64), ref.astype(np.float64), mask.astype(np.uint8))


def test_integer_inputs():
    ref = np.zeros((9, 9), dtype=np.int16)
    pred = np.full((9, 9), 7, dtype=np.int16)
    assert image_metrics(pred, ref, np.ones((9, 9), dtype=bool))["mae"] == pytest.approx(7.0)


@pytest.mark.parametrize("fn", [mae, psnr, ssim, image_metrics, region_mae])
def test_refusals(fn):
    a = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        fn(a, np.zeros((8, 8, 9)), np.ones((8, 8, 8)))
    with pytest.raises(ValueError, match="mask shape"):
        fn(a, a, np.ones((8, 8)))
    with pytest.raises(ValueError, match="empty"):
        fn(a, a, np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match="2D or 3D"):
        fn(np.zeros(8), np.zeros(8), np.ones(8))


def test_speed_of_a_tile_and_a_volume():
    pred, ref = _pair((128, 128))
    mask = _ball(ref.shape, 0.45)
    image_metrics(pred, ref, mask)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        image_metrics(pred, ref, mask)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.010
    pred, ref = _pair((128, 128, 80))
    mask = _ball(ref.shape, 0.4)
    start = time.perf_counter()
    image_metrics(pred, ref, mask)
    assert time.perf_counter() - start < 1.5


# --------------------------------------------------------------------------------------------------
# MS-SSIM (SynthRAD2025)


def _official_ms_ssim(pred, ref, mask, dynamic_range=(-1024.0, 3071.0)):
    """SynthRAD2025/evaluation ImageMetrics.ms_ssim (after score_patient's masking), transcribed
    step by step with its names: clip, mask, shift, pad to 97, five scales, masked means."""
    from scipy.ndimage import uniform_filter
    from scipy.signal import fftconvolve
    from skimage.util import crop

    lo, hi = dynamic_range
    m = np.where(mask > 0, 1.0, 0.0)
    gt = np.where(m == 0, lo, np.clip(ref.astype(np.float64), lo, hi)) - lo
    pr = np.where(m == 0, lo, np.clip(pred.astype(np.float64), lo, hi)) - lo
    scale_weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
    luminance_weights = np.array([0, 0, 0, 0, 0, 0.1333])
    pads = [(max((97 - d) // 2, 0), max(97 - d - (97 - d) // 2, 0)) for d in gt.shape]
    gt, pr, m = (np.pad(a, pads, mode="edge") for a in (gt, pr, m))
    values = []
    for level in range(5):
        ux, uy = uniform_filter(gt, size=7), uniform_filter(pr, size=7)
        cov = 343 / 342
        vx = cov * (uniform_filter(gt * gt, size=7) - ux * ux)
        vy = cov * (uniform_filter(pr * pr, size=7) - uy * uy)
        vxy = cov * (uniform_filter(gt * pr, size=7) - ux * uy)
        c1, c2 = (0.01 * (hi - lo)) ** 2, (0.03 * (hi - lo)) ** 2
        sx, sy = np.clip(vx, 0, None) ** 0.5, np.clip(vy, 0, None) ** 0.5
        lum = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0, None)
        con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
        st = np.clip((vxy + c2 / 2) / (sx * sy + c2 / 2), 0, None)
        ssim_map = lum ** luminance_weights[level] * con ** scale_weights[level] * st ** scale_weights[level]
        values.append(crop(ssim_map, 3)[crop(m, 3).astype(bool)].mean(dtype=np.float64))
        box = np.ones((2, 2, 2)) / 8
        gt, pr = (fftconvolve(a, box, mode="same")[::2, ::2, ::2] for a in (gt, pr))
        m = m[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0, 1)))


def _ms_head(shape=(30, 28, 20)):
    rng = np.random.default_rng(7)
    ref = np.full(shape, -1000.0, dtype=np.float32)
    mask = _ball(shape, 0.42)
    ref[mask] = 40.0
    ref[_ball(shape, 0.42) & ~_ball(shape, 0.34)] = 1300.0  # a skull
    ref += rng.normal(0, 15, shape).astype(np.float32)
    return ref, mask


def test_ms_ssim_of_identical_volumes_is_one():
    ref, mask = _ms_head()
    assert metrics.ms_ssim(ref, ref.copy(), mask) == pytest.approx(1.0, abs=1e-9)


def test_ms_ssim_equals_the_official_computation():
    ref, mask = _ms_head()
    pred = ref + np.random.default_rng(3).normal(0, 120, ref.shape).astype(np.float32)
    pred[3, 4, 5] = 3050.0  # above the 2023 window, inside the 2025 one
    value = metrics.ms_ssim(pred, ref, mask)
    assert 0.3 < value < 0.999
    assert value == pytest.approx(_official_ms_ssim(pred, ref, mask), abs=1e-9)
    big = (100, 98, 9)  # one axis below 97 (padded), two above (not)
    ref2 = np.random.default_rng(4).normal(0, 500, big).astype(np.float32)
    pred2 = ref2 + np.random.default_rng(5).normal(0, 200, big).astype(np.float32)
    mask2 = _ball(big, 0.45)
    assert metrics.ms_ssim(pred2, ref2, mask2) == pytest.approx(_official_ms_ssim(pred2, ref2, mask2), abs=1e-9)


def test_ms_ssim_drops_for_a_2_mm_shift_and_ignores_the_outside():
    ref, mask = _ms_head()
    shifted = np.roll(ref, 2, axis=0)  # 2 voxels of 1 mm
    value = metrics.ms_ssim(shifted, ref, mask)
    assert value < 0.98
    outside = ref.copy()
    outside[~mask] = 2000.0
    assert metrics.ms_ssim(outside, ref, mask) == pytest.approx(1.0, abs=1e-9)


def test_ms_ssim_needs_3d():
    with pytest.raises(ValueError, match="3D"):
        metrics.ms_ssim(np.zeros((20, 20)), np.zeros((20, 20)), np.ones((20, 20)))
