"""Anatomy metrics: Dice and HD95 (MONAI) of bone and air cavities, on tiny synthetic heads."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medcycle.anatomy import ANATOMY_KEYS, anatomy_metrics, overlap_metrics, structures

SPACING = (2.0, 2.0, 2.0)


def head(shape=(40, 44, 24), spacing=SPACING) -> np.ndarray:
    """Soft tissue (40 HU) in an ellipsoid with a 6 mm skull (1200 HU) and an air sinus, in air."""
    idx = np.indices(shape, dtype=np.float64)
    mm = [(i - (n - 1) / 2) * s for i, n, s in zip(idx, shape, spacing)]
    r = np.sqrt((mm[0] / 36) ** 2 + (mm[1] / 40) ** 2 + (mm[2] / 22) ** 2)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r <= 1.0] = 40.0
    hu[(r <= 0.9) & (r > 0.75)] = 1200.0
    sinus = (mm[0] / 8) ** 2 + ((mm[1] - 14) / 6) ** 2 + (mm[2] / 6) ** 2 <= 1
    hu[sinus] = -1000.0
    return hu


def test_identical_volumes_score_perfectly():
    ct = head()
    out = anatomy_metrics(ct, ct.copy(), SPACING)
    assert tuple(out) == ANATOMY_KEYS
    assert out == {"dice_bone": 1.0, "hd95_bone": 0.0, "dice_air": 1.0, "hd95_air": 0.0}


def test_structures_are_bone_and_inner_air():
    ct = head()
    body = ct > -400
    body = ndimage.binary_fill_holes(body)
    found = structures(ct, body, SPACING)
    assert np.array_equal(found["bone"], ct >= 250)
    sinus = (ct < -400) & body
    assert np.array_equal(found["air"], sinus)  # the sinus lies deeper than 3 mm
    # a cavity touching the skin is not a cavity: the rim of the body is left out
    rim = body & ~ndimage.binary_erosion(body)
    assert not np.any(found["air"] & rim)


def test_a_2_mm_shift_lowers_dice_and_raises_hd95():
    ct = head()
    shifted = ndimage.shift(ct, (1.0, 0.0, 0.0), order=0, mode="nearest")  # one 2 mm voxel
    out = anatomy_metrics(shifted, ct, SPACING)
    assert 0.3 < out["dice_bone"] < 0.9
    assert out["hd95_bone"] == pytest.approx(2.0)
    assert out["dice_air"] < 0.9 and out["hd95_air"] >= 2.0


def test_bone_set_to_soft_tissue_and_a_filled_sinus():
    ct = head()
    sct = np.where(ct >= 250, 40.0, ct)
    out = anatomy_metrics(sct, ct, SPACING)
    assert out["dice_bone"] == 0.0 and out["hd95_bone"] == math.inf
    assert out["dice_air"] == 1.0
    sct = np.where((ct < -400) & ndimage.binary_fill_holes(ct > -400), 40.0, ct)
    out = anatomy_metrics(sct, ct, SPACING)
    assert out["dice_bone"] == 1.0 and out["dice_air"] == 0.0


def test_a_structure_absent_from_both_is_nan_and_the_mask_limits_the_body():
    ct = np.where(head() >= 250, 40.0, head())  # no bone at all
    out = anatomy_metrics(ct, ct, SPACING)
    assert math.isnan(out["dice_bone"]) and math.isnan(out["hd95_bone"])
    mask = np.zeros(ct.shape, dtype=bool)
    mask[:, :, :12] = True  # the lower half: the changed upper half does not count
    sct = head()
    sct[:, :, 12:] = 40.0
    out = anatomy_metrics(sct, head(), SPACING, mask=mask)
    assert out["dice_bone"] == 1.0 and out["hd95_bone"] == 0.0


def test_overlap_metrics_hand_computed_and_refusals():
    a = np.zeros((10, 10, 10), dtype=bool)
    b = a.copy()
    a[2:6, 2:6, 2:6] = True  # 64 voxels
    b[2:6, 2:6, 3:7] = True  # 64 voxels, 48 shared
    dice, hd95 = overlap_metrics(a, b, (1.0, 1.0, 1.0))
    assert dice == pytest.approx(2 * 48 / 128)
    assert hd95 == pytest.approx(1.0)
    assert overlap_metrics(a, b, (1.0, 1.0, 3.0))[1] == pytest.approx(3.0)  # spacing is honoured
    with pytest.raises(ValueError, match="shape"):
        overlap_metrics(a, b[:-1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        overlap_metrics(a, b, (1.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        anatomy_metrics(np.zeros((8, 8)), np.zeros((8, 8)), (1.0, 1.0))
    with pytest.raises(ValueError, match="no body"):
        anatomy_metrics(np.full((8, 8, 8), -1000.0), np.full((8, 8, 8), -1000.0), SPACING)
