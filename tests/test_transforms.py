"""medcycle.transforms: body mask, MR/CT normalisation, the shared volume chain, its inverse, tiles."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

from helpers import oblique_lps_affine, synthetic_head
from helpers import write_nifti as write
from medcycle.config import DataConfig
from medcycle.errors import InputError
from medcycle.transforms import (
    BodyMaskd,
    HUCodec,
    LoadVolumed,
    NormalizeMRd,
    compute_body_mask,
    extract_tiles,
    plan_tiles,
    to_input_grid,
    volume_transforms,
)

def tiny_cfg(**changes) -> DataConfig:
    values = dict(spacing=(1.0, 1.0), tile_size=32, context_slices=1, min_body_fraction=0.05)
    values.update(changes)
    return DataConfig(**values)


# --------------------------------------------------------------------------------------------------
# body mask


@pytest.mark.parametrize("factor", [1, 2])
def test_body_mask_keeps_dark_bone_and_sinus_and_drops_background_noise(factor):
    mr, _, body, skull, sinus = synthetic_head(shape=(48, 44, 14))
    mask = compute_body_mask(mr, in_plane_factor=factor)
    assert mask.dtype == bool
    assert mask[skull].mean() > 0.99  # dark cortical bone inside the head
    assert mask[sinus].all()  # air inside the head
    dice = 2 * (mask & body).sum() / (mask.sum() + body.sum())
    assert dice > 0.95
    from scipy import ndimage

    far = ~ndimage.binary_dilation(body, iterations=2)
    assert not mask[far].any()  # background noise is never body


def test_body_mask_of_noise_only_background_and_empty_volume():
    assert not compute_body_mask(np.zeros((8, 8, 4), dtype=np.float32)).any()
    mr, _, body, _, _ = synthetic_head(noise=40.0)
    mask = compute_body_mask(mr)
    assert (mask & body).sum() / body.sum() > 0.97 and (mask & ~body).sum() / body.sum() < 0.1


def test_body_mask_from_ct_for_a_ct_only_case():
    _, ct, body, skull, sinus = synthetic_head()
    tensor = MetaTensor(torch.from_numpy(ct[None]), affine=torch.eye(4))
    out = BodyMaskd(source_keys=("mr", "ct"))({"ct": tensor})
    mask = out["mask"].numpy()[0] > 0
    assert mask[skull].all() and mask[sinus].all()
    assert 2 * (mask & body).sum() / (mask.sum() + body.sum()) > 0.95
    assert out["mask"].meta["mask_source"] == "computed from ct"


def test_given_mask_is_binarised_and_an_empty_one_refused(tmp_path):
    values = np.zeros((1, 6, 6, 4), dtype=np.float32)
    values[0, 1:4, 1:4, 1:3] = 7.0
    given = MetaTensor(torch.from_numpy(values), affine=torch.eye(4), meta={"filename_or_obj": "m.nii.gz"})
    image = MetaTensor(torch.rand(1, 6, 6, 4), affine=torch.eye(4))
    out = BodyMaskd()({"mr": image, "mask": given})
    assert set(np.unique(out["mask"].numpy())) == {0.0, 1.0}
    np.testing.assert_array_equal(out["mask"].numpy() > 0, values > 0)
    empty = MetaTensor(torch.zeros(1, 6, 6, 4), affine=torch.eye(4), meta={"filename_or_obj": "empty_mask.nii.gz"})
    with pytest.raises(InputError, match="empty_mask.nii.gz: the mask is empty"):
        BodyMaskd()({"mr": image, "mask": empty})


# --------------------------------------------------------------------------------------------------
# intensities


def test_mr_normalisation_uses_percentiles_inside_the_body():
    mr, _, body, _, _ = synthetic_head()
    mask = MetaTensor(torch.from_numpy(body[None].astype(np.float32)), affine=torch.eye(4))
    image = MetaTensor(torch.from_numpy(mr[None]), affine=torch.eye(4))
    out = NormalizeMRd("mr", percentiles=(1.0, 99.0))({"mr": image, "mask": mask})["mr"]
    low, high = np.percentile(mr[body], [1.0, 99.0])
    assert out.meta["mr_low"] == pytest.approx(low) and out.meta["mr_high"] == pytest.approx(high)
    expected = np.clip(2.0 * (mr - low) / (high - low) - 1.0, -1.0, 1.0)
    np.testing.assert_allclose(out.numpy()[0], expected, atol=1e-5)
    assert out.numpy().min() >= -1.0 and out.numpy().max() <= 1.0
    assert out.dtype == torch.float32
    # the background does not move the mapping: brighter noise outside the body, same result inside
    noisy = mr.copy()
    noisy[~body] += 300.0
    again = NormalizeMRd("mr", percentiles=(1.0, 99.0))({"mr": MetaTensor(torch.from_numpy(noisy[None])), "mask": mask})["mr"]
    assert again.meta["mr_low"] == pytest.approx(low) and again.meta["mr_high"] == pytest.approx(high)


def test_ct_window_mapping_exact_at_lo_and_hi(tmp_path):
    lo, hi = -1024.0, 3000.0
    ct = np.full((8, 8, 4), 40.0, dtype=np.float32)
    ct[0, 0, 0], ct[1, 0, 0], ct[2, 0, 0], ct[3, 0, 0], ct[4, 0, 0] = lo, hi, -3000.0, 5000.0, (lo + hi) / 2
    ct[2:6, 2:6, :] = 60.0
    ct[7, :, :] = -1000.0  # air around the head: a CT in HU (the modality check refuses a CT without any)
    path = write(tmp_path / "ct.nii.gz", ct, np.eye(4))
    out = volume_transforms(tiny_cfg(ct_window=(lo, hi)), ["ct"])({"ct": str(path)})["ct"].numpy()[0]
    assert out[0, 0, 0] == -1.0 and out[1, 0, 0] == 1.0  # exact
    assert out[2, 0, 0] == -1.0 and out[3, 0, 0] == 1.0  # clipped
    assert out[4, 0, 0] == pytest.approx(0.0, abs=1e-6)
    assert out[6, 6, 1] == pytest.approx(2 * (40.0 - lo) / (hi - lo) - 1, abs=1e-6)


KNOTS = ((-200.0, -0.85), (200.0, -0.3))


def test_ct_knots_move_each_knot_to_its_value_and_the_codec_inverts_the_chain(tmp_path):
    hu = np.array([-3000.0, -1024.0, -600.0, -200.0, -100.0, 0.0, 40.0, 200.0, 1600.0, 3000.0, 5000.0], dtype=np.float32)
    ct = np.zeros((len(hu), 2, 2), dtype=np.float32) + hu[:, None, None]
    path = write(tmp_path / "ct.nii.gz", ct, np.eye(4))
    cfg = tiny_cfg(ct_knots=KNOTS)
    out = volume_transforms(cfg, ["ct"])({"ct": str(path)})["ct"]
    values = out.numpy()[0, :, 0, 0]
    # by hand: -1024 -> -1, -200 -> -0.85, 200 -> -0.3, 3000 -> 1, linear in between; clipped outside
    expected = [-1.0, -1.0, -1.0 + 0.15 * 424 / 824, -0.85, -0.85 + 0.55 * 100 / 400, -0.575, -0.52, -0.3,
                -0.3 + 1.3 * 1400 / 2800, 1.0, 1.0]
    np.testing.assert_allclose(values, expected, atol=1e-5)
    # the soft-tissue layers fat (-100) and skin (40) lie (0.55 / 400) / (2 / 4024) = 2.77x further apart than linearly
    linear = volume_transforms(tiny_cfg(), ["ct"])({"ct": str(path)})["ct"].numpy()[0, :, 0, 0]
    assert (values[6] - values[4]) == pytest.approx(0.55 / 400 / (2 / 4024) * (linear[6] - linear[4]), rel=1e-4)
    back = HUCodec.from_config(cfg).decode(out.numpy())[0, :, 0, 0]
    np.testing.assert_allclose(back, np.clip(hu, -1024, 3000), atol=0.05)
    np.testing.assert_allclose(HUCodec.from_config(tiny_cfg()).decode(linear), np.clip(hu, -1024, 3000), atol=0.05)


def test_ct_knots_of_three_segments_inside_the_window(tmp_path):
    # the demo's curve: bone up to 1800 HU stretched over -0.3..0.9, the rare 1800..3000 HU squeezed into 0.9..1
    hu = np.array([-1024.0, 0.0, 600.0, 1000.0, 1800.0, 2400.0, 3000.0], dtype=np.float32)
    path = write(tmp_path / "ct.nii.gz", np.zeros((len(hu), 2, 2), dtype=np.float32) + hu[:, None, None], np.eye(4))
    cfg = tiny_cfg(ct_knots=((-200.0, -0.85), (200.0, -0.3), (1800.0, 0.9)))
    out = volume_transforms(cfg, ["ct"])({"ct": str(path)})["ct"]
    np.testing.assert_allclose(out.numpy()[0, :, 0, 0], [-1.0, -0.575, 0.0, 0.3, 0.9, 0.95, 1.0], atol=1e-5)
    np.testing.assert_allclose(HUCodec.from_config(cfg).decode(out.numpy())[0, :, 0, 0], hu, atol=0.05)


# --------------------------------------------------------------------------------------------------
# the shared chain


def test_load_volumed_gives_a_float32_metatensor_with_ras_affine_and_filename(tmp_path):
    mr, _, _, _, _ = synthetic_head()
    affine = oblique_lps_affine()
    path = write(tmp_path / "mr.nii.gz", mr, affine, dtype=np.int16)
    out = LoadVolumed(["mr"])({"mr": str(path)})["mr"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, *mr.shape)
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-5)
    assert out.meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(out.numpy()[0], mr.astype(np.int16))


def test_volume_chain_orients_resamples_in_plane_and_keeps_slice_spacing(tmp_path):
    mr, ct, _, _, _ = synthetic_head()
    affine = oblique_lps_affine()
    data = {"mr": str(write(tmp_path / "mr.nii.gz", mr, affine)), "ct": str(write(tmp_path / "ct.nii.gz", ct, affine))}
    cfg = tiny_cfg(spacing=(1.25, 1.0))
    out = volume_transforms(cfg, ["mr", "ct"])(data)
    assert set(out) >= {"mr", "ct", "mask"}
    mr_out, ct_out, mask = out["mr"], out["ct"], out["mask"]
    assert nib.aff2axcodes(mr_out.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(mr_out.affine.numpy()[:3, :3], axis=0), (1.25, 1.0, 3.0), atol=1e-5)
    assert mr_out.shape[-1] == mr.shape[-1]  # every slice kept
    for tensor in (ct_out, mask):  # one grid for all
        assert tensor.shape == mr_out.shape
        np.testing.assert_allclose(tensor.affine.numpy(), mr_out.affine.numpy(), atol=1e-6)
    assert mr_out.numpy().min() >= -1 and mr_out.numpy().max() <= 1 and ct_out.numpy().min() >= -1
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0}
    assert {"mr_low", "mr_high"} <= set(mr_out.meta)


def test_volume_chain_works_with_mr_only_and_with_a_given_mask(tmp_path):
    mr, _, body, _, _ = synthetic_head()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    mr_path = write(tmp_path / "mr.nii.gz", mr, affine)
    only = volume_transforms(tiny_cfg(), ["mr"])({"mr": str(mr_path)})
    assert "mask" in only and only["mask"].numpy().any()
    mask_path = write(tmp_path / "mask.nii.gz", body * 5, affine, dtype=np.uint8)
    given = volume_transforms(tiny_cfg(), ["mr", "mask"])({"mr": str(mr_path), "mask": str(mask_path)})
    np.testing.assert_array_equal(given["mask"].numpy()[0] > 0, body)
    assert given["mask"].meta["mask_source"] == "given"


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_ct_on_another_grid_refused_naming_the_ct(tmp_path, mismatch):
    mr, ct, _, _, _ = synthetic_head()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    mr_path = write(tmp_path / "mr.nii.gz", mr, affine)
    if mismatch == "shape":
        ct_path = write(tmp_path / "ct.nii.gz", ct[:-2], affine)
    else:
        moved = affine.copy()
        moved[0, 3] = 5.0
        ct_path = write(tmp_path / "ct.nii.gz", ct, moved)
    with pytest.raises(InputError) as info:
        volume_transforms(tiny_cfg(), ["mr", "ct"])({"mr": str(mr_path), "ct": str(ct_path)})
    assert str(info.value).startswith(str(ct_path))


def test_mask_on_another_grid_refused_naming_the_mask(tmp_path):
    mr, _, body, _, _ = synthetic_head()
    mr_path = write(tmp_path / "mr.nii.gz", mr, np.eye(4))
    mask_path = write(tmp_path / "mask.nii.gz", body[:, :, :-1], np.eye(4), dtype=np.uint8)
    with pytest.raises(InputError, match="mask.nii.gz"):
        volume_transforms(tiny_cfg(), ["mr", "mask"])({"mr": str(mr_path), "mask": str(mask_path)})


def test_unreadable_input_refused_naming_the_file(tmp_path):
    bad = tmp_path / "mr.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="mr.nii.gz"):
        volume_transforms(tiny_cfg(), ["mr"])({"mr": str(bad)})


@pytest.mark.parametrize("affine", [oblique_lps_affine(), np.diag([-1.3, 0.7, 2.5, 1.0])], ids=["oblique_lps", "anisotropic"])
def test_result_on_the_model_grid_maps_back_onto_the_original_grid(tmp_path, affine):
    mr, _, _, _, _ = synthetic_head(shape=(30, 26, 8))
    path = write(tmp_path / "mr.nii.gz", mr, affine)
    model = volume_transforms(tiny_cfg(spacing=(1.0, 1.0)), ["mr"])({"mr": str(path)})["mr"]
    assert tuple(model.shape[1:]) != mr.shape  # really resampled
    sct = model.as_tensor().clone() * 0.5  # a stand-in result of the generator on the model grid
    back = to_input_grid(sct, model.affine, model)
    assert back.shape == mr.shape
    # the same as MONAI's ResampleToMatch onto the file's own grid
    original = LoadVolumed(["mr"])({"mr": str(path)})["mr"]
    source = MetaTensor(sct, affine=model.affine.clone())
    expected = ResampleToMatch(mode="bilinear", padding_mode="border", dtype=torch.float32)(source, img_dst=original)
    np.testing.assert_allclose(np.asarray(expected.affine, dtype=np.float64), affine, atol=1e-4)
    np.testing.assert_allclose(back, expected.numpy()[0], atol=1e-5)
    # and the values are those of the model grid (the MR, normalised and halved): a smooth region agrees
    reference = np.clip(2 * (mr - model.meta["mr_low"]) / (model.meta["mr_high"] - model.meta["mr_low"]) - 1, -1, 1) * 0.5
    centre = (slice(12, 18), slice(10, 16), slice(2, 6))
    np.testing.assert_allclose(back[centre].mean(), reference[centre].mean(), atol=0.05)


# --------------------------------------------------------------------------------------------------
# tiles


def _slab_volume(shape=(20, 18, 9)):
    """Slice z holds the value z / 10 inside the body; body only in slices 2..6, off-centre in-plane."""
    image = np.full(shape, -1.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.float32)
    mask[3:15, 2:12, 2:7] = 1
    for z in range(shape[2]):
        image[..., z][mask[..., z] > 0] = z / 10.0
    return image, mask


def test_tiles_shapes_types_and_dropped_empty_slices():
    image, mask = _slab_volume()
    cfg = tiny_cfg(tile_size=16, min_body_fraction=0.1)
    tiles, mask_tiles, slices = extract_tiles(image[None], mask[None], cfg)
    np.testing.assert_array_equal(slices, [2, 3, 4, 5, 6])
    assert tiles.shape == (5, 1, 16, 16) and tiles.dtype == np.float16
    assert mask_tiles.shape == (5, 1, 16, 16) and mask_tiles.dtype == np.uint8
    for n, z in enumerate(slices):
        assert mask_tiles[n, 0].sum() == 12 * 10  # the whole body inside the tile
        np.testing.assert_allclose(tiles[n, 0][mask_tiles[n, 0] > 0], z / 10.0, atol=1e-3)


def test_tile_is_centred_on_the_body_and_padded_with_background():
    image, mask = _slab_volume()
    cfg = tiny_cfg(tile_size=32, min_body_fraction=0.05)
    plan = plan_tiles(mask, cfg)
    assert plan.start == ((3 + 15) // 2 - 16, (2 + 12) // 2 - 16)
    tiles, mask_tiles, _ = extract_tiles(image, mask, cfg)
    rows, cols = np.nonzero(mask_tiles[0, 0])
    assert (rows.min() + rows.max() + 1) // 2 == 16 and (cols.min() + cols.max() + 1) // 2 == 16
    assert tiles[0, 0, 0, 0] == -1.0 and tiles[0, 0, -1, -1] == -1.0  # padding = background


def test_what_lies_outside_the_body_is_air_in_every_tile_and_channel():
    image, mask = _slab_volume()
    holder = np.zeros(mask.shape, dtype=bool)
    holder[3:15, 13:15, :] = True  # a head holder behind the body, outside the mask, on every slice
    image[holder] = 0.5
    cfg = tiny_cfg(tile_size=16, context_slices=3, min_body_fraction=0.1)
    tiles, mask_tiles, slices = extract_tiles({"mr": image, "ct": image}, mask, cfg)
    plan = plan_tiles(mask, cfg)
    from medcycle.transforms.tiling import window

    body = window(mask, plan.start, 16, 0.0)
    for key in ("mr", "ct"):
        for n, z in enumerate(slices):
            for j in range(3):  # channel j holds slice z - 1 + j: outside that slice's body everything is -1
                source = int(np.clip(z - 1 + j, 0, mask.shape[2] - 1))
                channel, own = tiles[key][n, j].astype(np.float32), body[:, :, source] > 0
                assert (channel[~own] == -1.0).all()
                np.testing.assert_allclose(channel[own], source / 10.0, atol=1e-3)
    assert image[holder].min() == 0.5  # the input is not changed


def test_plan_tiles_says_what_the_tile_cuts_and_what_would_hold_the_body():
    mask = np.zeros((40, 30, 4), dtype=np.float32)
    mask[5:35, 10:20, :] = 1  # a body 30 px (60 mm at 2 mm) left-right, 10 px front-back
    cfg = tiny_cfg(tile_size=20, spacing=(2.0, 2.0), orientation="RAS", min_body_fraction=0.0)
    plan = plan_tiles(mask, cfg)
    assert plan.cut_fraction == pytest.approx(10 / 30) and plan.dropped_fraction == 0.0
    assert plan.overhang_mm == {"left": 10.0, "right": 10.0, "posterior": 0.0, "anterior": 0.0}
    assert plan.extent_mm == (60.0, 20.0) and plan.size_needed() == 32
    warning = plan.cut_warning()
    assert "leaves 33.3 % of the body out (10 mm left, 10 mm right)" in warning
    assert "data.tile_size=32" in warning and "data.spacing=3.00" in warning
    lps = plan_tiles(mask, tiny_cfg(tile_size=20, spacing=(2.0, 2.0), orientation="LPS", min_body_fraction=0.0))
    assert set(lps.overhang_mm) == {"left", "right", "anterior", "posterior"}
    held = plan_tiles(mask, tiny_cfg(tile_size=32, spacing=(2.0, 2.0), min_body_fraction=0.0))
    assert held.cut_fraction == 0.0 and held.cut_warning() is None
    mask[:, :, 0] = 0
    mask[20, 15, 0] = 1  # one voxel on slice 0: a tile with too little body there, dropped
    dropped = plan_tiles(mask, tiny_cfg(tile_size=32, spacing=(2.0, 2.0), min_body_fraction=0.05))
    assert list(dropped.slices) == [1, 2, 3] and dropped.dropped_fraction == pytest.approx(1 / 901)


def test_25d_channels_are_neighbouring_slices_centre_is_the_slice_edges_replicated():
    image, mask = _slab_volume()
    mask[:] = 0
    mask[3:15, 2:12, :] = 1  # body in every slice
    for z in range(image.shape[2]):
        image[..., z] = z / 10.0
    cfg = tiny_cfg(tile_size=16, context_slices=5, min_body_fraction=0.1)
    tiles, _, slices = extract_tiles(image, mask, cfg)
    assert tiles.shape == (image.shape[2], 5, 16, 16)
    last = image.shape[2] - 1
    for n, z in enumerate(slices):
        for j in range(5):
            expected = min(max(z - 2 + j, 0), last) / 10.0
            np.testing.assert_allclose(tiles[n, j, 8, 8], expected, atol=1e-3)
        np.testing.assert_allclose(tiles[n, 2, 8, 8], z / 10.0, atol=1e-3)  # centre channel = the slice


def test_paired_tiles_share_slices_and_crop():
    image, mask = _slab_volume()
    other = image * -0.5
    cfg = tiny_cfg(tile_size=16, context_slices=3, min_body_fraction=0.1)
    tiles, mask_tiles, slices = extract_tiles({"mr": image, "ct": other}, mask, cfg)
    assert set(tiles) == {"mr", "ct"}
    assert tiles["mr"].shape == tiles["ct"].shape == (len(slices), 3, 16, 16)
    mr = tiles["mr"].astype(np.float32)
    outside = mr == -1.0  # each channel's own slice outside the body (the body holds values >= 0.2)
    assert outside.any() and not outside.all()
    np.testing.assert_allclose(tiles["ct"], np.where(outside, -1.0, -0.5 * mr), atol=1e-3)


def test_no_body_gives_no_tiles():
    image = np.full((10, 10, 4), -1.0, dtype=np.float32)
    tiles, mask_tiles, slices = extract_tiles(image, np.zeros_like(image), tiny_cfg(tile_size=16))
    assert tiles.shape == (0, 1, 16, 16) and mask_tiles.shape == (0, 1, 16, 16) and len(slices) == 0
