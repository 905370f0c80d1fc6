"""`medcycle.dicom` writers: a CT series and an RT Structure Set that read back exactly and pass dciodvfy."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_fill_holes
from scipy.spatial.transform import Rotation
from skimage.draw import polygon2mask
from helpers import make_series

from medcycle import dicom
from medcycle.dicom import RTSTRUCT_NAME, series_files, write_body_rtstruct, write_ct_series
from medcycle.errors import InputError
from medcycle.io import sitk_to_ras_affine

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_anisotropic() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zyx", [25.0, -12.0, 9.0], degrees=True).as_matrix() @ np.diag([0.7, 1.3, 2.5])
    affine[:3, 3] = (-61.3, 40.25, -12.5)
    return affine


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series_files(folder))
    return reader.Execute()


def ct_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("CT_*.dcm"))


def body_mask(shape=(14, 11, 6)) -> np.ndarray:
    """Two parts on most slices, one with a hole; the first slice empty."""
    mask = np.zeros(shape, dtype=bool)
    mask[2:9, 1:8, 1:] = True
    mask[4:6, 3:5, 1:] = False  # a hole: the outline is the outer edge
    mask[10:13, 8:10, 2:5] = True  # a second part
    mask[10, 9, 3] = False  # a notch
    return mask


@pytest.fixture
def hu() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 3000, size=(14, 11, 6)).astype(np.float32) + 0.3  # not integers: rounded


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def mr_reference(folder: Path) -> Path:
    """A patient's MR series (the grid of `oblique_anisotropic`) with patient, study and series tags."""
    affine = LPS_TO_RAS @ oblique_anisotropic()
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)

    def tags(k: int, ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Müller^Anna", "ID42", "19700101", "F"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = "1.2.826.0.1.3680043.2.1125.7", "S7", "ACC9"
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = "20260101", "101010", "MR head"
        ds.ReferringPhysicianName = "Dr^Who"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.8"
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition, ds.BodyPartExamined = "FFS", "HEAD"
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*axes[:, 0], *axes[:, 1])]

    make_series(folder, n=6, positions=[(affine @ [0.0, 0.0, k, 1.0])[:3] for k in range(6)], tweak=tags)
    return folder


# --------------------------------------------------------------------------------------------------
# the CT series: geometry, values, tags


def test_simpleitk_reads_geometry_and_values_back(tmp_path, hu):
    affine = oblique_anisotropic()
    files = write_ct_series(tmp_path / "ct", hu, affine)
    assert len(files) == 6 and all(f.is_file() for f in files)
    assert series_files(tmp_path / "ct") == [str(f) for f in files]
    image = read_series(tmp_path / "ct")
    assert image.GetSize() == hu.shape
    np.testing.assert_allclose(sitk_to_ras_affine(image), affine, atol=1e-6)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), np.rint(hu))


@pytest.mark.parametrize("affine", [np.diag([-0.8, 1.2, -2.0, 1.0]), np.diag([0.8, 1.2, -2.0, 1.0]),
                                    np.array([[0.0, 0.0, 2.0, 5.0], [0.9, 0.0, 0.0, -6.0], [0.0, -1.1, 0.0, 7.0], [0, 0, 0, 1]])],
                         ids=["left-handed", "slices-inferior", "sagittal"])
def test_non_ras_grids_read_back_unchanged(tmp_path, hu, affine):
    """Every voxel comes back at the same place in patient space (the slice order may run the other way)."""
    write_ct_series(tmp_path / "ct", hu, affine)
    image = read_series(tmp_path / "ct")
    read = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    index = np.indices(hu.shape).reshape(3, -1)
    moved = np.linalg.inv(sitk_to_ras_affine(image)) @ affine @ np.r_[index, np.ones((1, index.shape[1]))]
    np.testing.assert_allclose(moved[:3], np.rint(moved[:3]), atol=1e-6)
    np.testing.assert_array_equal(read[tuple(np.rint(moved[:3]).astype(int))], np.rint(hu).ravel())


def test_pydicom_reads_hu_and_tags(tmp_path, hu):
    affine = oblique_anisotropic()
    write_ct_series(tmp_path / "ct", hu, affine)
    datasets = [pydicom.dcmread(str(f)) for f in ct_files(tmp_path / "ct")]
    for k, ds in enumerate(datasets):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert ds.PatientPosition == "HFS" and ds.Laterality == ""
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
    for name in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate"):
        assert len({ds.get(name) for ds in datasets}) == 1


def test_values_below_minus_1024_use_signed_pixels(tmp_path):
    hu = np.full((6, 5, 3), -2000.0)
    hu[2:4, 2:4, :] = 1500.0
    write_ct_series(tmp_path / "ct", hu, np.diag([1.0, 1.0, 3.0, 1.0]))
    ds = pydicom.dcmread(str(ct_files(tmp_path / "ct")[0]))
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(ds.pixel_array.T + float(ds.RescaleIntercept), hu[:, :, 0])
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(read_series(tmp_path / "ct")), (2, 1, 0)), hu)


def test_reference_series_gives_patient_study_and_frame_of_reference(tmp_path, hu):
    ref = mr_reference(tmp_path / "mr")
    write_ct_series(tmp_path / "ct", hu, oblique_anisotropic(), reference=ref)
    mr = pydicom.dcmread(str(next(ref.glob("*.dcm"))))
    for f in ct_files(tmp_path / "ct"):
        ds = pydicom.dcmread(str(f))
        assert str(ds.PatientName) == "Müller^Anna" and ds.PatientID == "ID42" and ds.PatientSex == "F"
        for name in ("StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription",
                     "ReferringPhysicianName", "FrameOfReferenceUID", "PatientPosition", "BodyPartExamined"):
            assert ds.get(name) == mr.get(name), name  # the sCT joins the MR's study, in its coordinates
        assert ds.SeriesInstanceUID != mr.SeriesInstanceUID
        assert "Laterality" not in ds  # a head is not a paired body part


def test_reference_dataset_without_study_starts_a_new_study(tmp_path, hu):
    ref = pydicom.Dataset()
    ref.PatientName, ref.PatientID, ref.StudyID = "Doe^J", "P1", "stale"  # no StudyInstanceUID: no study to join
    write_ct_series(tmp_path / "ct", hu, np.eye(4), reference=ref)
    ds = pydicom.dcmread(str(ct_files(tmp_path / "ct")[0]))
    assert ds.PatientID == "P1" and ds.StudyID == "" and ds.StudyInstanceUID and ds.StudyDate


def test_reference_in_another_character_set_is_written_in_utf8(tmp_path, hu):
    ref = pydicom.Dataset()
    ref.SpecificCharacterSet = "ISO_IR 100"  # Latin-1, as many scanners write
    ref.PatientName, ref.StudyInstanceUID, ref.StudyDescription = "Müller^Anna", "1.2.3", "Schädel"
    ref.SOPClassUID, ref.SOPInstanceUID = pydicom.uid.MRImageStorage, "1.2.3.4"
    dicom._save(ref, tmp_path / "ref.dcm")
    write_ct_series(tmp_path / "ct", hu, np.eye(4), reference=tmp_path / "ref.dcm")
    raw = ct_files(tmp_path / "ct")[0].read_bytes()
    assert "Müller".encode() in raw and "Schädel".encode() in raw and "Müller".encode("latin-1") not in raw
    assert str(pydicom.dcmread(str(ct_files(tmp_path / "ct")[0])).PatientName) == "Müller^Anna"


def test_reference_series_elsewhere_in_patient_space_refused(tmp_path, hu):
    ref = mr_reference(tmp_path / "mr")
    shifted = oblique_anisotropic()
    shifted[:3, 3] += (0.0, 0.0, 500.0)  # e.g. a NIfTI re-centred by some tool
    with pytest.raises(InputError, match="does not overlap this reference series"):
        write_ct_series(tmp_path / "ct", hu, shifted, reference=ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mr"]


@needs_dciodvfy
@pytest.mark.parametrize("with_reference", [False, True], ids=["new-study", "mr-reference"])
def test_dciodvfy_finds_no_error_in_ct_and_rtstruct(tmp_path, hu, with_reference):
    reference = mr_reference(tmp_path / "mr") if with_reference else None
    files = write_ct_series(tmp_path / "ct", hu, oblique_anisotropic(), reference=reference, body_mask=body_mask())
    assert files[-1].name == RTSTRUCT_NAME
    for path in (files[0], files[3], files[-1]):
        assert dciodvfy_errors(path) == [], path.name


# --------------------------------------------------------------------------------------------------
# the RT Structure Set


def rasterise(rtstruct: pydicom.Dataset, affine: np.ndarray, shape) -> np.ndarray:
    """The voxels of `shape` whose centres lie inside the contours (read as a planning system would)."""
    to_voxel = np.linalg.inv(LPS_TO_RAS @ affine)
    mask = np.zeros(shape, dtype=bool)
    for contour in rtstruct.ROIContourSequence[0].ContourSequence:
        points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints
        index = (to_voxel @ np.c_[points, np.ones(len(points))].T)[:3].T
        k = round(index[0, 2])
        np.testing.assert_allclose(index[:, 2], k, atol=1e-3)  # planar, on a CT slice
        mask[:, :, k] |= polygon2mask(shape[:2], index[:, :2])
    return mask


def test_rtstruct_outlines_the_body_on_the_ct_images(tmp_path, hu):
    affine, mask = oblique_anisotropic(), body_mask()
    files = write_ct_series(tmp_path / "ct", hu, affine, body_mask=mask)
    rs = pydicom.dcmread(str(files[-1]))
    cts = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(str(f)) for f in files[:-1])}
    first = next(iter(cts.values()))
    assert rs.SOPClassUID == pydicom.uid.RTStructureSetStorage and rs.Modality == "RTSTRUCT"
    assert [roi.ROIName for roi in rs.StructureSetROISequence] == ["BODY"]
    assert rs.RTROIObservationsSequence[0].RTROIInterpretedType == "EXTERNAL"
    for name in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert rs.get(name) == first.get(name)
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in study.RTReferencedSeriesSequence[0].ContourImageSequence} == set(cts)
    for contour in rs.ROIContourSequence[0].ContourSequence:  # each contour lies in the plane of the image it names
        image = cts[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        normal = np.cross(*np.array([float(v) for v in image.ImageOrientationPatient]).reshape(2, 3))
        points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        np.testing.assert_allclose(points @ normal, np.array([float(v) for v in image.ImagePositionPatient]) @ normal, atol=1e-3)
    assert len(rs.ROIContourSequence[0].ContourSequence) == 2 * 3 + 1 * 2  # two parts on slices 2-4, one on 1 and 5
    expected = np.stack([binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)
    np.testing.assert_array_equal(rasterise(rs, affine, mask.shape), expected)


def test_write_body_rtstruct_beside_an_existing_series(tmp_path, hu):
    affine, mask = np.diag([-0.8, 1.2, -2.0, 1.0]), body_mask()
    write_ct_series(tmp_path / "ct", hu, affine)
    path = write_body_rtstruct(tmp_path / "ct", mask, affine, tmp_path / "ct")  # a folder: RS_BODY.dcm in it
    assert path == tmp_path / "ct" / RTSTRUCT_NAME
    assert len(series_files(tmp_path / "ct")) == 6  # the structure set is no image: the series still reads
    expected = np.stack([binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)
    np.testing.assert_array_equal(rasterise(pydicom.dcmread(str(path)), affine, mask.shape), expected)
    with pytest.raises(InputError, match="already exists"):
        write_body_rtstruct(path, mask, affine, tmp_path / "ct")
    shifted = affine.copy()
    shifted[2, 3] += 1.0  # between the CT's slices
    with pytest.raises(InputError, match="mask slice 0 lies on no image of the CT series"):
        write_body_rtstruct(tmp_path / "other.dcm", mask, shifted, tmp_path / "ct")
    with pytest.raises(InputError, match="not on the CT grid"):
        write_body_rtstruct(tmp_path / "other.dcm", mask[:-1], affine, tmp_path / "ct")
    assert not (tmp_path / "other.dcm").exists()


# --------------------------------------------------------------------------------------------------
# outputs: replaced only when asked, never partial, stale working folders removed


def test_existing_folder_refused_then_replaced(tmp_path, hu):
    folder = tmp_path / "ct"
    write_ct_series(folder, hu, np.eye(4))
    with pytest.raises(InputError, match="already exists"):
        write_ct_series(folder, hu, np.eye(4))
    first = {pydicom.dcmread(str(f)).SeriesInstanceUID for f in ct_files(folder)}
    write_ct_series(folder, hu[:, :, :4], np.eye(4), overwrite=True)
    assert len(ct_files(folder)) == 4
    assert pydicom.dcmread(str(ct_files(folder)[0])).SeriesInstanceUID not in first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_no_permission_is_one_line_and_leaves_nothing(tmp_path, hu, monkeypatch, error):
    write_ct_series(tmp_path / "ct", hu, np.eye(4))
    before = {f.name: f.read_bytes() for f in ct_files(tmp_path / "ct")}
    real, calls = pydicom.dcmwrite, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", failing)
    for target in ("new", "ct"):
        calls.clear()
        with pytest.raises(InputError) as info:
            write_ct_series(tmp_path / target, hu, np.eye(4), overwrite=True)
        assert str(info.value) == f"{tmp_path / target}: cannot write the DICOM output ({os.strerror(error)})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no partial series, no working folder
    assert {f.name: f.read_bytes() for f in ct_files(tmp_path / "ct")} == before  # the old series intact


def test_failed_final_rename_puts_the_old_series_back(tmp_path, hu, monkeypatch):
    write_ct_series(tmp_path / "ct", hu, np.eye(4))
    before = {f.name: f.read_bytes() for f in ct_files(tmp_path / "ct")}
    real = os.replace

    def failing(src, dst):
        if Path(src).name == "series":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real(src, dst)

    monkeypatch.setattr(dicom.os, "replace", failing)
    with pytest.raises(InputError, match="Permission denied"):
        write_ct_series(tmp_path / "ct", hu[:, :, :2], np.eye(4), overwrite=True)
    assert {f.name: f.read_bytes() for f in ct_files(tmp_path / "ct")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


KILLED_WRITER = """
import os, signal, sys
import numpy as np
import pydicom
import medcycle.dicom as dicom
real, calls = pydicom.dcmwrite, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 half way through the series
    return real(*args, **kwargs)
pydicom.dcmwrite = dying
dicom.write_ct_series(sys.argv[1], np.zeros((8, 8, 6)), np.eye(4))
"""


def test_working_folder_of_a_killed_writer_is_removed_by_the_next(tmp_path, hu):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(dicom.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "ct")], env=env, capture_output=True, timeout=120, check=False)
    assert result.returncode == -9, result.stderr.decode()[-500:]
    (stale,) = [p for p in tmp_path.iterdir()]
    assert stale.name.startswith(".medcycle-dicom-") and len(list(stale.rglob("*.dcm"))) == 2
    live = tmp_path / ".medcycle-dicom-0000live-x"  # a writer still at work: its lock is held
    live.mkdir()
    lock = dicom._lock(live)
    foreign = tmp_path / ".medcycle-dicom-notours"  # no lock file: not this writer's
    foreign.mkdir()
    with pytest.warns(UserWarning, match="removed an unfinished DICOM output left by an interrupted run"):
        write_ct_series(tmp_path / "ct", hu, np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, "ct"])
    assert len(series_files(tmp_path / "ct")) == 6
    lock.close()
