"""Tiny volumes and grids shared by the tests (imported as ``from helpers import ...``)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medcycle.io import ras_affine_to_sitk


def oblique_affine(spacing=(0.8, 0.8, 3.0), angles=(12.0, -8.0, 20.0), origin=(-30.5, 12.25, -7.0)) -> np.ndarray:
    """A rotated (oblique) voxel-to-RAS affine with anisotropic spacing."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def flipped_affine(spacing=(0.8, 0.8, 3.0)) -> np.ndarray:
    """LPS-ish voxel order: axis 0 runs to the left, axis 1 posterior, axis 2 superior."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (40.0, 35.5, -12.0)
    return affine


def ramp(shape=(12, 10, 6)) -> np.ndarray:
    """Distinct values in every voxel, so any reordering or flip of the axes shows."""
    return (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 3.0 - 200.0)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, sform_code: int = 1, qform_code: int = 1,
                dtype=np.float32) -> Path:
    image = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def sitk_image(array: np.ndarray, affine: np.ndarray, pixel_type=None) -> sitk.Image:
    """A SimpleITK image of an (X, Y, Z) array on the grid of a voxel-to-RAS `affine`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    origin, spacing, direction = ras_affine_to_sitk(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def write_mha(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk_image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


_UID_COUNTER = [0]


def write_dicom_series(folder: Path, array: np.ndarray, affine: np.ndarray, modality: str = "MR",
                       series_uid: str | None = None) -> Path:
    """Write an int16 DICOM series with SimpleITK, one file per axial slice, with explicit geometry tags."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk_image(np.rint(array).astype(np.int16), affine)
    origin, spacing, direction = ras_affine_to_sitk(affine)
    _UID_COUNTER[0] += 1
    root = f"1.2.826.0.1.3680043.8.498.{os.getpid()}.{int(time.time() * 1000)}.{_UID_COUNTER[0]}"
    series_uid = series_uid or f"{root}.1"
    orientation = "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                    direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        plane = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{index + 1}",
            "0020|000d": f"{root}.9",
            "0020|000e": series_uid,
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{spacing[1]:.10f}\\{spacing[0]:.10f}",
            "0018|0050": f"{spacing[2]:.10f}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{index:03d}.dcm"))
        writer.Execute(plane)
    return folder


def permuted_affine() -> np.ndarray:
    """Non-RAS, permuted voxel order: axis 0 runs inferior (2 mm), axis 1 left, axis 2 anterior."""
    affine = np.zeros((4, 4))
    affine[0, 1] = -0.9
    affine[1, 2] = 1.1
    affine[2, 0] = -2.0
    affine[:3, 3] = (20.0, -15.0, 30.0)
    affine[3, 3] = 1.0
    return affine


def oblique_lps_affine() -> np.ndarray:
    """Voxel axes roughly L, P, S (flipped in-plane), rotated, 0.8 x 0.8 x 3 mm."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("z", 7.0, degrees=True).as_matrix() @ np.diag([-0.8, -0.8, 3.0])
    affine[:3, 3] = (15.0, 22.5, -10.0)
    return affine


def synthetic_head(shape=(40, 36, 14), seed=0, noise=12.0):
    """(mr, ct, truth) arrays (X, Y, Z): MR in scanner units, CT in HU, the true body as a boolean."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (grid[0] / 0.8) ** 2 + (grid[1] / 0.75) ** 2 + (grid[2] / 1.6) ** 2
    body = r <= 1.0
    skull = (r > 0.55) & (r <= 0.78)
    brain = r <= 0.55
    sinus = ((grid[0] - 0.1) ** 2 + (grid[1] + 0.35) ** 2 <= 0.12**2) & (np.abs(grid[2]) < 0.5)
    mr = np.zeros(shape)
    mr[body] = 700.0
    mr[skull] = 40.0  # cortical bone: dark in MR
    mr[brain] = 420.0 + 60.0 * grid[0][brain]
    mr[sinus] = 0.0  # air inside the head
    mr = np.abs(mr + rng.normal(0.0, noise, shape))  # Rician-like background noise
    ct = np.full(shape, -1000.0)
    ct[body] = 30.0
    ct[skull] = 1400.0
    ct[brain] = 35.0
    ct[sinus] = -1000.0
    return mr.astype(np.float32), ct.astype(np.float32), body, skull, sinus


def phantom_mr(shape) -> np.ndarray:
    """A head-like MR: ellipsoid body (500) holding a bright box (1000) in one corner, air 0."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (grid[0] / 0.8) ** 2 + (grid[1] / 0.75) ** 2 + (grid[2] / 1.3) ** 2 <= 1.0
    mr = np.where(body, 500.0, 0.0).astype(np.float32)
    x, y = shape[0], shape[1]
    mr[int(0.25 * x): int(0.5 * x), int(0.3 * y): int(0.6 * y), :] = 1000.0
    mr[~body] = 0.0
    return mr
