"""The pure helpers of benchmarks/real_scans.py on tiny synthetic data.

Cormack -> HU (the Clinical toolbox's c2h), the InVesalius .inv3 reader, the DICOM-series copy, and
the prototype fixes of issue 21: a body mask that leaves out holders and frames, air outside the
body, the tile-cut report and the head-or-not check.
"""
from __future__ import annotations

import gzip
import io
import plistlib
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scans as rs  # noqa: E402

SPACING = (2.0, 2.0, 2.0)


def toolbox_h2c(hu: np.ndarray) -> np.ndarray:
    """Hounsfield -> Cormack as the 2012 Clinical toolbox (h2csub): air at 0, -124..76 HU stretched 11-fold."""
    v = np.asarray(hu, dtype=np.float64) + 1024.0
    extra = np.clip(v - 900.0, 0.0, 200.0)
    return v + 10.0 * extra


def test_cormack_to_hu_values():
    cormack = np.array([0.0, 900.0, 2594.0, 3100.0, 3794.0])
    np.testing.assert_allclose(rs.cormack_to_hu(cormack), [-1024.0, -124.0, 30.0, 76.0, 770.0], atol=1e-9)


def test_cormack_to_hu_inverts_the_toolbox_h2c():
    hu = np.arange(-1024.0, 2500.0, 0.5)
    np.testing.assert_allclose(rs.cormack_to_hu(toolbox_h2c(hu)), hu, atol=1e-9)


def test_cormack_to_hu_refuses_negative_values():
    with pytest.raises(ValueError, match="negative"):
        rs.cormack_to_hu(np.array([-1.0, 10.0]))


def write_inv3(path: Path, zyx: np.ndarray, spacing=(0.5, 0.6, 2.0), matrix_bytes: bytes | None = None) -> None:
    main = {"matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": list(zyx.shape)},
            "spacing": list(spacing), "modality": "CT", "name": "tiny"}
    data = zyx.astype("<i2").tobytes() if matrix_bytes is None else matrix_bytes
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, payload in (("tmpabc/main.plist", plistlib.dumps(main)), ("tmpabc/matrix.dat", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    path.write_bytes(gzip.compress(buffer.getvalue()))


def test_read_inv3_gives_x_y_z_with_a_left_anterior_superior_affine(tmp_path):
    zyx = np.zeros((3, 4, 5), dtype=np.int16)
    zyx[2, 1, 4] = 700  # slice 2 (superior), row 1 (posterior: rows run bottom-up), column 4 (patient's left)
    write_inv3(tmp_path / "tiny.inv3", zyx)
    volume, affine, main = rs.read_inv3(tmp_path / "tiny.inv3")
    assert volume.shape == (5, 4, 3) and volume[4, 1, 2] == 700 and volume.sum() == 700
    np.testing.assert_allclose(np.diag(affine), [-0.5, 0.6, 2.0, 1.0])
    np.testing.assert_allclose(affine[:3, :3] @ ((np.array(volume.shape) - 1) / 2) + affine[:3, 3], 0.0, atol=1e-12)
    import nibabel as nib

    assert nib.aff2axcodes(affine) == ("L", "A", "S") and main["name"] == "tiny"


def test_read_inv3_refuses_a_truncated_matrix(tmp_path):
    write_inv3(tmp_path / "bad.inv3", np.zeros((3, 4, 5), np.int16), matrix_bytes=b"\0" * 10)
    with pytest.raises(rs.FetchError, match="holds 10 bytes"):
        rs.read_inv3(tmp_path / "bad.inv3")


def test_dicom_series_reads_back_as_the_same_volume_in_the_same_place(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 2000, size=(6, 5, 4)).astype(np.int16)
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    rs.write_ct_dicom_series(tmp_path / "series", hu, affine, "tiny")
    assert len(list((tmp_path / "series").glob("*.dcm"))) == 4
    nifti = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(nifti))
    from_dicom, dicom_affine = rs.load_ras(tmp_path / "series")
    from_nifti, nifti_affine = rs.load_ras(nifti)
    np.testing.assert_array_equal(from_dicom, from_nifti)
    np.testing.assert_allclose(dicom_affine, nifti_affine, atol=1e-5)


def head_ct(n: int = 96, slices: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Air with a solid elliptic-cylinder 'head' (40 HU, 120 x 150 mm at 2 mm) and its true mask."""
    x, y = np.ogrid[:n, :n]
    head2d = ((x - n // 2) / 30.0) ** 2 + ((y - n // 2) / 37.0) ** 2 <= 1.0
    head = np.repeat(head2d[:, :, None], slices, axis=2)
    return np.where(head, 40.0, -1000.0).astype(np.float32), head


def test_body_mask_leaves_out_a_head_holder_touching_the_head():
    from scipy import ndimage

    hu, head = head_ct(slices=48)  # 96 mm of head: each arm of the cradle is ~45 cm3 (an ear ~10 cm3 is given back)
    x, y = np.ogrid[:96, :96]
    radius = np.hypot(x - 48.0, y - 61.0)  # a cradle of 100 mm radius under the back of the head (y = 11) ...
    cradle = (radius >= 50) & (radius < 52) & (y < 40)  # ... 4 mm thick
    holder = np.repeat(cradle[:, :, None], hu.shape[2], axis=2) & ~head
    assert (ndimage.binary_dilation(head) & holder).any()  # it touches
    hu[holder] = 300.0
    _, transforms = rs._medcycle()
    today = transforms.compute_body_mask(hu, threshold=rs.CT_TISSUE_HU)
    proposed = rs.holder_free_body_mask(hu, SPACING, "ct")
    assert (today & holder).sum() > 0.9 * holder.sum()  # what medcycle does today
    assert (proposed & holder).sum() < 0.15 * holder.sum()  # the contact zone (gap under a voxel) stays
    assert (proposed & head).sum() > 0.99 * head.sum()


def test_body_mask_does_not_fill_the_inside_of_a_frame_ring():
    hu, head = head_ct()
    ring = np.zeros(hu.shape, dtype=bool)
    ring[1:95, 1:95, :3] = True
    ring[5:91, 5:91, :3] = False  # an 8 mm ring around the head on the lowest slices ...
    ring[47:49, 5:12, :3] = True  # ... pinned to it with a 4 mm pin
    ring &= ~head
    hu[ring] = 1500.0
    _, transforms = rs._medcycle()
    today = transforms.compute_body_mask(hu, threshold=rs.CT_TISSUE_HU)
    proposed = rs.holder_free_body_mask(hu, SPACING, "ct")
    outside = ~head
    assert (today & outside).sum() > 5000  # the ring and the air it encloses
    assert (proposed & outside).sum() < 20 and (proposed & head).sum() > 0.99 * head.sum()


def test_body_mask_of_an_mr_without_devices_is_todays():
    _, head = head_ct()
    x, y = np.ogrid[:96, :96]

    def ellipse(a: float, b: float) -> np.ndarray:
        return np.repeat((((x - 48) / a) ** 2 + ((y - 48) / b) ** 2 <= 1.0)[:, :, None], 12, axis=2)

    mr = np.zeros(head.shape, dtype=np.float32)
    mr[head] = 300.0  # scalp
    mr[ellipse(27.0, 34.0)] = 5.0  # dark skull
    mr[ellipse(25.0, 32.0)] = 200.0  # brain
    _, transforms = rs._medcycle()
    today = transforms.compute_body_mask(mr)
    proposed = rs.holder_free_body_mask(mr, SPACING, "mr")
    assert (today & head).sum() == head.sum()
    np.testing.assert_array_equal(proposed, today)


def test_air_outside_body_sets_every_voxel_outside_the_mask_to_the_background():
    image = np.full((4, 4, 2), 0.5, dtype=np.float32)
    mask = np.zeros((4, 4, 2), dtype=bool)
    mask[1:3, 1:3] = True
    out = rs.air_outside_body(image, mask)
    assert (out[mask] == 0.5).all() and (out[~mask] == -1.0).all() and (image == 0.5).all()


def test_tile_cut_report_counts_the_body_outside_the_window():
    mask = np.zeros((20, 20, 2), dtype=bool)
    mask[2:12, 5:15, :] = True  # 10 x 10 px body
    report = rs.tile_cut_report(mask, start=(5, 5), size=10, slices=[0], spacing=(2.0, 2.0, 3.0))
    assert report["cut_in_plane_percent"] == pytest.approx(30.0)  # columns 2-4 of 10 lie left of the window
    assert report["cut_slices_percent"] == pytest.approx(50.0)  # slice 1 is not kept
    assert report["overhang_mm"] == {"left": 6.0, "right": 0.0, "posterior": 0.0, "anterior": 0.0}
    assert report["extent_mm"] == (20.0, 20.0) and report["tile_px_needed"] == 16


def ellipse_mask(width_mm: float, depth_mm: float, shape=(200, 200, 4), spacing=2.0) -> np.ndarray:
    x, y = np.ogrid[: shape[0], : shape[1]]
    inside = ((x - 100) * spacing / (width_mm / 2)) ** 2 + ((y - 100) * spacing / (depth_mm / 2)) ** 2 <= 1.0
    return np.repeat(inside[:, :, None], shape[2], axis=2)


def test_body_part_check_tells_a_head_from_a_chest():
    head = rs.body_part_check(ellipse_mask(160, 200), SPACING)
    assert head.verdict == "head" and not head.warnings
    chest = rs.body_part_check(ellipse_mask(320, 230), SPACING)
    assert chest.verdict.startswith("not a head") and "322 mm wide" in chest.verdict and "wider than deep" in chest.verdict
    body = ellipse_mask(160, 200, shape=(200, 200, 16))
    x, y = np.ogrid[:200, :200]
    hu = np.where(body, 40.0, -1000.0)
    hu[np.repeat((np.hypot(x - 100, y - 100) <= 15)[:, :, None], 16, axis=2)] = -800.0  # sinuses: 90 cm3
    assert rs.body_part_check(body, SPACING, hu).verdict == "head"
    hu[np.repeat((np.hypot(x - 100, y - 100) <= 35)[:, :, None], 16, axis=2)] = -800.0  # lungs: 493 cm3
    assert "493 cm3 of air inside" in rs.body_part_check(body, SPACING, hu).verdict


def test_body_part_check_warns_about_a_mask_that_fills_the_image():
    whole = np.ones((100, 100, 3), dtype=bool)
    assert any("fills 100 %" in w for w in rs.body_part_check(whole, SPACING).warnings)
