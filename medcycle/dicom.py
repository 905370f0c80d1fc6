"""Writing a synthetic CT as a CT DICOM series on the MR's geometry.

:func:`write_ct_series` writes one CT Image Storage file per axial slice (the last array axis) with
new Study, Series and SOP Instance UIDs, ``ImageType DERIVED\\SECONDARY``, ``RescaleSlope 1`` and
``RescaleIntercept -1024`` (16-bit pixels: unsigned when every value is >= -1024 HU, else signed),
and the geometry of the RAS affine converted to DICOM's LPS patient coordinates:

* ``ImageOrientationPatient``: the directions of array axes 0 (along a row, i.e. columns) and 1
  (down the rows); ``PixelSpacing`` = [spacing of axis 1, spacing of axis 0];
* ``ImagePositionPatient`` of slice k: the centre of voxel (0, 0, k);
* ``SliceThickness`` / ``SpacingBetweenSlices``: the spacing of axis 2.

Pixel (row j, column i) of file k holds ``hu[i, j, k]``. SimpleITK (GDCM) reads the series back with
the same geometry and voxel order, left-handed grids (slices running against the row x column
normal) included. The grid must not be sheared (DICOM cannot describe it).

With a ``reference`` DICOM (a file, a series folder or a pydicom ``Dataset``) the patient tags and
descriptive study tags are copied so the series files under the same patient; the Frame of
Reference UID is kept too since the sCT lies in the MR's patient coordinates.
The series is written to a temporary folder beside ``folder`` and renamed at the end.
"""
from __future__ import annotations

import datetime
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from medcycle.errors import InputError

__all__ = ["write_ct_series", "check_affine", "SERIES_DESCRIPTION", "RESCALE_INTERCEPT"]

SERIES_DESCRIPTION = "medcycle synthetic CT"
RESCALE_INTERCEPT = -1024.0
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

PATIENT_TAGS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "OtherPatientIDs", "PatientComments", "EthnicGroup",
)
STUDY_TAGS = (
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "InstitutionName",
)
CARRIED_TAGS = ("FrameOfReferenceUID", "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined")

ReferenceLike = Union[str, os.PathLike, Dataset, None]


def _read_reference(reference: ReferenceLike) -> Optional[Dataset]:
    if reference is None or isinstance(reference, Dataset):
        return reference
    path = Path(reference)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path]
    for file in files:
        try:
            return pydicom.dcmread(str(file), stop_before_pixels=True)
        except Exception:  # not a DICOM file (e.g. a DICOMDIR-less folder with other files)
            continue
    raise InputError(f"{path}: no readable DICOM file to take patient and study tags from")


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(LPS affine, unit direction columns, spacing) of a voxel-to-RAS affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise ValueError(f"affine has a zero or non-finite axis: {affine.tolist()}")
    return lps, lps[:3, :3] / spacing, spacing


def check_affine(affine: np.ndarray, folder: Union[str, os.PathLike] = "DICOM output") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def write_ct_series(
    folder: Union[str, os.PathLike],
    hu: np.ndarray,
    affine: np.ndarray,
    reference: ReferenceLike = None,
    overwrite: bool = False,
    series_description: str = SERIES_DESCRIPTION,
) -> list[Path]:
    """Write `hu` (X, Y, Z) in Hounsfield units as a CT DICOM series in `folder`; returns the files.

    `affine` is the voxel-to-RAS affine of `hu` (as read by :func:`medcycle.io.load_volume`).
    An existing non-empty `folder` is refused unless `overwrite`. Nothing is left behind on failure.
    """
    folder = Path(folder)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (X, Y, Z) array, got shape {hu.shape}")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; choose a folder for the DICOM series")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"{folder}: already exists and is not empty (use --overwrite to replace it)")
    ref = _read_reference(reference)
    lps, direction, spacing = check_affine(affine, folder)

    stored = np.rint(np.asarray(hu, dtype=np.float64)) - RESCALE_INTERCEPT
    signed = bool(stored.min() < 0)
    kind = np.int16 if signed else np.uint16
    info = np.iinfo(kind)
    stored = np.clip(stored, info.min, info.max).astype(kind)

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    study_uid, series_uid = generate_uid(), generate_uid()
    frame_uid = str(getattr(ref, "FrameOfReferenceUID", "") or "") or generate_uid()
    normal = np.cross(direction[:, 0], direction[:, 1])
    orientation = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]

    base = Dataset()
    if ref is not None:
        for name in PATIENT_TAGS + STUDY_TAGS + CARRIED_TAGS:
            if name in ref and ref.data_element(name) is not None and ref.data_element(name).value not in (None, ""):
                setattr(base, name, ref.data_element(name).value)
    base.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so copied names keep their characters
    for name in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):  # type 2: present, maybe empty
        if name not in base:
            setattr(base, name, "")
    for name in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if name not in base:
            setattr(base, name, date if name == "StudyDate" else time if name == "StudyTime" else "")
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.FrameOfReferenceUID = frame_uid
    if "PositionReferenceIndicator" not in base:
        base.PositionReferenceIndicator = ""
    base.SOPClassUID = CTImageStorage
    base.Modality = "CT"
    base.ImageType = ["DERIVED", "SECONDARY"]
    base.SeriesDescription = series_description
    base.SeriesNumber = 9001
    base.SeriesDate, base.SeriesTime = date, time
    base.ContentDate, base.ContentTime = date, time
    base.InstanceCreationDate, base.InstanceCreationTime = date, time
    base.Manufacturer = "medcycle"
    base.DerivationDescription = "synthetic CT generated from MR by medcycle (CycleGAN)"
    base.BurnedInAnnotation = "NO"
    base.KVP = ""
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = orientation
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

    tmp = folder.parent / f".tmp-{uuid.uuid4().hex[:8]}-{folder.name}"
    written: list[Path] = []
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for k in range(hu.shape[2]):
            ds = Dataset()
            ds.update(base)
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            position = lps @ np.array([0.0, 0.0, float(k), 1.0])
            ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
            ds.SliceLocation = _ds(float(np.dot(position[:3], normal)))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype(stored.dtype.newbyteorder("<")).tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            name = f"CT_{k + 1:04d}.dcm"
            ds.save_as(str(tmp / name), enforce_file_format=True)
            written.append(folder / name)
        _replace_folder(tmp, folder, overwrite)
    except OSError as exc:
        raise InputError(f"{folder}: cannot write the DICOM series ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def _replace_folder(tmp: Path, folder: Path, overwrite: bool) -> None:
    """Rename `tmp` onto `folder`; an existing folder is replaced only when `overwrite`."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.replace(tmp, folder)
        return
    if not overwrite:
        raise InputError(f"{folder}: already exists and is not empty (use --overwrite to replace it)")
    old = folder.parent / f".old-{uuid.uuid4().hex[:8]}-{folder.name}"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
