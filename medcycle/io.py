"""Reading and writing volumes without losing geometry.

Volumes are read through MONAI's ``LoadImage``: NIfTI with MONAI's ``NibabelReader``; MHA, NRRD and
DICOM series with :class:`SimpleITKReader`, a MONAI ``ImageReader`` on SimpleITK (MONAI's own
``ITKReader`` needs the large ``itk`` package). A volume is read once into the image type of
:mod:`medcycle.image` (a ``MetaTensor`` ``(1, X, Y, Z)`` in the file's voxel order with a 4x4 RAS
affine). NIfTI outputs copy the input's header, so sform, qform and their codes come back exactly;
for other inputs the affine is the one SimpleITK reads, LPS to RAS.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage
from nibabel.openers import ImageOpener

from medcycle.errors import InputError
from medcycle.files import NIFTI_SUFFIXES, SITK_SUFFIXES, atomic_write, refuse_overwriting
from medcycle.image import NIFTI_HEADER_KEY, make_image, name_of, source_grid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_to_ras_affine(image: sitk.Image) -> np.ndarray:
    """The voxel-to-RAS affine of a SimpleITK image (whose geometry is LPS)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def ras_affine_to_sitk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) in SimpleITK's LPS convention for a voxel-to-RAS affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def sitk_image(array: np.ndarray, affine: np.ndarray, pixel_type: int | None = None) -> sitk.Image:
    """An (X, Y, Z) array as a SimpleITK image on the grid of a voxel-to-RAS `affine` (the inverse of
    :meth:`SimpleITKReader.get_data`), cast to `pixel_type` when given."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(array), (2, 1, 0))))  # (Z, Y, X)
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    origin, spacing, direction = ras_affine_to_sitk(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """True when `folder` holds DICOM files (a series, checked when it is read)."""
    from medcycle.dicom import is_dicom_folder

    return is_dicom_folder(folder)


class SimpleITKReader(ImageReader):
    """A MONAI ``ImageReader`` for MHA/NRRD files and DICOM-series folders, through SimpleITK.

    ``get_data`` returns the array in (X, Y, Z) order and a RAS ``affine``, like ``NibabelReader``.
    """

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(Path(n).is_dir() or str(n).lower().endswith(SITK_SUFFIXES) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> sitk.Image:
        path = Path(data[0] if isinstance(data, (list, tuple)) else data)
        if path.is_dir():
            from medcycle.dicom import series_files

            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(series_files(path))  # one regular series, checked by medcycle
            shown = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns of sub-tolerance jitter itself
            try:
                return reader.Execute()
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        return sitk.ReadImage(str(path))

    def get_data(self, img: sitk.Image) -> tuple[np.ndarray, dict]:
        array = sitk.GetArrayFromImage(img)
        array = np.transpose(array, tuple(range(array.ndim))[::-1])  # (Z, Y, X) -> (X, Y, Z)
        if img.GetNumberOfComponentsPerPixel() > 1 or img.GetDimension() != 3:
            affine = np.eye(4)
        else:
            affine = sitk_to_ras_affine(img)
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.array(array.shape[:3]),
            "space": "RAS",
            "original_channel_dim": float("nan"),
        }
        return array, meta


def _reader_for(path: Path) -> ImageReader:
    if path.is_dir() or path.name.lower().endswith(SITK_SUFFIXES):
        return SimpleITKReader()
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return NibabelReader()
    raise InputError(f"{path}: not a volume (expected .nii, .nii.gz, .mha, .nrrd or a DICOM folder)")


def load_volume(path: str | Path, allow_constant: bool = False) -> MetaTensor:
    """Read a 3D volume once, through MONAI ``LoadImage``, into the image type of :mod:`medcycle.image`.

    Refused, with one line naming the file: a missing path, an unreadable or truncated file, data
    that is not 3D (2D, 4D, vector images), an empty volume, NaN/Inf values (also values that
    overflow float32, e.g. through a huge scl_slope), a broken geometry (a zero voxel size in the
    NIfTI header, an affine that is singular or not finite) and (unless `allow_constant`, e.g. for
    masks) an all-constant volume. A folder must hold one DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    reader = _reader_for(path)
    if path.is_dir():  # one regular DICOM series, refused otherwise (before MONAI's reader fallbacks)
        from medcycle.dicom import series_files

        series_files(path)
    if isinstance(reader, NibabelReader):
        check_voxel_size(path)
    try:
        # a reader given at call time is the only one tried: MONAI's fallback readers would stack two
        # DICOM series into one volume or hide the reason a folder was refused; nibabel's notes on the
        # header fields it repairs would be lines of their own (the one that matters is checked above)
        with nib.imageglobals.LoggingOutputSuppressor():
            image = LoadImage(image_only=True, dtype=None)(str(path), reader=reader)
    except InputError:
        raise
    except Exception as exc:  # nibabel/SimpleITK/zlib raise many types for corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot be read as a volume (truncated or corrupt?): {reason[:160]}") from None
    array = np.asarray(image.numpy())
    header = None
    affine = np.asarray(image.affine, dtype=np.float64)
    if isinstance(reader, NibabelReader):
        with nib.imageglobals.LoggingOutputSuppressor():
            nifti = nib.load(str(path))
        # nibabel's affine (the sform, else the qform, else the voxel sizes), as every NIfTI viewer
        # shows it: MONAI "rectifies" an sform that disagrees with pixdim by putting the qform in its
        # place, even a qform whose code says unused, which would hide a broken sform
        header, affine = nifti.header, np.asarray(nifti.affine, dtype=np.float64)
        array = _squeeze_to_3d(array)
    values = as_float32(array, path)
    validate_array(values, path, allow_constant=allow_constant)
    check_affine(affine, path)
    return make_image(values, affine, str(path), header)


def check_voxel_size(path: Path) -> None:
    """Refuse a NIfTI whose header gives a spatial voxel size (pixdim) of 0 or not finite.

    nibabel would silently take such a voxel as 1 mm, so the raw header is read, unrepaired.
    """
    try:
        with ImageOpener(str(path)) as handle:
            raw = handle.read(540)
        header = None
        for header_class in (nib.Nifti1Header, nib.Nifti2Header):
            candidate = header_class.from_fileobj(io.BytesIO(raw), check=False)
            if int(candidate["sizeof_hdr"]) == header_class.sizeof_hdr:
                header = candidate
                break
    except Exception:  # noqa: BLE001 - unreadable: the reader of load_volume says why, in one line
        return
    if header is None:
        return
    spatial = max(1, min(3, int(header["dim"][0])))
    voxel = np.asarray(header["pixdim"][1:1 + spatial], dtype=np.float64)
    if not np.all(np.isfinite(voxel)) or np.any(voxel == 0):
        raise InputError(f"{path}: the NIfTI header gives a voxel size (pixdim) of {voxel.tolist()} mm; "
                         "a zero or non-finite voxel size has no geometry")


def check_affine(affine: np.ndarray, path: Path) -> None:
    """Refuse an affine that is not finite or singular (a zero voxel size, or two axes parallel)."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: the affine (voxel-to-world matrix) holds NaN or infinite values")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # a voxel's volume against the box of its edge lengths: 0 when two axes are parallel
    if np.any(spacing < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise InputError(f"{path}: the affine is singular (voxel size {np.round(spacing, 6).tolist()} mm, "
                         "or two voxel axes parallel); the file's geometry is broken")


def as_float32(array: np.ndarray, path: Path) -> np.ndarray:
    """`array` as float32; refuses a type that is not a real number and values float32 cannot hold."""
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"{path}: unsupported voxel type {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below, in one line
        values = np.asarray(array, dtype=np.float32)
    if not np.isfinite(values).all():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise InputError(f"{path}: the volume contains NaN or infinite values")
        largest = float(np.max(np.abs(array.astype(np.float64))))
        raise InputError(f"{path}: values up to {largest:.3g} do not fit in float32 (a wrong scl_slope or "
                         "rescale factor?)")
    return values


def _squeeze_to_3d(array: np.ndarray) -> np.ndarray:
    # A NIfTI with a trailing time axis of length 1 is a 3D volume; longer is a 4D series.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def validate_array(array: np.ndarray, path: Path, allow_constant: bool = False) -> None:
    """Refuse what is not a finite, non-empty, non-constant 3D volume."""
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got {array.ndim}D data of shape {tuple(array.shape)}")
    if min(array.shape) < 2:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(array.shape)} (a 2D image?)")
    if array.size == 0:
        raise InputError(f"{path}: the volume is empty")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"{path}: unsupported voxel type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{path}: the volume contains NaN or infinite values")
    if not allow_constant and array.min() == array.max():
        raise InputError(f"{path}: the volume is all one value ({array.flat[0]}); nothing to process")


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype: Any = np.float32) -> Path:
    """Write `array` as NIfTI with sform and qform both set from `affine` (code 1), atomically."""
    image = nib.Nifti1Image(np.asarray(array).astype(dtype), np.asarray(affine, dtype=np.float64))
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    with atomic_write(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def save_nifti(path: str | Path, array: np.ndarray, like: MetaTensor, dtype: Any = np.int16) -> Path:
    """Write `array` on the grid of the file `like` was read from: same shape, affine, sform/qform
    (codes too), voxel order. `like` is the loaded image or anything the transforms made of it.

    Integer output types are rounded and clipped to the type's range rather than wrapped.
    """
    path = Path(path)
    source = Path(name_of(like))
    refuse_overwriting(path, [(source, "input")])
    affine, shape = source_grid(like)
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {shape}")
    if np.issubdtype(np.dtype(dtype), np.integer) and array.dtype != np.dtype(dtype):  # already that type: as is
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    original = like.meta.get(NIFTI_HEADER_KEY)
    if original is None:
        return write_nifti(path, array, affine, dtype)
    header = original.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(array.shape)
    image = nib.Nifti1Image(array.astype(dtype, copy=False), None, header=header)
    _, sform_code = original.get_sform(coded=True)
    _, qform_code = original.get_qform(coded=True)
    image.set_sform(original.get_sform(), code=int(sform_code or 0))
    image.set_qform(original.get_qform(), code=int(qform_code or 0))
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_write(path) as tmp:
        nib.save(image, str(tmp))
    return path


__all__ = [
    "SimpleITKReader",
    "as_float32",
    "check_affine",
    "check_voxel_size",
    "is_dicom_series",
    "load_volume",
    "ras_affine_to_sitk",
    "sitk_image",
    "save_nifti",
    "sitk_to_ras_affine",
    "validate_array",
    "write_nifti",
]
