"""medcycle.io: volumes keep their exact geometry, and every unusable input is refused naming the file."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from helpers import flipped_affine, oblique_affine, ramp, write_dicom_series, write_mha, write_nifti
from medcycle.errors import InputError
from medcycle.files import atomic_write, file_checksum
from medcycle.image import affine_of, make_image, shape_of, spacing_of, voxels
from medcycle.io import load_volume, save_nifti, sitk_to_ras_affine

def assert_refused(path: Path, *words: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_volume(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    for word in words:
        assert word in message.lower(), message
    return info.value


# --------------------------------------------------------------------------------------------------
# NIfTI round trips


@pytest.mark.parametrize("affine_kind", ["oblique", "flipped", "anisotropic"])
def test_nifti_round_trip_keeps_sform_qform_codes_shape_and_voxel_order(tmp_path, affine_kind):
    affine = {
        "oblique": oblique_affine(),
        "flipped": flipped_affine(),
        "anisotropic": np.diag([0.8, 0.8, 3.0, 1.0]),
    }[affine_kind]
    array = ramp()
    source = write_nifti(tmp_path / "in.nii.gz", array, affine, sform_code=2, qform_code=1)
    volume = load_volume(source)
    assert shape_of(volume) == array.shape
    np.testing.assert_array_equal(voxels(volume), array)  # file voxel order, nothing reoriented
    np.testing.assert_allclose(affine_of(volume), affine, atol=1e-5)
    np.testing.assert_allclose(spacing_of(affine_of(volume)), (0.8, 0.8, 3.0), atol=1e-5)

    out = save_nifti(tmp_path / "out.nii.gz", voxels(volume), like=volume, dtype=np.float32)
    written, original = nib.load(str(out)), nib.load(str(source))
    for getter in ("get_sform", "get_qform"):
        matrix, code = getattr(written.header, getter)(coded=True)
        matrix0, code0 = getattr(original.header, getter)(coded=True)
        assert int(code) == int(code0)
        np.testing.assert_allclose(matrix, matrix0, atol=1e-6)
    assert written.shape == array.shape
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), array)
    again = load_volume(out)
    np.testing.assert_allclose(affine_of(again), affine_of(volume), atol=1e-6)
    np.testing.assert_array_equal(voxels(again), voxels(volume))


def test_nifti_int16_output_is_rounded_and_clipped_not_wrapped(tmp_path):
    array = ramp()
    source = write_nifti(tmp_path / "in.nii", array, oblique_affine())
    volume = load_volume(source)
    values = np.full(array.shape, 40000.0, dtype=np.float32)
    values[0, 0, 0], values[1, 0, 0] = -50000.0, 12.6
    out = save_nifti(tmp_path / "out.nii.gz", values, like=volume, dtype=np.int16)
    data = np.asanyarray(nib.load(str(out)).dataobj)
    assert data.dtype == np.int16
    assert data[0, 0, 0] == -32768 and data[1, 0, 0] == 13 and data[2, 0, 0] == 32767


# --------------------------------------------------------------------------------------------------
# MHA and DICOM


def test_mha_affine_is_simpleitk_geometry_lps_to_ras_and_nifti_from_it_keeps_it(tmp_path):
    affine = oblique_affine(spacing=(0.9, 1.1, 2.5))
    array = ramp()
    path = write_mha(tmp_path / "mr.mha", array, affine)
    image = sitk.ReadImage(str(path))
    # what SimpleITK's geometry implies, computed independently of medcycle: LPS -> RAS flips x, y
    direction = np.array(image.GetDirection()).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(image.GetSpacing())
    expected[:3, 3] = np.array(image.GetOrigin()) * np.array([-1.0, -1.0, 1.0])
    volume = load_volume(path)
    np.testing.assert_allclose(affine_of(volume), expected, atol=1e-6)
    np.testing.assert_allclose(affine_of(volume), affine, atol=1e-5)
    np.testing.assert_allclose(sitk_to_ras_affine(image), expected, atol=1e-9)
    np.testing.assert_array_equal(voxels(volume), array)  # (X, Y, Z) order, as SimpleITK's index

    out = save_nifti(tmp_path / "from_mha.nii.gz", voxels(volume), like=volume, dtype=np.float32)
    written = nib.load(str(out))
    for getter in ("get_sform", "get_qform"):
        matrix, code = getattr(written.header, getter)(coded=True)
        assert int(code) == 1
        np.testing.assert_allclose(matrix, expected, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), array)
    # the world position of a voxel agrees between the MHA (SimpleITK, LPS) and the NIfTI (RAS)
    index = (3, 7, 4)
    lps = np.array(image.TransformIndexToPhysicalPoint(index))
    ras = written.affine @ np.array([*index, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1.0, -1.0, 1.0]), atol=1e-4)


def test_dicom_series_written_with_simpleitk_reads_geometry_and_values(tmp_path):
    affine = oblique_affine(spacing=(0.8, 0.9, 2.5), angles=(10.0, -5.0, 15.0))
    array = np.rint(ramp((12, 10, 6))).astype(np.int16)
    folder = write_dicom_series(tmp_path / "mr", array, affine)
    first = pydicom.dcmread(str(sorted(folder.iterdir())[0]))
    assert first.BitsAllocated == 16 and first.PixelRepresentation == 1
    assert len(first.ImageOrientationPatient) == 6 and len(first.PixelSpacing) == 2
    volume = load_volume(folder)
    assert shape_of(volume) == array.shape
    np.testing.assert_allclose(affine_of(volume), affine, atol=1e-4)
    np.testing.assert_array_equal(voxels(volume), array.astype(np.float32))
    # the affine maps voxel (0, 0, k) to that slice's ImagePositionPatient (LPS -> RAS)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        k = int(ds.InstanceNumber) - 1
        ras = affine_of(volume) @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(ras[:3], np.array(ds.ImagePositionPatient, dtype=float) * [-1, -1, 1], atol=1e-4)


# --------------------------------------------------------------------------------------------------
# refusals, each naming the file


def test_4d_input_refused(tmp_path):
    path = write_nifti(tmp_path / "series.nii.gz", np.random.default_rng(0).random((6, 5, 4, 3)), np.eye(4))
    assert_refused(path, "3d")


def test_4d_with_one_volume_is_a_3d_volume(tmp_path):
    path = write_nifti(tmp_path / "one.nii.gz", ramp()[..., None], np.eye(4))
    assert shape_of(load_volume(path)) == (12, 10, 6)


@pytest.mark.parametrize("shape", [(8, 9), (8, 9, 1)])
def test_2d_input_refused(tmp_path, shape):
    path = write_nifti(tmp_path / "slice.nii.gz", np.random.default_rng(0).random(shape), np.eye(4))
    assert_refused(path, "3d")


def test_2d_mha_refused(tmp_path):
    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9)).astype(np.float32)), str(path))
    assert_refused(path, "3d")


def test_truncated_nifti_gz_refused(tmp_path):
    path = write_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).random((20, 20, 20)), np.eye(4))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    assert_refused(truncated, "truncated")


def test_truncated_uncompressed_nifti_refused(tmp_path):
    path = write_nifti(tmp_path / "full.nii", np.random.default_rng(0).random((20, 20, 20)), np.eye(4))
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(path.read_bytes()[:1000])
    assert_refused(truncated)


def test_text_file_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image\n")
    assert_refused(path, "not a volume")


@pytest.mark.parametrize("name,compress", [("random.nii.gz", False), ("random_gz.nii.gz", True), ("random.mha", False)])
def test_random_bytes_named_as_volume_refused(tmp_path, name, compress):
    data = np.random.default_rng(1).bytes(4096)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if compress else data)
    assert_refused(path)


def test_missing_file_refused(tmp_path):
    assert_refused(tmp_path / "absent.nii.gz", "no such")


def test_constant_volume_refused_but_allowed_for_masks(tmp_path):
    path = write_nifti(tmp_path / "flat.nii.gz", np.full((6, 6, 6), 7.0), np.eye(4))
    assert_refused(path, "one value")
    assert shape_of(load_volume(path, allow_constant=True)) == (6, 6, 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_refused(tmp_path, bad):
    array = ramp()
    array[3, 4, 2] = bad
    path = write_nifti(tmp_path / "bad.nii.gz", array, np.eye(4))
    assert_refused(path, "nan")


def test_empty_folder_refused(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_refused(folder)


def test_empty_folder_refusal_says_why(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_refused(folder, "no dicom series")


def _two_series_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    write_dicom_series(folder / "a", ramp((6, 5, 3)), oblique_affine())
    write_dicom_series(folder / "b", ramp((6, 5, 3)) + 5, np.diag([1.0, 1.0, 2.0, 1.0]))
    for sub in ("a", "b"):
        for file in (folder / sub).iterdir():
            file.rename(folder / f"{sub}_{file.name}")
        (folder / sub).rmdir()
    return folder


def test_folder_with_two_dicom_series_refused(tmp_path):
    assert_refused(_two_series_folder(tmp_path), "2 dicom series")


def test_folder_with_two_dicom_series_refused_by_the_transforms(tmp_path):
    from medcycle.transforms import LoadVolumed

    folder = _two_series_folder(tmp_path)
    with pytest.raises(InputError, match="2 DICOM series") as info:
        LoadVolumed(["mr"])({"mr": str(folder)})
    assert str(folder) in str(info.value)


# --------------------------------------------------------------------------------------------------
# writing


def test_atomic_write_leaves_no_file_on_failure(tmp_path):
    target = tmp_path / "out" / "result.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            Path(tmp).write_bytes(b"half written")
            raise RuntimeError("killed half way")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_write(target) as tmp:
            Path(tmp).write_text("new")
            raise ValueError("failed")
    assert target.read_text() == "old"
    with atomic_write(target) as tmp:
        Path(tmp).write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_save_nifti_refuses_writing_over_its_input(tmp_path):
    source = write_nifti(tmp_path / "mr.nii.gz", ramp(), oblique_affine())
    before = file_checksum(source)
    volume = load_volume(source)
    with pytest.raises(InputError) as info:
        save_nifti(source, voxels(volume), like=volume)
    assert str(source) in str(info.value)
    assert file_checksum(source) == before


def test_save_nifti_refuses_a_different_shape(tmp_path):
    volume = load_volume(write_nifti(tmp_path / "mr.nii.gz", ramp(), np.eye(4)))
    with pytest.raises(ValueError):
        save_nifti(tmp_path / "out.nii.gz", np.zeros((3, 3, 3)), like=volume)
    assert not (tmp_path / "out.nii.gz").exists()


def test_volume_from_array_without_header_writes_sform_and_qform(tmp_path):
    affine = oblique_affine()
    volume = make_image(ramp(), affine, str(tmp_path / "virtual.mha"))
    out = save_nifti(tmp_path / "out.nii.gz", voxels(volume), like=volume, dtype=np.float32)
    written = nib.load(str(out))
    for getter in ("get_sform", "get_qform"):
        matrix, code = getattr(written.header, getter)(coded=True)
        assert int(code) == 1
        np.testing.assert_allclose(matrix, affine, atol=1e-5)
