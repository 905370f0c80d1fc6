"""The body mask on real-scan hazards, on tiny synthetic heads (2 mm voxels).

Head holders, couches and stereotactic frames attached by thin parts are left out of a CT's mask, an
MR-visible localiser beside the head out of an MR's, while dark bone, sinuses and ears stay in; a truncated field of view keeps the head it shows; a few
extreme or non-finite voxels do not move the mask (issue 24, finding 2); the head check tells a
head from a chest.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medcycle.transforms.body_mask import BodyMaskd, compute_body_mask, robust_values
from medcycle.transforms.body_part import head_check

SPACING = (2.0, 2.0, 2.0)
N, SLICES = 96, 40


def head(seed: int = 0) -> dict[str, np.ndarray]:
    """A head (120 x 148 mm) with scalp, skull, brain, a sinus and two thin ears, as CT (HU) and MR, and its parts."""
    x, y = np.ogrid[:N, :N]
    r = ((x - 48) / 30.0) ** 2 + ((y - 48) / 37.0) ** 2
    z = np.arange(SLICES)[None, None, :]
    body = np.repeat((r <= 1.0)[:, :, None], SLICES, axis=2)
    skull = np.repeat(((r > 0.72) & (r <= 0.85))[:, :, None], SLICES, axis=2)
    sinus = np.repeat((np.hypot(x - 48, y - 74) <= 4)[:, :, None], SLICES, axis=2) & (z >= 6) & (z < 12)
    ears = np.zeros(body.shape, dtype=bool)  # flaps 4 mm thick, 16 mm out from the head, 24 mm high: ~1.5 cm3
    ears[10:19, 44:46, 8:20] = True
    ears[78:87, 44:46, 8:20] = True
    ears &= ~body
    ct = np.full(body.shape, -1000.0, dtype=np.float32)
    ct[body | ears] = 30.0
    ct[skull] = 1200.0
    ct[sinus] = -1000.0
    rng = np.random.default_rng(seed)
    mr = np.zeros(body.shape, dtype=np.float32)
    mr[body | ears] = 700.0  # scalp, ears
    mr[body & ~skull & (r <= 0.72)[:, :, None]] = 420.0  # brain
    mr[skull | sinus] = 40.0  # dark bone and air
    mr = np.abs(mr + rng.normal(0.0, 12.0, mr.shape)).astype(np.float32)
    return {"ct": ct, "mr": mr, "body": body | ears, "skull": skull, "sinus": sinus, "ears": ears}


def ct_mask(ct: np.ndarray) -> np.ndarray:
    return compute_body_mask(ct, threshold=-500.0, spacing=SPACING)


def test_ct_and_mr_masks_keep_dark_bone_sinuses_and_thin_ears():
    h = head()
    for mask in (ct_mask(h["ct"]), compute_body_mask(h["mr"], spacing=SPACING)):
        assert mask[h["skull"]].all() and mask[h["sinus"]].all()
        assert mask[h["ears"]].mean() > 0.9  # shaved off by the opening, given back
        assert (mask & h["body"]).sum() > 0.99 * h["body"].sum() and (mask & ~h["body"]).sum() < 0.01 * h["body"].sum()


def test_ct_mask_leaves_out_a_head_holder_touching_the_head():
    from scipy import ndimage

    h = head()
    x, y = np.ogrid[:N, :N]
    radius = np.hypot(x - 48.0, y - 58.0)  # a cradle of 96 mm radius, 4 mm thick, under the back of the head:
    cradle = (radius >= 47) & (radius < 49) & (y < 42)  # two arms of ~40 cm3 (a real holder's: ~60 cm3)
    holder = np.repeat(cradle[:, :, None], SLICES, axis=2) & ~h["body"]
    assert (ndimage.binary_dilation(h["body"]) & holder).any()  # it touches the head
    ct = h["ct"].copy()
    ct[holder] = 300.0
    mask = ct_mask(ct)
    assert (mask & holder).sum() < 0.15 * holder.sum()  # at most the contact zone (1-2 voxels from the skin)
    assert (mask & h["body"]).sum() > 0.99 * h["body"].sum()


def test_ct_mask_leaves_out_a_couch_and_a_frame_ring_with_the_air_it_encloses():
    h = head()
    ct = h["ct"].copy()
    devices = np.zeros(ct.shape, dtype=bool)
    devices[4:92, 9:11, :] = True  # couch top under the head (4 mm), touching it
    devices[1:95, 1:95, :3] = True
    devices[5:91, 5:91, :3] = False  # an 8 mm base ring around the head on the lowest slices ...
    devices[47:49, 5:12, :3] = True  # ... pinned to it with a 4 mm pin
    devices &= ~h["body"]
    ct[devices] = 1500.0
    mask = ct_mask(ct)
    outside = ~h["body"]
    assert (mask & outside).sum() < 0.005 * h["body"].sum()  # neither the ring and couch nor the air between
    assert (mask & h["body"]).sum() > 0.99 * h["body"].sum()


def test_mr_mask_leaves_out_a_localiser_beside_the_head():
    h = head()
    mr = h["mr"].copy()
    plate = np.zeros(mr.shape, dtype=bool)
    plate[86:94, 58:90, :] = True  # a fluid-filled localiser plate (16 x 64 mm) 20 mm beside the head
    mr[plate] = 800.0
    mask = compute_body_mask(mr, spacing=SPACING)
    assert not (mask & plate).any()
    assert (mask & h["body"]).sum() > 0.99 * h["body"].sum()


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_truncated_field_of_view_keeps_the_head_it_shows(modality):
    h = head()
    cut = (slice(None), slice(22, None), slice(None))  # the back of the head lies outside the image
    image, body = h[modality][cut], h["body"][cut]
    assert body[:, 0].any()  # the body touches the image border
    mask = ct_mask(image) if modality == "ct" else compute_body_mask(image, spacing=SPACING)
    assert (mask & body).sum() > 0.99 * body.sum() and (mask & ~body).sum() < 0.01 * body.sum()


EXTREMES = [1e6, 1e30, -1e6, -1e30, np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("modality", ["mr", "ct"])
@pytest.mark.parametrize("value", EXTREMES)
@pytest.mark.parametrize("where", ["air", "body"])
def test_one_extreme_voxel_does_not_move_the_mask(modality, value, where):
    h = head()
    image = h[modality].copy()
    image[(5, 5, 20) if where == "air" else (48, 48, 20)] = value
    mask = ct_mask(image) if modality == "ct" else compute_body_mask(image, spacing=SPACING)
    body = h["body"]
    assert (mask & body).sum() > 0.98 * body.sum() and (mask & ~body).sum() < 0.02 * body.sum()


def test_robust_values_leave_an_ordinary_scan_alone_and_clip_extremes_to_the_fences():
    h = head()
    ordinary = h["mr"]
    same, low, high = robust_values(ordinary)
    assert same is ordinary
    assert (low, high) == pytest.approx(tuple(np.percentile(ordinary, (0.5, 99.5))))
    bad = ordinary.copy()
    bad[0, 0, 0], bad[1, 0, 0], bad[2, 0, 0] = 1e30, np.nan, -np.inf
    fixed, _, _ = robust_values(bad)
    assert np.isfinite(fixed).all() and bad[0, 0, 0] == np.float32(1e30)  # the input is not changed
    assert fixed[0, 0, 0] == pytest.approx(high + (high - low), rel=1e-3) and fixed[1, 0, 0] == fixed[2, 0, 0] < low
    np.testing.assert_array_equal(fixed[3:], ordinary[3:])


def test_a_ct_body_under_half_a_percent_of_the_volume_is_not_clipped_away():
    ct = np.full((96, 96, 24), -1000.0, dtype=np.float32)
    ct[40:48, 40:50, 10:14] = 40.0  # 0.2 % of the voxels
    mask = ct_mask(ct)
    assert mask[40:48, 40:50, 10:14].all() and mask.sum() == 8 * 10 * 4


def test_body_maskd_takes_the_spacing_from_the_image():
    h = head()
    ct = h["ct"].copy()
    plate = np.zeros(ct.shape, dtype=bool)
    plate[4:92, 9:11, :] = True  # a 4 mm couch top: thin at 2 mm, not at 0.2 mm (where it would be 20 voxels)
    plate &= ~h["body"]
    ct[plate] = 300.0
    for voxel_mm, expected_in in ((2.0, False), (0.2, True)):
        image = MetaTensor(torch.from_numpy(ct[None]), affine=torch.diag(torch.tensor([voxel_mm, voxel_mm, 2.0, 1.0])))
        mask = BodyMaskd()({"ct": image})["mask"].numpy()[0] > 0
        assert ((mask & plate).sum() > 0.5 * plate.sum()) == expected_in


# --------------------------------------------------------------------------------------------------
# head check


def ellipse_mask(width_mm: float, depth_mm: float, shape=(200, 200, 4), spacing=2.0) -> np.ndarray:
    x, y = np.ogrid[: shape[0], : shape[1]]
    inside = ((x - 100) * spacing / (width_mm / 2)) ** 2 + ((y - 100) * spacing / (depth_mm / 2)) ** 2 <= 1.0
    return np.repeat(inside[:, :, None], shape[2], axis=2)


def test_head_check_tells_a_head_from_a_chest():
    head_part = head_check(ellipse_mask(160, 200), SPACING)
    assert head_part.is_head and head_part.verdict == "head" and not head_part.warnings
    assert head_part.width_mm == pytest.approx(162, abs=2) and head_part.depth_mm == pytest.approx(202, abs=2)
    chest = head_check(ellipse_mask(320, 230), SPACING)
    assert not chest.is_head and "322 mm wide" in chest.verdict and "wider than deep" in chest.verdict


def test_head_check_counts_the_air_inside_a_ct():
    body = ellipse_mask(160, 200, shape=(200, 200, 16))
    x, y = np.ogrid[:200, :200]
    hu = np.where(body, 40.0, -1000.0)
    hu[np.repeat((np.hypot(x - 100, y - 100) <= 15)[:, :, None], 16, axis=2)] = -800.0  # sinuses: 90 cm3
    part = head_check(body, SPACING, hu)
    assert part.is_head and part.air_cm3 == pytest.approx(90, rel=0.1)
    hu[np.repeat((np.hypot(x - 100, y - 100) <= 35)[:, :, None], 16, axis=2)] = -800.0  # lungs: 493 cm3
    assert "493 cm3 of air inside" in head_check(body, SPACING, hu).verdict


def test_head_check_warns_about_a_cut_field_of_view_and_a_mask_filling_the_image():
    assert any("fills 100 %" in w for w in head_check(np.ones((100, 100, 3), dtype=bool), SPACING).warnings)
    cut = ellipse_mask(160, 200)[:, 70:]
    assert any("field of view cuts it" in w for w in head_check(cut, SPACING).warnings)
    assert head_check(np.zeros((10, 10, 2), dtype=bool), SPACING).verdict == "not a head: no body in the mask"
