"""DICOM: reading an image series safely, writing the sCT as a CT series and its body contour as an RT Structure Set.

Reading (:func:`series_files`). A folder must hold exactly one image series on a regular grid, or it is
refused in one line naming the folder (or file) and the reason: no series or several; a half-written
or unreadable DICOM file; a multi-frame file; slices missing, duplicated or unevenly spaced; positions
stepping sideways (gantry tilt); orientation, pixel spacing or matrix size changing within the series.
Slice positions are measured along the normal of ImageOrientationPatient with a tolerance of
``max(0.01 mm, 1 % of the spacing)``. The one case set right is an identical slice present twice (same
SOPInstanceUID, same position): the copy is ignored with a one-line warning. Files are returned sorted
along the normal, the order SimpleITK's series reader expects.

Writing (:func:`write_ct_series`). One CT Image Storage file per axial slice (the last array axis) with
``ImageType DERIVED\\SECONDARY\\AXIAL``, ``RescaleSlope 1`` / ``RescaleIntercept -1024`` (16-bit pixels:
unsigned when every value is >= -1024 HU, else signed), and the RAS affine converted to DICOM's LPS:

* ``ImageOrientationPatient``: the directions of array axes 0 (along a row, i.e. columns) and 1
  (down the rows); ``PixelSpacing`` = [spacing of axis 1, spacing of axis 0];
* ``ImagePositionPatient`` of slice k: the centre of voxel (0, 0, k);
* ``SliceThickness`` / ``SpacingBetweenSlices``: the spacing of axis 2.

Pixel (row j, column i) of file k holds ``hu[i, j, k]``. SimpleITK (GDCM) reads the series back with the
same geometry and voxel order, left-handed grids included. The grid must not be sheared.

A ``reference`` (the patient's MR: a series folder, a file or a pydicom ``Dataset``) gives the patient,
the study (the sCT joins the MR's study: StudyInstanceUID, StudyID, AccessionNumber, dates kept), the
Frame of Reference (the sCT lies in the MR's patient coordinates), PatientPosition, BodyPartExamined and
Laterality. A reference series whose volume does not overlap the sCT's is refused: the sCT cannot then
be in its patient coordinates. Without a reference the series starts a new study (new UIDs, empty
patient tags, PatientPosition ``HFS``: head first supine, the usual planning position, since nothing
says otherwise).

:func:`write_body_rtstruct` (or ``write_ct_series(..., body_mask=...)``) writes the body outline as an RT
Structure Set: one ROI ``BODY`` of type ``EXTERNAL``, one closed planar contour per connected part of
each slice (holes filled), referencing the CT images it was drawn on.

Every output is written into a working folder ``.medcycle-dicom-<id>-<name>`` beside it, holding a lock
file while the writer lives, and renamed into place at the end. A working folder whose lock nobody
holds (its writer was killed) is removed by the next writer into the same parent folder. File system
errors (disk full, no permission) are reported in one line.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)

from medcycle import __version__
from medcycle.errors import InputError

__all__ = [
    "RESCALE_INTERCEPT",
    "RTSTRUCT_NAME",
    "SERIES_DESCRIPTION",
    "check_affine",
    "is_dicom_folder",
    "read_reference",
    "series_files",
    "write_body_rtstruct",
    "write_ct_series",
]

SERIES_DESCRIPTION = "medcycle synthetic CT"
RESCALE_INTERCEPT = -1024.0
RTSTRUCT_NAME = "RS_BODY.dcm"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
WORK_PREFIX = ".medcycle-dicom-"
LOCK_NAME = "writer.lock"
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired): how RT objects name a study

PATIENT_TAGS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "OtherPatientIDs", "PatientComments", "EthnicGroup",
)
STUDY_TAGS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_TAGS = ("FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined",
               "Laterality", "ImageLaterality", "InstitutionName")

PathLike = str | os.PathLike
ReferenceLike = PathLike | Dataset | None


# --------------------------------------------------------------------------------------------------
# reading a series


@dataclass
class _Slice:
    path: Path
    header: Dataset
    position: np.ndarray  # ImagePositionPatient, LPS mm


@dataclass
class _Series:
    slices: list[_Slice]  # sorted along the normal
    lps: np.ndarray  # voxel (column, row, slice) -> LPS mm
    shape: tuple[int, int, int]  # (Columns, Rows, slices)


def is_dicom_folder(folder: PathLike) -> bool:
    """True when `folder` directly holds a file with the DICOM marker (a series, readable or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(_dicom_marker(_head(path)) for path in _candidate_files(folder))


def series_files(folder: PathLike) -> list[str]:
    """The files of the one image series in `folder`, sorted along the slice normal; refuses anything else.

    See the module docstring for what is refused; every refusal is one :class:`InputError` line.
    """
    return [str(s.path) for s in _read_series(Path(folder)).slices]


def _candidate_files(folder: Path) -> list[Path]:
    # hidden files are system litter (.DS_Store) or a writer's working files, never slices
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return b""


def _dicom_marker(head: bytes) -> str | None:
    """'part10' for a file starting with the DICM marker, 'raw' for one starting like a dataset without it."""
    if head[128:132] == b"DICM":
        return "part10"
    if head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00":  # group 0002 or 0008 first, no preamble
        return "raw"
    return None


def _image_header(path: Path) -> Dataset | None:
    """The header of a DICOM image (pixel data deferred); None for a file that is not a DICOM image.

    Refuses an empty file, an unreadable DICOM file and one whose pixel data is cut short.
    """
    size = path.stat().st_size
    head = _head(path)
    if size == 0 or (size < 132 and not head.strip(b"\0")):  # a copy interrupted inside the preamble
        raise InputError(f"{path}: empty or truncated file in a DICOM series folder")
    marker = _dicom_marker(head)
    if marker is None:
        return None
    try:
        with warnings.catch_warnings():  # pydicom warns about what we report ourselves, in one line
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), defer_size=1024, force=marker == "raw")
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputError(f"{path}: not readable as DICOM (truncated or corrupt?): {_first_line(exc)}") from None
    if not _is_image(ds):
        return None
    _check_pixel_data(ds, path, size)
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _is_image(ds: Dataset) -> bool:
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if sop and UID(str(sop)).name != str(sop):  # a known SOP class: images are named "... Image Storage"
        return "Image Storage" in UID(str(sop)).name
    return "Rows" in ds and "Columns" in ds


def _check_pixel_data(ds: Dataset, path: Path, size: int) -> None:
    """Refuse pixel data that is missing or shorter than the file says (a half-written file)."""
    element = ds.get_item(PIXEL_DATA)
    if element is None or "Rows" not in ds or "Columns" not in ds:
        raise InputError(f"{path}: half-written DICOM file: no pixel data or matrix size")
    # native pixels stay a raw element (declared length, file offset); compressed ones (undefined length)
    # are read whole, and dropped (element None above) when their end marker is missing
    length = getattr(element, "length", UNDEFINED_LENGTH)
    if length == UNDEFINED_LENGTH:
        return
    present = min(length, size - element.value_tell)  # a deferred value is not read: measure the file
    expected = -(-int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                 * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("BitsAllocated", 16) or 16) // 8)
    if present < max(length, expected):
        raise InputError(f"{path}: half-written DICOM file: {present} of {max(length, expected)} bytes of pixel data")


def _floats(ds: Dataset, name: str, count: int, path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # pydicom's warning about a malformed value: refused below in one line
            warnings.simplefilter("ignore")
            values = np.array([float(v) for v in ds.get(name) or []], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise InputError(f"{path}: {name} is missing or not {count} numbers; the slice cannot be placed")
    return values


def _read_series(folder: Path) -> _Series:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder holding a DICOM series")
    by_series: dict[str, list[_Slice]] = {}
    for path in _candidate_files(folder):
        header = _image_header(path)
        if header is None:
            continue
        frames = int(header.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(f"{path}: a multi-frame DICOM image ({frames} frames in one file) is not supported; "
                             "convert it to NIfTI first (e.g. dcm2niix)")
        position = _floats(header, "ImagePositionPatient", 3, path)
        by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(_Slice(path, header, position))
    if not by_series:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    if len(by_series) > 1:
        numbers = sorted(str(s[0].header.get("SeriesNumber") or "?") for s in by_series.values())
        raise InputError(f"{folder}: holds {len(by_series)} DICOM series (SeriesNumber {', '.join(numbers)}); "
                         "put each series in its own folder")
    return _regular_grid(folder, _drop_copies(folder, next(iter(by_series.values()))))


def _drop_copies(folder: Path, slices: list[_Slice]) -> list[_Slice]:
    """Ignore a second file of the same SOP instance at the same position (with a warning)."""
    kept: dict[str, _Slice] = {}
    copies = []
    for s in slices:
        uid = str(s.header.get("SOPInstanceUID", "")) or str(s.path)
        if uid not in kept:
            kept[uid] = s
        elif np.allclose(kept[uid].position, s.position, atol=1e-3):
            copies.append(s.path.name)
        else:
            raise InputError(f"{folder}: {kept[uid].path.name} and {s.path.name} share a SOPInstanceUID at different positions")
    if copies:
        warnings.warn(f"{folder}: {len(copies)} duplicate file(s) of the same slice ignored ({', '.join(copies[:3])})")
    return list(kept.values())


def _regular_grid(folder: Path, slices: list[_Slice]) -> _Series:
    """Check that `slices` form one regular grid; returns them sorted along the normal with the grid."""
    first = slices[0]
    orientation = _floats(first.header, "ImageOrientationPatient", 6, first.path)
    spacing = _floats(first.header, "PixelSpacing", 2, first.path)  # [between rows, between columns]
    size = (int(first.header.Rows), int(first.header.Columns))
    for s in slices[1:]:
        if np.abs(_floats(s.header, "ImageOrientationPatient", 6, s.path) - orientation).max() > 1e-4:
            raise InputError(f"{folder}: ImageOrientationPatient changes within the series ({first.path.name} vs "
                             f"{s.path.name}); separate the orientations first")
        other = _floats(s.header, "PixelSpacing", 2, s.path)
        if np.abs(other - spacing).max() > 1e-4 * max(1.0, float(spacing.max())):
            raise InputError(f"{folder}: the pixel spacing changes within the series ({spacing.tolist()} mm in "
                             f"{first.path.name}, {other.tolist()} mm in {s.path.name})")
        if (int(s.header.Rows), int(s.header.Columns)) != size:
            raise InputError(f"{folder}: the matrix size changes within the series ({size[0]}x{size[1]} in "
                             f"{first.path.name}, {s.header.Rows}x{s.header.Columns} in {s.path.name})")
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise InputError(f"{first.path}: ImageOrientationPatient is not two perpendicular unit vectors")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    first = slices[0]
    along = np.array([s.position @ normal for s in slices])
    if len(slices) == 1:  # nothing to check (a 2D image is refused by whoever needs 3D); 1 mm thick
        return _Series(slices, _grid(row, column, normal, spacing, 1.0, first.position), (size[1], size[0], 1))
    steps = np.diff(along)
    step = float(np.median(steps))
    tolerance = max(0.01, 0.01 * step)
    if steps.min() <= tolerance:
        k = int(np.argmin(steps))
        raise InputError(f"{folder}: {slices[k].path.name} and {slices[k + 1].path.name} lie at the same position "
                         f"({along[k]:.2f} mm along the slice normal): several echoes, phases or acquisitions in "
                         "one series? separate them first")
    sideways = np.array([[(s.position - first.position) @ row, (s.position - first.position) @ column] for s in slices])
    drift = float(np.abs(sideways).max(initial=0.0))
    if drift > max(0.01, 0.01 * float(spacing.min())):
        per_slice = float(np.linalg.norm(sideways[-1])) / max(len(slices) - 1, 1)
        tilt = float(first.header.get("GantryDetectorTilt", 0) or 0)
        cause = f"gantry-tilted series (GantryDetectorTilt {tilt:g} deg)" if tilt else "the slice positions drift sideways"
        raise InputError(f"{folder}: {cause}: the slices step {per_slice:.3g} mm sideways per slice ({drift:.3g} mm in all), "
                         "which a regular grid cannot hold; reconstruct without tilt or resample it (e.g. dcm2niix) first")
    mean_step = (along[-1] - along[0]) / (len(along) - 1)  # what SimpleITK's series reader takes
    if np.abs(along - (along[0] + np.arange(len(along)) * mean_step)).max() > tolerance:
        k = int(np.argmax(np.abs(steps - step)))
        ratio = steps[k] / step
        hint = " (a missing slice?)" if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1 else ""
        raise InputError(f"{folder}: the slices are not evenly spaced: {steps[k]:.3g} mm between {slices[k].path.name} "
                         f"and {slices[k + 1].path.name}, {step:.3g} mm elsewhere{hint}")
    return _Series(slices, _grid(row, column, normal, spacing, mean_step, first.position), (size[1], size[0], len(slices)))


def _grid(row: np.ndarray, column: np.ndarray, normal: np.ndarray, pixel_spacing: np.ndarray, step: float,
          origin: np.ndarray) -> np.ndarray:
    """The voxel (column, row, slice) to LPS affine of a series; `pixel_spacing` in DICOM order."""
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * pixel_spacing[1], column * pixel_spacing[0], normal * step, origin
    return lps


# --------------------------------------------------------------------------------------------------
# geometry shared by the writers


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(LPS affine, unit direction columns, spacing) of a voxel-to-RAS affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise ValueError(f"affine has a zero or non-finite axis: {np.asarray(affine).tolist()}")
    return lps, lps[:3, :3] / spacing, spacing


def check_affine(affine: np.ndarray, folder: PathLike = "DICOM output") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refuse a grid DICOM cannot describe (in-plane axes not perpendicular); returns its LPS geometry."""
    lps, direction, spacing = _geometry(affine)
    if abs(float(np.dot(direction[:, 0], direction[:, 1]))) > 1e-4:
        raise InputError(f"{folder}: the volume's in-plane axes are not perpendicular (sheared grid); DICOM cannot store it")
    return lps, direction, spacing


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters holding `value` as precisely as fits."""
    value = 0.0 if abs(value) < 1e-12 else float(value)
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.0f}"


def _corners(lps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The 8 outer corners (voxel edges, not centres) of a grid, in LPS mm, as rows."""
    extent = [(-0.5, n - 0.5) for n in shape]
    index = np.array(np.meshgrid(*extent, indexing="ij")).reshape(3, -1)
    return (lps[:3, :3] @ index + lps[:3, 3:]).T


# --------------------------------------------------------------------------------------------------
# the reference (the patient's MR)


def read_reference(reference: PathLike | Dataset, affine: np.ndarray, shape: Sequence[int]) -> Dataset:
    """The header that gives an sCT on the grid (`affine` voxel-to-RAS, `shape`) its patient, study and frame.

    `reference` is the patient's MR: a series folder (checked as :func:`series_files` does, and refused
    when its volume does not overlap the grid: the grid is then not in its patient coordinates), a
    DICOM file or a pydicom ``Dataset`` (taken as it is). Call it before any work to refuse early.
    """
    if isinstance(reference, Dataset):
        return reference
    path = Path(reference)
    if path.is_dir():
        series = _read_series(path)
        lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        inside = np.linalg.solve(series.lps, np.c_[_corners(lps, shape), np.ones(8)].T)[:3]
        if np.any(inside.max(axis=1) < -0.5) or np.any(inside.min(axis=1) > np.array(series.shape) - 0.5):
            raise InputError(f"{path}: the sCT does not overlap this reference series in patient coordinates; "
                             "the volume is not in the reference's frame of reference (a NIfTI from another patient "
                             "or re-centred?)")
        return series.slices[0].header
    if not path.is_file():
        raise InputError(f"{path}: no such DICOM reference file or folder")
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputError(f"{path}: not readable as DICOM: {_first_line(exc)}") from None


def _present(ds: Dataset, name: str) -> bool:
    return name in ds and ds.data_element(name) is not None and ds.data_element(name).value not in (None, "")


def _patient_and_study(ref: Dataset | None, now: datetime.datetime) -> Dataset:
    """Patient and study tags: the reference's, the study kept whole; else a new study."""
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so copied names keep their characters
    ref = ref if ref is not None else Dataset()
    same_study = _present(ref, "StudyInstanceUID")
    for name in PATIENT_TAGS + (STUDY_TAGS if same_study else ()):
        if _present(ref, name):
            base.add(copy.deepcopy(ref.data_element(name)))  # as stored: not re-validated, VR kept
    if not same_study:
        base.StudyInstanceUID = generate_uid()
        base.StudyDate, base.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for name in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "AccessionNumber", "StudyID", "ReferringPhysicianName"):  # type 2: present, maybe empty
        if name not in base:
            setattr(base, name, "")
    return base


# --------------------------------------------------------------------------------------------------
# writing


def write_ct_series(
    folder: PathLike,
    hu: np.ndarray,
    affine: np.ndarray,
    reference: ReferenceLike = None,
    overwrite: bool = False,
    series_description: str = SERIES_DESCRIPTION,
    body_mask: np.ndarray | None = None,
) -> list[Path]:
    """Write `hu` (X, Y, Z) in Hounsfield units as a CT DICOM series in `folder`; returns the files.

    `affine` is the voxel-to-RAS affine of `hu` (as read by :func:`medcycle.io.load_volume`). With
    `body_mask` (X, Y, Z, nonzero = body) the folder also holds the body contour as an RT Structure Set
    (:data:`RTSTRUCT_NAME`, last in the list). An existing non-empty `folder` is refused unless
    `overwrite`. Nothing is left behind on failure.
    """
    folder = Path(folder)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (X, Y, Z) array, got shape {hu.shape}")
    if body_mask is not None and np.shape(body_mask) != hu.shape:
        raise ValueError(f"body_mask has shape {np.shape(body_mask)}, hu has {hu.shape}")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; choose a folder for the DICOM series")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"{folder}: already exists and is not empty (use --overwrite to replace it)")
    lps, direction, spacing = check_affine(affine, folder)
    ref = None if reference is None else read_reference(reference, affine, hu.shape)
    datasets = _ct_datasets(hu, lps, direction, spacing, ref, series_description)
    names = [f"CT_{k + 1:04d}.dcm" for k in range(len(datasets))]
    if body_mask is not None:
        datasets.append(_rtstruct_dataset(np.asarray(body_mask) != 0, lps, datasets, folder))
        names.append(RTSTRUCT_NAME)
    with _writing(folder) as work:
        series = work / "series"
        series.mkdir()
        for ds, name in zip(datasets, names):
            _save(ds, series / name)
        _move_into_place(series, folder, work, overwrite)
    return [folder / name for name in names]


def write_body_rtstruct(
    path: PathLike,
    mask: np.ndarray,
    affine: np.ndarray,
    ct_series: PathLike | Sequence[Dataset],
    overwrite: bool = False,
) -> Path:
    """Write the body outline of `mask` (X, Y, Z, nonzero = body) as an RT Structure Set; returns the file.

    `path` is the file, or a folder to put :data:`RTSTRUCT_NAME` in. `affine` (voxel-to-RAS) and `mask`
    must be the grid of `ct_series` (its folder or datasets, e.g. as :func:`write_ct_series` wrote them):
    each mask slice is referenced to the CT image at its position. An existing file is refused unless
    `overwrite`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RTSTRUCT_NAME
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (use --overwrite to replace it)")
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D (X, Y, Z) array, got shape {mask.shape}")
    lps, _, _ = check_affine(affine, path)
    if isinstance(ct_series, (str, os.PathLike)):
        images = [s.header for s in _read_series(Path(ct_series)).slices]
    else:
        images = list(ct_series)
    ds = _rtstruct_dataset(mask, lps, images, path)
    with _writing(path) as work:
        _save(ds, work / path.name)
        os.replace(work / path.name, path)
    return path


def _ct_datasets(hu: np.ndarray, lps: np.ndarray, direction: np.ndarray, spacing: np.ndarray,
                 ref: Dataset | None, series_description: str) -> list[Dataset]:
    stored = np.rint(np.asarray(hu, dtype=np.float64)) - RESCALE_INTERCEPT
    signed = bool(stored.min() < 0)
    kind = np.int16 if signed else np.uint16
    info = np.iinfo(kind)
    stored = np.clip(stored, info.min, info.max).astype(np.dtype(kind).newbyteorder("<"))

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    base = _patient_and_study(ref, now)
    for name in SERIES_TAGS:
        if ref is not None and _present(ref, name):
            base.add(copy.deepcopy(ref.data_element(name)))
    if "FrameOfReferenceUID" not in base:
        base.FrameOfReferenceUID = generate_uid()
    base.PositionReferenceIndicator = base.get("PositionReferenceIndicator", "")
    base.PatientPosition = base.get("PatientPosition", "HFS")
    if not any(name in base for name in ("Laterality", "ImageLaterality", "BodyPartExamined")):
        base.Laterality = ""  # type 2C, required for a paired body part: with none named, "unknown"
    base.SeriesInstanceUID = generate_uid()
    base.SOPClassUID = CTImageStorage
    base.Modality = "CT"
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.SeriesDescription = series_description
    base.SeriesNumber = 9001
    base.SeriesDate, base.SeriesTime = date, time
    base.ContentDate, base.ContentTime = date, time
    base.InstanceCreationDate, base.InstanceCreationTime = date, time
    base.Manufacturer = "medcycle"
    base.SoftwareVersions = __version__
    base.DerivationDescription = "synthetic CT generated from MR by medcycle (CycleGAN)"
    base.BurnedInAnnotation = "NO"
    base.KVP = ""
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    base.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    base.SliceThickness = _ds(spacing[2])
    base.SpacingBetweenSlices = _ds(spacing[2])
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(hu.shape[1]), int(hu.shape[0])
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1 if signed else 0
    base.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.WindowCenter, base.WindowWidth = "40", "400"

    normal = np.cross(direction[:, 0], direction[:, 1])
    datasets = []
    for k in range(hu.shape[2]):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        position = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
        ds.SliceLocation = _ds(float(np.dot(position[:3], normal)))
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets


def _contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed outlines (N, 2) in voxel indices of each connected part of `mask2d`, holes filled."""
    from scipy.ndimage import binary_fill_holes
    from skimage.measure import find_contours

    padded = np.pad(binary_fill_holes(mask2d), 1).astype(np.float32)  # padding closes outlines at the border
    outlines = find_contours(padded, 0.5)
    return [c[:-1] - 1.0 for c in outlines]  # closed: the last point repeats the first


def _rtstruct_dataset(mask: np.ndarray, lps: np.ndarray, images: Sequence[Dataset], target: Path) -> Dataset:
    """The RT Structure Set of `mask`'s outline, on the grid `lps` of the CT `images`."""
    first = images[0]
    ct_size = (int(first.Columns), int(first.Rows))
    if mask.shape[:2] != ct_size:
        raise InputError(f"{target}: the mask ({mask.shape[0]}x{mask.shape[1]}) is not on the CT grid ({ct_size[0]}x{ct_size[1]})")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in images])
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    if np.abs(orientation - np.r_[lps[:3, 0], lps[:3, 1]] / np.repeat(np.linalg.norm(lps[:3, :2], axis=0), 3)).max() > 1e-4:
        raise InputError(f"{target}: the mask's orientation differs from the CT series'")
    slice_image = []
    for k in range(mask.shape[2]):
        distance = np.linalg.norm(positions - (lps @ [0.0, 0.0, k, 1.0])[:3], axis=1)
        if distance.min() > 0.01:
            raise InputError(f"{target}: mask slice {k} lies on no image of the CT series (not the CT's grid)")
        slice_image.append(images[int(np.argmin(distance))])

    now = datetime.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for name in PATIENT_TAGS + STUDY_TAGS:
        if name in first:
            ds.add(copy.deepcopy(first.data_element(name)))
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID  # the Frame of Reference module (PS3.3 A.19.3)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9002
    ds.SeriesDescription = "medcycle body contour"
    ds.OperatorsName = ""
    ds.Manufacturer = "medcycle"
    ds.SoftwareVersions = __version__
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.StructureSetLabel = "BODY"
    ds.StructureSetName = "medcycle body"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ApprovalStatus = "UNAPPROVED"

    def image_ref(image: Dataset) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        return item

    series_item = Dataset()
    series_item.SeriesInstanceUID = first.SeriesInstanceUID
    series_item.ContourImageSequence = DicomSequence([image_ref(image) for image in images])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = STUDY_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
    roi.ROIName = "BODY"
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = "medcycle body mask outline"
    ds.StructureSetROISequence = DicomSequence([roi])

    contours = []
    for k in range(mask.shape[2]):
        for outline in _contours(mask[:, :, k]):
            index = np.c_[outline, np.full(len(outline), float(k)), np.ones(len(outline))]
            points = (lps @ index.T)[:3].T
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([image_ref(slice_image[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
            contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 160, 0]
    roi_contour.ContourSequence = DicomSequence(contours)
    ds.ROIContourSequence = DicomSequence([roi_contour])

    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "EXTERNAL"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    return ds


def _save(ds: Dataset, path: Path) -> None:
    """Write `ds` as a DICOM Part 10 file (preamble, file meta) with pydicom 2.4 and 3.x alike."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:  # pydicom 2.x: the same, under its older name; the encoding comes from the transfer syntax
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(str(path), ds, write_like_original=False)


# --------------------------------------------------------------------------------------------------
# working folders: atomic outputs, stale ones removed


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[Path]:
    """A locked working folder beside `target`, removed afterwards; OSErrors become one InputError line."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target.parent)
        work = target.parent / f"{WORK_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}"
        work.mkdir()
    except OSError as exc:
        raise InputError(f"{target}: cannot write the DICOM output ({exc.strerror or exc})") from None
    lock = None
    try:
        lock = _lock(work)
        yield work
    except OSError as exc:
        raise InputError(f"{target}: cannot write the DICOM output ({exc.strerror or exc})") from None
    finally:
        for entry in work.iterdir() if work.is_dir() else ():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name != LOCK_NAME:
                entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the lock file goes last: a half-removed folder stays recognisable
            (work / LOCK_NAME).unlink(missing_ok=True)
            work.rmdir()
        if lock is not None:
            lock.close()


def _lock(work: Path):
    """Hold an exclusive lock on `work`'s lock file until closed (or the process dies).

    The file is locked under another name and then renamed, so a cleaner never finds it unlocked.
    """
    handle = open(work / f"{LOCK_NAME}.new", "a+b")
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): a live writer cannot be told apart, so nothing is ever removed
        pass
    os.replace(work / f"{LOCK_NAME}.new", work / LOCK_NAME)
    return handle


def _remove_stale(parent: Path) -> None:
    """Remove this writer's working folders in `parent` whose writer is gone (their lock is free)."""
    try:
        import fcntl
    except ImportError:
        return
    for entry in parent.iterdir():
        lock_file = entry / LOCK_NAME
        if not (entry.name.startswith(WORK_PREFIX) and entry.is_dir() and lock_file.is_file()):
            continue
        try:
            handle = open(lock_file, "rb")  # never created here: a writer that just finished removed it
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                continue
            shutil.rmtree(entry, ignore_errors=True)
        warnings.warn(f"{entry}: removed an unfinished DICOM output left by an interrupted run")


def _move_into_place(series: Path, folder: Path, work: Path, overwrite: bool) -> None:
    """Rename `series` onto `folder`; an existing folder is replaced only when `overwrite`."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if folder.exists():
        if not overwrite:
            raise InputError(f"{folder}: already exists and is not empty (use --overwrite to replace it)")
        os.replace(folder, work / "old")  # the old series is removed with the working folder
        try:
            os.replace(series, folder)
        except OSError:
            os.replace(work / "old", folder)  # put the old series back: never neither
            raise
        return
    os.replace(series, folder)
