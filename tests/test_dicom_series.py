"""`medcycle.dicom.series_files`: one regular image series per folder, or one line saying what is wrong.

Each series is written slice by slice with pydicom (8x8 pixels, 8 slices) with one defect at a time.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset

from helpers import make_series, STEP
from medcycle.dicom import is_dicom_folder, series_files
from medcycle.errors import InputError
from medcycle.io import sitk_to_ras_affine

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_read(files: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def refused(folder: Path, match: str) -> str:
    with pytest.raises(InputError, match=match) as info:
        series_files(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# good series: sorted along the normal, SimpleITK's geometry right


@pytest.mark.parametrize("rotation", [(0.0, 0.0, 0.0), (25.0, -12.0, 9.0), (0.0, 90.0, 0.0), (90.0, 0.0, 90.0)],
                         ids=["axial", "oblique", "sagittal", "coronal"])
def test_good_series_sorted_along_the_normal_with_simpleitk_geometry(tmp_path, rotation):
    lps = make_series(tmp_path / "mr", rotation=rotation)
    (tmp_path / "mr" / "notes.txt").write_text("not DICOM: ignored")
    (tmp_path / "mr" / ".DS_Store").write_bytes(b"\0" * 10)
    files = series_files(tmp_path / "mr")
    assert [Path(f).name for f in files] == [f"IM{8 - k:03d}.dcm" for k in range(8)]
    assert files == list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "mr")))  # GDCM's order
    image = sitk_read(files)
    assert image.GetSize() == (8, 8, 8)
    np.testing.assert_allclose(sitk_to_ras_affine(image), LPS_TO_RAS @ lps, atol=1e-5)
    assert sitk.GetArrayFromImage(image)[3, 0, 0] == 300  # slice 3 is the 4th along the normal


def test_positions_jittering_within_tolerance_are_accepted(tmp_path):
    positions = np.outer(np.arange(8) * STEP, [0.0, 0.0, 1.0]) + [[0.0, 0.0, 0.004 * (-1) ** k] for k in range(8)]
    make_series(tmp_path / "mr", positions=positions)
    assert len(series_files(tmp_path / "mr")) == 8


def test_identical_copy_of_a_slice_is_ignored_with_a_warning(tmp_path):
    make_series(tmp_path / "mr")
    shutil.copy(tmp_path / "mr" / "IM003.dcm", tmp_path / "mr" / "IM003 (copy).dcm")
    with pytest.warns(UserWarning, match=r"1 duplicate file\(s\) of the same slice ignored \(IM003"):
        files = series_files(tmp_path / "mr")
    assert len(files) == 8


def test_file_without_preamble_is_read(tmp_path):
    make_series(tmp_path / "mr", n=3)
    raw = tmp_path / "mr" / "IM002.dcm"
    ds = pydicom.dcmread(str(raw))
    del ds.file_meta
    raw.unlink()
    with open(tmp_path / "mr" / "IM002", "wb") as f:  # a bare implicit-VR dataset, as some old exports
        fp = DicomFileLike(f)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
    assert [Path(f).name for f in series_files(tmp_path / "mr")] == ["IM003.dcm", "IM002", "IM001.dcm"]


def test_is_dicom_folder(tmp_path):
    make_series(tmp_path / "mr", n=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not DICOM")
    assert is_dicom_folder(tmp_path / "mr")
    assert not is_dicom_folder(tmp_path / "other")
    assert not is_dicom_folder(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# refused: which series, which file


def test_no_series_and_several_series_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert refused(tmp_path / "empty", "no DICOM series found").startswith(str(tmp_path / "empty"))
    make_series(tmp_path / "two", n=3)
    make_series(tmp_path / "two", n=3, prefix="B", tweak=lambda k, ds: setattr(ds, "SeriesNumber", 7))
    refused(tmp_path / "two", r"holds 2 DICOM series \(SeriesNumber 3, 7\)")


def test_half_written_slice_is_refused_not_dropped(tmp_path):
    make_series(tmp_path / "mr")
    victim = tmp_path / "mr" / "IM004.dcm"
    victim.write_bytes(victim.read_bytes()[:-40])  # the pixel data cut short, as a killed copy leaves it
    message = refused(tmp_path / "mr", "half-written DICOM file")
    assert message.startswith(str(victim))


@pytest.mark.parametrize("keep", [0, 60, 200], ids=["empty", "inside-preamble", "inside-header"])
def test_file_cut_early_is_refused(tmp_path, keep):
    make_series(tmp_path / "mr")
    victim = tmp_path / "mr" / "IM004.dcm"
    victim.write_bytes(victim.read_bytes()[:keep])
    assert refused(tmp_path / "mr", "truncated|half-written|not readable").startswith(str(victim))


@pytest.mark.parametrize("cut", [100, 3000], ids=["last-fragment", "middle"])
def test_compressed_pixel_data_cut_short_is_refused(tmp_path, cut):
    (tmp_path / "rle").mkdir()
    data = Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes()
    (tmp_path / "rle" / "a.dcm").write_bytes(data)
    assert len(series_files(tmp_path / "rle")) == 1  # the whole file passes
    pixels = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm")).PixelData
    end = data.index(pixels[-16:]) + 16  # other elements follow the pixel data in this file
    (tmp_path / "rle" / "a.dcm").write_bytes(data[:end - cut])
    refused(tmp_path / "rle", "half-written DICOM file")


def test_missing_slice_refused(tmp_path):
    make_series(tmp_path / "mr", n=10)
    (tmp_path / "mr" / "IM005.dcm").unlink()
    message = refused(tmp_path / "mr", "not evenly spaced")
    assert "5 mm between IM006.dcm and IM004.dcm, 2.5 mm elsewhere (a missing slice?)" in message


def test_unevenly_spaced_slices_refused(tmp_path):
    positions = np.outer([0.0, 2.5, 5.0, 7.5, 9.0, 11.5, 14.0, 16.5], [0.0, 0.0, 1.0])
    make_series(tmp_path / "mr", positions=positions)
    assert "missing" not in refused(tmp_path / "mr", "not evenly spaced")


def test_two_slices_at_one_position_refused(tmp_path):
    positions = np.outer([0.0, 2.5, 5.0, 5.0, 7.5, 10.0], [0.0, 0.0, 1.0])
    make_series(tmp_path / "mr", positions=positions)
    refused(tmp_path / "mr", r"IM00[34].dcm and IM00[34].dcm lie at the same position \(5.00 mm")


def test_gantry_tilted_series_refused(tmp_path):
    tilt = np.radians(15.0)
    column = (0.0, np.cos(tilt), np.sin(tilt))  # the image plane tilted, the table moving along z

    def tilted(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = ["1", "0", "0", *(f"{v:.8f}" for v in column)]
        ds.GantryDetectorTilt = "15"

    make_series(tmp_path / "ct", positions=np.outer(np.arange(8) * STEP, [0.0, 0.0, 1.0]), tweak=tilted)
    message = refused(tmp_path / "ct", r"gantry-tilted series \(GantryDetectorTilt 15 deg\)")
    assert "0.647 mm sideways per slice" in message and "reconstruct without tilt or resample" in message


def test_sideways_drift_without_tilt_tag_refused(tmp_path):
    positions = np.outer(np.arange(8) * STEP, [0.0, 0.0, 1.0]) + np.outer(np.arange(8) * 0.2, [1.0, 0.0, 0.0])
    make_series(tmp_path / "mr", positions=positions)
    refused(tmp_path / "mr", "the slice positions drift sideways")


@pytest.mark.parametrize("tag, value, match", [
    ("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"], "ImageOrientationPatient changes within the series"),
    ("PixelSpacing", ["1.2", "0.9"], "pixel spacing changes within the series"),
    ("Rows", 6, "matrix size changes within the series"),
])
def test_orientation_spacing_or_size_changing_half_way_refused(tmp_path, tag, value, match):
    def change(k: int, ds: Dataset) -> None:
        if k >= 4:
            setattr(ds, tag, value)

    make_series(tmp_path / "mr", tweak=change)
    refused(tmp_path / "mr", match)


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_slice_without_geometry_refused(tmp_path, tag):
    make_series(tmp_path / "mr", tweak=lambda k, ds: delattr(ds, tag) if k == 2 else None)
    assert refused(tmp_path / "mr", f"{tag} is missing").startswith(str(tmp_path / "mr" / "IM006.dcm"))


def test_malformed_position_refused_quietly(tmp_path, capfd):
    make_series(tmp_path / "mr", n=3, tweak=lambda k, ds: setattr(ds, "ImagePositionPatient", ["1", "9.999999", "2"])
                if k == 1 else None)
    victim = tmp_path / "mr" / "IM002.dcm"
    victim.write_bytes(victim.read_bytes().replace(b"9.999999", b"abcdefgh"))
    assert refused(tmp_path / "mr", "ImagePositionPatient is missing or not 3 numbers").startswith(str(victim))
    assert capfd.readouterr().err == ""  # no pydicom warning besides the one line


def test_multi_frame_file_refused(tmp_path):
    make_series(tmp_path / "mr", n=1, tweak=lambda k, ds: setattr(ds, "NumberOfFrames", 2))
    refused(tmp_path / "mr", r"multi-frame DICOM image \(2 frames in one file\)")
