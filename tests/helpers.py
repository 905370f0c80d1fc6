"""Tiny volumes and grids shared by the tests (imported as ``from helpers import ...``)."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset
from scipy.spatial.transform import Rotation

from medcycle.checkpoint import save_checkpoint
from medcycle.config import Config, config_hash, load_config
from medcycle.data.cache import write_case, write_manifest
from medcycle.dicom import _save
from medcycle.io import ras_affine_to_sitk, sitk_image


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


PIXEL_SPACING = (1.1, 0.9)  # DICOM order: between rows, between columns


STEP = 2.5


def make_series(folder: Path, n: int = 8, rotation=(0.0, 0.0, 0.0), origin=(-20.0, 10.0, 5.0),
                positions: np.ndarray | None = None, tweak: Callable[[int, Dataset], None] | None = None,
                prefix: str = "IM", size=(8, 8)) -> np.ndarray:
    """Write an MR series, file names running against the slice order; returns its voxel-to-LPS affine."""
    folder.mkdir(parents=True, exist_ok=True)
    axes = Rotation.from_euler("zyx", rotation, degrees=True).as_matrix()
    row, column, normal = axes[:, 0], axes[:, 1], axes[:, 2]
    if positions is None:
        positions = np.asarray(origin) + np.outer(np.arange(n) * STEP, normal)
    series_uid = pydicom.uid.generate_uid()
    for k, position in enumerate(positions):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.MRImageStorage, pydicom.uid.generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, 3
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.4"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.PixelSpacing = [str(v) for v in PIXEL_SPACING]
        ds.SliceThickness = str(STEP)
        ds.Rows, ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.InstanceNumber = k + 1
        if tweak is not None:
            tweak(k, ds)
        pixels = (np.arange(int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1))) + 100 * k).astype("<u2")
        ds.PixelData = pixels.tobytes()
        _save(ds, folder / f"{prefix}{len(positions) - k:03d}.dcm")
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * PIXEL_SPACING[1], column * PIXEL_SPACING[0], normal * STEP
    lps[:3, 3] = positions[0]
    return lps


SIZE = 32


def make_cache(root: Path, kinds: Sequence[str] = ("paired", "paired", "paired"), tiles: int = 6, size: int = SIZE,
               k: int = 1, val: int = 1, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """A cache of cases ``c00, c01, ...`` of the given kinds (``paired``, ``mr``, ``ct``); the last `val`
    paired cases are the ``val`` split (as preprocess does). Body masks cover an inner disc."""
    config = load_config(None, [f"data.tile_size={size}", f"data.context_slices={k}", f"data.val_cases={val}", *overrides])
    data, digest = config.to_dict()["data"], config_hash(config.data)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.2).astype(np.uint8)
    entries = {}
    for c, kind in enumerate(kinds):
        case_id = f"c{c:02d}"
        phase = rng.uniform(0, 6, size=(tiles, k))
        mr = np.stack([np.stack([np.sin(5 * xx + 3 * yy * yy + p) * np.cos(3 * yy + 0.5 * c + 2 * xx * xx)
                                 for p in phase[t]]) for t in range(tiles)])
        mr = np.clip(0.9 * mr + rng.normal(0, 0.03, mr.shape), -1, 1).astype(np.float16)
        arrays = {"mask": np.repeat(body[None, None], tiles, axis=0)}
        sources = {}
        if kind in ("paired", "mr"):
            arrays["mr"], sources["mr"] = mr, {"path": f"{case_id}/mr.nii.gz", "sha256": "0"}
        if kind in ("paired", "ct"):
            arrays["ct"], sources["ct"] = (-mr).astype(np.float16), {"path": f"{case_id}/ct.nii.gz", "sha256": "0"}
        write_case(root, case_id, arrays, {"data_config_hash": digest, "paired": kind == "paired", "sources": sources,
                                           "n_tiles": tiles})
        entries[case_id] = {"split": "train", "mr": "mr" in arrays, "ct": "ct" in arrays, "paired": kind == "paired",
                            "n_tiles": tiles}
    paired = [c for c in sorted(entries) if entries[c]["paired"]]
    for case_id in paired[len(paired) - val:] if val else []:
        entries[case_id]["split"] = "val"
    write_manifest(root, data, digest, entries)
    return root


ROOT = Path(__file__).resolve().parents[1]


TINY = ["data.tile_size=32", "data.val_cases=1", "model.gen_width=4", "model.gen_blocks=1", "model.disc_width=4",
        "train.workers=0", "train.pool_size=3"]


HANG = 600


QUIET = ["train.log_every=1", "train.val_every=1000", "train.image_every=1000", "train.checkpoint_every=1000"]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def make_checkpoint(path: Path, tile: int = 16, context: int = 1, amp: str = "none", ct_knots=(), **state_extra) -> Path:
    from medcycle.networks import build_generator

    config = Config.from_dict({
        "data": {"tile_size": tile, "context_slices": context, "spacing": [1.0, 1.0], "ct_knots": [list(k) for k in ct_knots]},
        "model": {"gen_width": 4, "gen_blocks": 1, "disc_width": 4, "disc_layers": 1},
        "train": {"amp": amp},
    }).validate()
    generator = build_generator(context, 4, 1)
    state = {
        "config": config.to_dict(),
        "preprocessing": {"data_config": config.to_dict()["data"], "data_config_hash": config_hash(config.data)},
        "iteration": 1,
        "nets": {"G_mr2ct": generator.state_dict()},
    }
    state.update(state_extra)
    return save_checkpoint(path, state)


SHAPE = (30, 26, 7)


OVERRIDES = ["data.tile_size=32", "data.spacing=[1.0, 1.0]", "data.min_body_fraction=0.05"]


AFFINE = np.diag([0.9, 0.9, 2.5, 1.0])


def make_case(folder: Path, seed: int, kind: str = "nifti", ct: bool = True, mask: bool = False,
              affine: np.ndarray = AFFINE, shape=SHAPE) -> Path:
    """A SynthRAD case folder: mr (and ct) as NIfTI, MHA or DICOM series, optional mask.nii.gz."""
    mr_array, ct_array, body, _, _ = synthetic_head(shape=shape, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "nifti":
        write_nifti(folder / "mr.nii.gz", mr_array, affine, dtype=np.int16)
        if ct:
            write_nifti(folder / "ct.nii.gz", ct_array, affine, dtype=np.int16)
    elif kind == "mha":
        write_mha(folder / "mr.mha", mr_array, affine)
        if ct:
            write_mha(folder / "ct.mha", ct_array, affine)
    elif kind == "dicom":
        write_dicom_series(folder / "mr", mr_array, affine, modality="MR")
        if ct:
            write_dicom_series(folder / "ct", ct_array, affine, modality="CT")
    if mask:
        write_nifti(folder / "mask.nii.gz", body, affine, dtype=np.uint8)
    return folder


def tiny_head(shape=(52, 56, 22), spacing=(3.0, 3.0, 3.0), skull_mm=6.0) -> np.ndarray:
    """An ellipsoidal head in HU: skin-to-skull soft tissue (40 HU), a skull shell (1200 HU) of
    `skull_mm`, brain (30 HU) and a frontal sinus of air; outside -1000 HU. (X, Y, Z) arrays."""
    idx = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    mm = [(i - c) * s for i, c, s in zip(idx, centre, spacing)]
    radii = (70.0, 78.0, 80.0)
    r = np.sqrt(sum((x / a) ** 2 for x, a in zip(mm, radii)))
    scale = min(radii)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r <= 1.0] = 40.0
    hu[r <= 1.0 - 3.0 / scale] = 1200.0
    hu[r <= 1.0 - (3.0 + skull_mm) / scale] = 30.0
    sinus = ((mm[0] / 12) ** 2 + ((mm[1] - 55) / 8) ** 2 + ((mm[2] - 10) / 10) ** 2) <= 1
    hu[sinus] = -1000.0
    return hu


class Constant(torch.nn.Module):
    """A generator that outputs one known value everywhere (conversion tests know their HU)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)
