"""The pure helpers of benchmarks/real_scans.py on tiny synthetic data.

Cormack -> HU (the Clinical toolbox's c2h), the InVesalius .inv3 reader and the DICOM-series copy.
The fixes the first phase prototyped here now live in medcycle (tests/test_body_mask.py: holders,
frames, truncated fields of view, extreme voxels, the head check; tests/test_transforms.py: air
outside the body in the tiles, what a tile cuts).
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


def test_real_anatomy_resamples_through_world_space_and_scores_bone_and_brain():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_anatomy as ra

    values = np.zeros((4, 4, 4), dtype=np.float32)
    values[1, 2, 3] = 8.0
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    out = ra.resample_onto(values, coarse, (8, 8, 8), fine, order=0, cval=-1.0)
    assert out[2, 4, 6] == 8.0 and out[4, 4, 4] == 0.0  # voxel (1, 2, 3) of the 2 mm grid lies at (2, 4, 6) mm
    assert out[7, 7, 7] == -1.0  # beyond the 2 mm grid: cval
    head = np.zeros((10, 10, 10), dtype=bool)
    head[1:9, 1:9, 1:9] = True
    brain = np.zeros_like(head)
    brain[3:7, 3:7, 3:7] = True
    template = np.where(head, 30.0, -1000.0).astype(np.float32)
    template[1, 1:9, 1:9] = 700.0  # a bone plate
    sct = template.copy()
    sct[3, 3:7, 3:7] = 400.0  # "bone" in the brain: 16 of its 64 voxels
    cranium = head.copy()
    cranium[:, :, :5] = False  # above a level: the false bone's lower half and the plate's lower half are out
    ref = {"head": head, "brain": brain, "cranium": cranium, "template": template, "spacing": (1.0, 1.0, 1.0)}
    result = ra.figures(sct, ref)
    bone_ref, bone_sct = 64, 64 + 16
    assert result["bone_dice"] == pytest.approx(2 * 64 / (bone_ref + bone_sct))
    assert result["cranial_bone_dice"] == pytest.approx(2 * 32 / (32 + 32 + 8))
    assert result["face_bone_dice"] == pytest.approx(2 * 32 / (32 + 32 + 8))  # the other halves, below the level
    assert result["bone_cm3"] == pytest.approx(bone_sct / 1000.0)  # 1 mm voxels
    assert result["brain_bone_percent"] == pytest.approx(25.0) and result["brain_median_hu"] == pytest.approx(30.0)
    assert result["mae_head_hu"] == pytest.approx(16 * 370.0 / head.sum())


def _skull_head(shape: tuple[int, int, int], affine: np.ndarray, scale: float, shift_mm: np.ndarray) -> np.ndarray:
    """HU of an ellipsoidal head (soft tissue, a 6 mm skull, a dark block at one side so the pose is unique),
    `scale` times the reference size, moved by `shift_mm`, sampled on (shape, affine)."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = (affine[:3, :3] @ index + affine[:3, 3:4]).reshape((3,) + shape)
    x, y, z = ((world[i] - shift_mm[i]) / scale for i in range(3))
    radius = np.sqrt((x / 30.0) ** 2 + (y / 38.0) ** 2 + (z / 34.0) ** 2)
    hu = np.where(radius < 1.0, 40.0, -1000.0)
    hu[(radius > 0.80) & (radius < 0.95)] = 1200.0
    hu[(radius < 0.6) & (x > 5.0) & (y > 10.0)] = -1000.0  # an air cavity off the centre: breaks the symmetry
    return hu.astype(np.float32)


def test_a_real_ct_is_registered_affinely_onto_the_template_without_its_head_holder(tmp_path):
    """The figures' ceiling row: a head CT on another grid, 8 % larger, moved, with a bone-bright head holder
    below it, lands on the template's skull once registered (holder removed), and only then."""
    import nibabel as nib
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_anatomy as ra

    template_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    template_affine[:3, 3] = -48.0
    template = _skull_head((33, 33, 33), template_affine, 1.0, np.zeros(3))
    ct_affine = np.diag([2.5, 2.5, 3.5, 1.0])
    ct_affine[:3, 3] = (-60.0, -60.0, -55.0)
    ct = _skull_head((48, 48, 32), ct_affine, 1.08, np.array([6.0, -5.0, 4.0]))
    ct[:, 2:4, :] = 1500.0  # a plate under the head, touching nothing: not body
    nib.save(nib.Nifti1Image(template, template_affine), str(tmp_path / "template.nii.gz"))
    nib.save(nib.Nifti1Image(ct, ct_affine), str(tmp_path / "ct.nii.gz"))

    warped, affine, metric = ra.register_onto_template(tmp_path / "ct.nii.gz", tmp_path / "template.nii.gz")
    np.testing.assert_array_equal(affine, template_affine)
    assert warped.shape == template.shape and metric < 0
    bone = template >= 300
    unregistered = ra.resample_onto(ct, ct_affine, template.shape, template_affine, order=1, cval=-1024.0)
    assert ra.dice(np.nan_to_num(warped, nan=-1024.0) >= 300, bone) > 0.8
    assert ra.dice(unregistered >= 300, bone) < 0.5
    from scipy import ndimage
    around_head = ndimage.binary_dilation(template > -500, iterations=1)
    assert not ((np.nan_to_num(warped, nan=-1024.0) >= 300) & ~around_head).any()  # no holder: air outside the head
