"""`medcycle.dicom.write_ct_series`: a CT series that SimpleITK and pydicom read back exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medcycle.dicom import write_ct_series
from medcycle.errors import InputError
from medcycle.io import load_volume, sitk_to_ras_affine


def oblique_anisotropic() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zyx", [25.0, -12.0, 9.0], degrees=True).as_matrix() @ np.diag([0.7, 1.3, 2.5])
    affine[:3, 3] = (-61.3, 40.25, -12.5)
    return affine


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture
def hu() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 3000, size=(14, 11, 6)).astype(np.float32) + 0.3  # not integers: rounded


def test_simpleitk_reads_geometry_and_values_back(tmp_path, hu):
    affine = oblique_anisotropic()
    files = write_ct_series(tmp_path / "ct", hu, affine)
    assert len(files) == 6 and all(f.is_file() for f in files)
    image = read_series(tmp_path / "ct")
    assert image.GetSize() == hu.shape
    np.testing.assert_allclose(sitk_to_ras_affine(image), affine, atol=1e-6)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), np.rint(hu))
    volume = load_volume(tmp_path / "ct")  # medcycle's own reader agrees
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)


def test_pydicom_reads_hu_and_tags(tmp_path, hu):
    affine = oblique_anisotropic()
    write_ct_series(tmp_path / "ct", hu, affine)
    datasets = [pydicom.dcmread(str(f)) for f in sorted((tmp_path / "ct").glob("*.dcm"))]
    for k, ds in enumerate(datasets):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "medcycle synthetic CT"
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0  # all >= -1024: unsigned
        values = ds.pixel_array.astype(np.float64).T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(values, np.rint(hu[:, :, k]))
        lps = np.diag([-1, -1, 1]) @ (affine[:3, :3] @ [0, 0, k] + affine[:3, 3])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], lps, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.3, 0.7], atol=1e-9)
        assert float(ds.SliceThickness) == pytest.approx(2.5)
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1


def test_values_below_minus_1024_use_signed_pixels(tmp_path):
    hu = np.full((6, 5, 3), -2000.0)
    hu[2:4, 2:4, :] = 1500.0
    write_ct_series(tmp_path / "ct", hu, np.diag([1.0, 1.0, 3.0, 1.0]))
    ds = pydicom.dcmread(str(sorted((tmp_path / "ct").glob("*.dcm"))[0]))
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(ds.pixel_array.T + float(ds.RescaleIntercept), hu[:, :, 0])
    image = read_series(tmp_path / "ct")
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), hu)


def test_reference_tags_new_uids(tmp_path, hu):
    ref = pydicom.Dataset()
    ref.SpecificCharacterSet = "ISO_IR 192"
    ref.PatientName, ref.PatientID, ref.PatientBirthDate = "Müller^Anna", "ID42", "19700101"
    ref.StudyInstanceUID, ref.StudyDescription = "1.2.3.4", "MR head"
    ref.FrameOfReferenceUID = "1.2.3.4.5"
    ref_file = tmp_path / "ref.dcm"
    ref.file_meta = pydicom.dataset.FileMetaDataset()
    ref.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ref.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    ref.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ref.save_as(str(ref_file), enforce_file_format=True)
    for reference in (ref, ref_file):
        out = tmp_path / f"ct_{type(reference).__name__}"
        write_ct_series(out, hu, np.eye(4), reference=reference)
        ds = pydicom.dcmread(str(sorted(out.glob("*.dcm"))[0]))
        assert str(ds.PatientName) == "Müller^Anna" and ds.PatientID == "ID42" and ds.StudyDescription == "MR head"
        assert ds.StudyInstanceUID != "1.2.3.4" and ds.FrameOfReferenceUID == "1.2.3.4.5"


def test_existing_folder_refused_then_replaced_and_failures_leave_nothing(tmp_path, hu, monkeypatch):
    folder = tmp_path / "ct"
    write_ct_series(folder, hu, np.eye(4))
    with pytest.raises(InputError, match="already exists"):
        write_ct_series(folder, hu, np.eye(4))
    first = {f.name: pydicom.dcmread(str(f)).SeriesInstanceUID for f in folder.glob("*.dcm")}
    write_ct_series(folder, hu[:, :, :4], np.eye(4), overwrite=True)
    assert len(list(folder.glob("*.dcm"))) == 4
    assert pydicom.dcmread(str(next(folder.glob("*.dcm")))).SeriesInstanceUID not in first.values()

    calls = []
    real = pydicom.Dataset.save_as

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing)
    with pytest.raises(InputError, match="No space left"):
        write_ct_series(tmp_path / "new", hu, np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no partial series, no temp folder


def test_left_handed_affine_reads_back_unchanged(tmp_path, hu):
    affine = np.diag([-0.8, 1.2, -2.0, 1.0])  # slices run inferior: a left-handed voxel grid
    affine[:3, 3] = (5.0, -6.0, 7.0)
    write_ct_series(tmp_path / "ct", hu, affine)
    image = read_series(tmp_path / "ct")
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), np.rint(hu))
    np.testing.assert_allclose(sitk_to_ras_affine(image), affine, atol=1e-6)


def test_is_dicom_series_tells_series_folders_apart_quietly(tmp_path, hu, capfd):
    from medcycle.io import is_dicom_series

    write_ct_series(tmp_path / "ct", hu, oblique_anisotropic())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not DICOM")
    assert is_dicom_series(tmp_path / "ct")
    assert not is_dicom_series(tmp_path / "other")
    assert not is_dicom_series(tmp_path / "missing")
    assert "No Series" not in capfd.readouterr().err  # GDCM's warning is silenced
