"""The built-in synthetic paired MR/CT head phantom.

Every case starts from a 3D tissue label map of a head (:data:`TISSUES`): an ellipsoidal head whose
level sets are deformed by smooth random fields, with skin, subcutaneous fat, temporal and neck
muscle, a skull of outer table / diploe / inner table down to a skull base (anterior, middle and
posterior fossae) with the sphenoid, frontal, ethmoid and maxillary sinuses, the nasal cavity and
mastoid air cells (air inside bony walls), the mandible and upper cervical spine, orbits with eyes and orbital fat, CSF (subarachnoid rim, fissures, sulci)
and ventricles, a folded grey-matter cortex around white matter, deep grey matter, the brainstem and
the cord. Shape, size, pose, skull thickness, ventricle size and sinus sizes vary per case.

From the same label map, with one tissue table for both modalities:

* CT in HU: per-tissue values drawn inside :attr:`Tissue.ct_range`, fine texture (trabecular in
  cancellous bone), slowly varying cortical density, partial-volume blur (Gaussian, ~0.6 voxel),
  Gaussian noise (10-20 HU); int16 clipped to [-1024, 3071].
* MR: T1-weighted spin-echo contrast (:attr:`Tissue.mr`, relative intensities: fat bright, bone
  and air dark), small texture, the same partial-volume blur, a smooth multiplicative bias field
  (+-15-25 %), a global scanner scale per case (400-3000) and Rician noise (sigma 2-3 % of the white
  matter signal). Values are rounded to whole scanner units (as scanners store them) and kept as
  float32 in memory; files hold them as int16, which is therefore lossless.
* mask: the body (every voxel that is not outside air; sinuses are inside), uint8 0/1.

Geometry: arrays are (X, Y, Z) in RAS voxel order (x to the right, y anterior, z superior), axial
slices along Z, vertex at the top. ``full`` is 192 x 224 x 64 voxels of 1 x 1 x 2.5 mm, ``small``
the same field of view and anatomy at 64 x 75 x 32 voxels of 3 x 3 x 5 mm (for tests). The head
pose varies (+-8 degrees per axis); every third case (index % 3 == 1) has an oblique affine (rotated
5-15 degrees about one or two axes). The origin is never zero.

A pair on real anatomy (:func:`case_from_ct`): a real head CT's body labelled with the same tissues by
its HU (:func:`labels_from_ct`) and an MR rendered from them as above, on the CT's own grid: the real
skull, face and skull base the phantom only approximates, with the MR-to-CT relation no unpaired scan gives.

Determinism: case ``index`` of ``seed`` comes from ``np.random.default_rng([seed, index])`` alone,
so it is the same whatever the number of cases, and ``small`` and ``full`` share every anatomical
random draw (the smooth fields are defined in millimetres, independent of the grid); only the
voxel noise differs.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "AIR", "SKIN", "FAT", "MUSCLE", "CORTICAL_BONE", "CANCELLOUS_BONE", "CSF", "GREY_MATTER",
    "WHITE_MATTER", "VENTRICLES", "EYE", "SINUS",
    "FILES", "SIZES", "TISSUES", "GridSize", "PhantomCase", "Tissue",
    "case_from_ct", "case_grid", "case_name", "labels_from_ct", "make_case", "write_case",
]


@dataclass(frozen=True)
class Tissue:
    """One tissue class of the label map, used for both modalities."""

    label: int
    name: str
    ct_range: tuple[float, float]  # HU: the tissue's CT value (before blur and noise) lies in this range
    mr: float  # relative T1-weighted intensity (spin echo, TR 500 ms, TE 15 ms; 1.5 T tissue parameters)
    ct_texture: float = 0.0  # HU amplitude of the fine texture
    mr_texture: float = 0.0  # relative amplitude of the MR texture (negative: anti-correlated with CT)


AIR, SKIN, FAT, MUSCLE, CORTICAL_BONE, CANCELLOUS_BONE, CSF, GREY_MATTER, WHITE_MATTER, VENTRICLES, EYE, SINUS = range(12)

#: label -> tissue; ``TISSUES[label].label == label``. HU ranges from radiology tables and relative
#: T1w intensities from BrainWeb tissue parameters (docs: shared/reference/tissue-values.md).
TISSUES: tuple[Tissue, ...] = (
    Tissue(AIR, "air", (-1010.0, -990.0), 0.0),
    Tissue(SKIN, "skin", (20.0, 60.0), 0.30, 4.0, 0.04),
    Tissue(FAT, "fat", (-120.0, -80.0), 0.61, 6.0, 0.03),
    Tissue(MUSCLE, "muscle", (40.0, 50.0), 0.31, 3.0, 0.03),
    Tissue(CORTICAL_BONE, "cortical_bone", (1000.0, 1900.0), 0.0, 60.0, 0.0),
    Tissue(CANCELLOUS_BONE, "cancellous_bone", (300.0, 600.0), 0.22, 110.0, -0.12),
    Tissue(CSF, "csf", (10.0, 20.0), 0.17, 1.5, 0.02),
    Tissue(GREY_MATTER, "grey_matter", (35.0, 45.0), 0.32, 2.0, 0.025),
    Tissue(WHITE_MATTER, "white_matter", (25.0, 30.0), 0.39, 1.0, 0.02),
    Tissue(VENTRICLES, "ventricles", (10.0, 20.0), 0.17, 1.5, 0.02),
    Tissue(EYE, "eye", (5.0, 15.0), 0.17, 1.5, 0.02),
    Tissue(SINUS, "sinus_air", (-1010.0, -990.0), 0.0),  # air inside the head: sinuses, nasal cavity, airway
)


@dataclass(frozen=True)
class GridSize:
    """A voxel grid: shape (X, Y, Z) and spacing in mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


#: ``full``: the whole head at about 1 x 1 x 2.5 mm; ``small``: the same field of view, coarse.
SIZES: dict[str, GridSize] = {
    "full": GridSize((192, 224, 64), (1.0, 1.0, 2.5)),
    "small": GridSize((64, 75, 32), (3.0, 3.0, 5.0)),
}

#: file name -> (PhantomCase attribute, on-disk dtype)
FILES: dict[str, tuple[str, type]] = {
    "mr.nii.gz": ("mr", np.int16),
    "ct.nii.gz": ("ct", np.int16),
    "mask.nii.gz": ("mask", np.uint8),
    "labels.nii.gz": ("labels", np.uint8),
}

CT_CLIP = (-1024, 3071)


@dataclass
class PhantomCase:
    """One paired case on one grid: every array is (X, Y, Z) in RAS voxel order on ``affine``."""

    labels: np.ndarray  # uint8 tissue labels (TISSUES)
    ct: np.ndarray  # int16 HU in [-1024, 3071]
    mr: np.ndarray  # float32 T1w scanner units (whole numbers, >= 0)
    mask: np.ndarray  # uint8 body mask 0/1
    affine: np.ndarray  # 4x4 float64 voxel -> RAS mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.labels.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def case_name(index: int) -> str:
    """The folder name of case `index`: ``phantom_000``, ``phantom_001``, ..."""
    return f"phantom_{index:03d}"


# --------------------------------------------------------------------------------------------------
# random parameters of a case (drawn first, so the grid is known without building the case)


def _rotation(angles_deg: Iterable[float]) -> np.ndarray:
    """Rz @ Ry @ Rx for angles (about x, y, z) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(list(angles_deg), dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_params(rng: np.random.Generator, index: int) -> dict:
    """Every scalar random parameter of a case, in a fixed order."""
    u = rng.uniform
    p: dict = {}
    k = u(0.94, 1.05)  # overall head size
    p["axes"] = np.array([k * u(68.0, 75.0), k * u(86.0, 94.0), k * u(84.0, 94.0)])  # skin semi-axes x, y, z (top)
    p["az_low"] = p["axes"][2] * u(2.0, 2.6)  # below the brain centre the head narrows slowly
    p["scale"] = p["axes"] / np.array([72.0, 90.0, 89.0])  # landmark scaling of a standard head
    p["pose"] = _rotation(u(-8.0, 8.0, size=3))
    p["offset_xy"] = u(-4.0, 4.0, size=2)
    p["top_margin"] = u(6.0, 14.0)
    p["shape_amp"] = u(0.01, 0.025)
    p["t_skin"], p["t_fat"], p["t_temporal"] = u(1.5, 2.5), u(2.5, 5.0), u(4.0, 9.0)
    skull = u(0.8, 1.35)
    p["t_outer"], p["t_diploe"], p["t_inner"] = 1.8 * skull, 2.8 * skull, 1.4 * skull
    p["t_base"] = u(4.0, 7.0)
    p["t_csf"], p["t_gm"] = u(1.5, 3.2), u(2.5, 3.5)
    p["sulcus_depth"], p["sulcus_width"] = u(10.0, 18.0), u(0.7, 1.2)
    p["ventricles"] = u(0.7, 1.6)
    p["base_levels"] = np.array([-u(10.0, 15.0), -u(35.0, 42.0), -u(20.0, 26.0), -u(50.0, 58.0)])  # ant, mid, sella, post
    p["eye"] = np.array([u(29.0, 33.0), u(-32.0, -27.0), u(11.0, 12.5)])  # |x|, z, radius
    p["frontal_z"], p["frontal_size"] = u(0.0, 12.0), u(0.4, 1.2)
    p["sphenoid_size"], p["maxillary_size"] = u(0.75, 1.2), u(0.8, 1.15)
    # CT: a value per tissue in the middle half of its range; cortical bone density; noise; blur
    lo, hi = (np.array([t.ct_range[i] for t in TISSUES]) for i in (0, 1))
    p["ct_base"] = lo + (hi - lo) * u(0.25, 0.75, size=len(TISSUES))
    p["ct_base"][CORTICAL_BONE] = u(1400.0, 1650.0)
    p["ct_noise"] = u(10.0, 20.0)
    p["blur"] = u(0.5, 0.7)  # voxels
    # MR: scanner scale, small per-tissue jitter, bias field amplitude, noise relative to white matter
    p["mr_scale"] = u(400.0, 3000.0)
    p["mr_jitter"] = u(0.97, 1.03, size=len(TISSUES))
    p["bias_amp"] = u(0.15, 0.25)
    p["mr_noise"] = u(0.02, 0.03)
    # acquisition: oblique affine for every third case, world position of the field of view
    angles = np.zeros(3)
    if index % 3 == 1:
        axes = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
        angles[axes] = u(5.0, 15.0, size=len(axes)) * rng.choice([-1.0, 1.0], size=len(axes))
    p["oblique"] = _rotation(angles)
    p["fov_centre"] = u(-15.0, 15.0, size=3) + np.array([0.0, 10.0, 20.0])
    return p


def _affine(p: dict, grid: GridSize) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = p["oblique"] @ np.diag(grid.spacing)
    centre_index = (np.asarray(grid.shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = p["fov_centre"] - affine[:3, :3] @ centre_index
    return affine


def _check_size(size: str) -> GridSize:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def case_grid(seed: int, index: int, size: str = "full") -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of case `index` of `seed` without building it (cheap; for resuming)."""
    grid = _check_size(size)
    return grid.shape, _affine(_draw_params(np.random.default_rng([seed, index]), index), grid)


# --------------------------------------------------------------------------------------------------
# smooth random fields, defined in millimetres on a fixed box so every grid sees the same field

_FIELD_HALF = np.array([100.0, 116.0, 84.0])  # half-extent (mm) of the box around the field-of-view centre


def _basis(coords: np.ndarray, spacing: float, half: float) -> np.ndarray:
    """(len(coords), nodes) Gaussian bumps every `spacing` mm, normalised so the field has unit variance."""
    n = int(np.ceil(half / spacing)) + 1
    nodes = np.arange(-n, n + 1) * spacing
    phi = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.75 * spacing)) ** 2)
    phi /= np.sqrt((phi ** 2).sum(axis=1, keepdims=True))
    return phi.astype(np.float32)


def _coefficients(rng: np.random.Generator, spacing: float, count: int) -> np.ndarray:
    shape = tuple(2 * (int(np.ceil(h / spacing)) + 1) + 1 for h in _FIELD_HALF)
    return rng.standard_normal((count, *shape), dtype=np.float32)


def _evaluate(coef: np.ndarray, spacing: float, axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Unit-variance smooth fields (count, X, Y, Z) from `coef` at the voxel centres `axes_mm`."""
    bx, by, bz = (_basis(c, spacing, h) for c, h in zip(axes_mm, _FIELD_HALF))
    out = np.empty((coef.shape[0], len(bx), len(by), len(bz)), dtype=np.float32)
    for f, c in enumerate(coef):
        a, b, cz = c.shape
        t = (bx @ c.reshape(a, b * cz)).reshape(len(bx), b, cz)  # (X, b, c)
        t = np.matmul(by, t)  # (X, Y, c)
        out[f] = (t.reshape(-1, cz) @ bz.T).reshape(len(bx), len(by), len(bz))
    return out


def _evaluate_at(coef: np.ndarray, spacing: float, point: np.ndarray) -> np.ndarray:
    """The fields of `coef` at one point (mm, field-of-view frame)."""
    bx, by, bz = (_basis(np.array([v]), spacing, h)[0] for v, h in zip(point, _FIELD_HALF))
    return np.einsum("fabc,a,b,c->f", coef, bx, by, bz)


# --------------------------------------------------------------------------------------------------
# the anatomy


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _Head:
    """Head-frame coordinates (mm; x right, y anterior, z superior; origin at the brain centre)."""

    def __init__(self, grid: GridSize, p: dict) -> None:
        self.grid = grid
        self.shape = grid.shape
        self.spacing = np.asarray(grid.spacing)
        self.axes_mm = tuple(((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)
                             for n, s in zip(grid.shape, grid.spacing))
        self.pose = p["pose"]
        axes, az_low = p["axes"], p["az_low"]
        # the head centre: vertex `top_margin` below the top of the field of view
        top = grid.shape[2] * grid.spacing[2] / 2.0
        extent = np.sqrt(((self.pose * axes[None, :]) ** 2).sum(axis=1))  # half-extents of the rotated ellipsoid
        cz = top - p["top_margin"] - extent[2] * (1.0 + 2.5 * p["shape_amp"])
        self.centre = np.array([p["offset_xy"][0], p["offset_xy"][1], cz])
        rt = self.pose.T.astype(np.float32)
        d = [a - c for a, c in zip(self.axes_mm, self.centre.astype(np.float32))]
        x, y, z = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
        self.x = rt[0, 0] * x + rt[0, 1] * y + rt[0, 2] * z
        self.y = rt[1, 0] * x + rt[1, 1] * y + rt[1, 2] * z
        self.z = rt[2, 0] * x + rt[2, 1] * y + rt[2, 2] * z
        self.axes, self.az_low = axes, az_low

    def to_fov(self, point: np.ndarray) -> np.ndarray:
        """A head-frame point in the field-of-view frame (mm)."""
        return self.pose @ np.asarray(point, dtype=np.float64) + self.centre

    def box(self, centre: Iterable[float], radii: Iterable[float]) -> tuple[slice, slice, slice]:
        """Index slices of the array box holding the head-frame box `centre` +- `radii`."""
        c, r = np.asarray(list(centre), dtype=np.float64), np.asarray(list(radii), dtype=np.float64)
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * r + c
        fov = corners @ self.pose.T + self.centre
        index = fov / self.spacing + (np.asarray(self.shape) - 1) / 2.0
        lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, self.shape)
        hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, self.shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def q(self, sl: tuple[slice, ...], centre: Iterable[float], radii: Iterable[float]) -> np.ndarray:
        """Squared normalised ellipsoid radius (< 1 inside) on the box `sl`."""
        c, r = list(centre), list(radii)
        return (((self.x[sl] - c[0]) / r[0]) ** 2 + ((self.y[sl] - c[1]) / r[1]) ** 2
                + ((self.z[sl] - c[2]) / r[2]) ** 2)

    def front(self, x: float, z: float, shape_field: float, shape_amp: float) -> float:
        """y (head frame) of the anterior skin surface at height `z`, lateral position `x`."""
        ax, ay, az = self.axes
        azz = az if z > 0 else self.az_low
        return float(ay * np.sqrt(max(1.0 - (x / ax) ** 2 - (z / azz) ** 2, 0.05)) * (1.0 + shape_amp * shape_field))


_Where = Optional[Callable[[tuple[slice, ...]], np.ndarray]]  # extra condition on a box of the grid


def _paint_ellipsoid(labels: np.ndarray, head: _Head, centre: Sequence[float], radii: Sequence[float], value: int,
                     where: _Where = None) -> None:
    """Set the voxels inside a head-frame ellipsoid (and `where`) to `value`."""
    sl = head.box(centre, radii)
    if any(s.stop <= s.start for s in sl):
        return
    inside = head.q(sl, centre, radii) < 1.0
    if where is not None:
        inside &= where(sl)
    labels[sl][inside] = value


def _paint_bone_shell(labels: np.ndarray, head: _Head, centre: Sequence[float], radii: Sequence[float], wall: float,
                      value: int, where: _Where = None) -> None:
    """An ellipsoidal cavity `value` inside a cortical-bone wall `wall` mm thick."""
    outer = [r + wall for r in radii]
    _paint_ellipsoid(labels, head, centre, outer, CORTICAL_BONE, where)
    _paint_ellipsoid(labels, head, centre, radii, value, where)


def _anatomy(head: _Head, p: dict, low: np.ndarray, mid: np.ndarray, fine: np.ndarray,
             shape_at: Callable[[tuple[float, float, float]], float]) -> np.ndarray:
    """The tissue label map (uint8), painted from the outside in; later structures override earlier ones.

    `low` (7 fields, 40 mm scale), `mid` (2, 9 mm) and `fine` (1, 3 mm) are unit-variance smooth random
    fields on the grid; `shape_at` gives the head-shape field at a head-frame point.
    """
    f32 = np.float32
    ax, ay, az = (f32(v) for v in head.axes)
    kx, ky, kz = (float(v) for v in p["scale"])
    x, y, z = head.x, head.y, head.z
    labels = np.zeros(head.shape, dtype=np.uint8)

    # depth below the (deformed) skin along rays from the head centre, in mm
    azz = np.where(z > 0, az, f32(head.az_low))
    norm = np.sqrt(x * x + y * y + z * z) + f32(1e-3)
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / azz) ** 2) + f32(1e-6)
    depth = norm / r * (f32(1.0) + f32(p["shape_amp"]) * np.clip(low[0], -2.5, 2.5)) - norm
    del azz, r

    temporal = f32(p["t_temporal"]) * (x / norm) ** 4 * np.exp(-(((z + 5 * kz) / (30 * kz)) ** 2) - ((y - 5 * ky) / (35 * ky)) ** 2)
    t_skin = f32(p["t_skin"]) * (1 + f32(0.15) * np.clip(low[1], -2, 2))
    t_fat = f32(p["t_fat"]) * (1 + f32(0.25) * np.clip(low[1], -2, 2))
    s0 = t_skin + t_fat + temporal  # outer surface of the skull
    skull_k = 1 + f32(0.2) * np.clip(low[2], -2, 2)
    s_outer = s0 + f32(p["t_outer"]) * skull_k
    s_diploe = s_outer + f32(p["t_diploe"]) * skull_k
    s1 = s_diploe + f32(p["t_inner"]) * skull_k  # inner surface of the skull
    del skull_k

    # the skull base: fossa floors (anterior, middle with the sella, posterior)
    ant, mid_lvl, sella, post = (float(v) for v in p["base_levels"])
    a_w = _sig((y - f32(28 * ky)) / f32(4 * ky))
    p_w = _sig((f32(-18 * ky) - y) / f32(5 * ky))
    m_w = np.clip(1 - a_w - p_w, 0, 1)
    central = _sig((f32(12 * kx) - np.abs(x)) / f32(3 * kx))
    z_base = (a_w * f32(ant * kz) + m_w * (f32(mid_lvl * kz) + central * f32((sella - mid_lvl) * kz))
              + p_w * f32(post * kz)) + f32(2.5) * np.clip(low[6], -2, 2)
    del a_w, p_w, m_w, central

    labels[depth > 0] = SKIN
    labels[depth > t_skin] = FAT
    deep = depth > t_skin + t_fat
    labels[deep & (depth < s0)] = MUSCLE  # temporal muscle
    inner = depth > s0
    above = z > z_base
    cranial_skull = inner & above
    labels[cranial_skull] = CORTICAL_BONE
    labels[cranial_skull & (depth > s_outer) & (depth < s_diploe)] = CANCELLOUS_BONE
    del s_outer, s_diploe, cranial_skull

    # base plate and the lower head (face, neck) under it
    t_base = f32(p["t_base"])
    below = z_base - z  # mm under the fossa floor
    plate = inner & ~above & (below < t_base)
    labels[plate] = np.where((below[plate] > 1.5) & (below[plate] < t_base - 1.5), CANCELLOUS_BONE, CORTICAL_BONE)
    lower = inner & (below >= t_base)
    labels[lower] = MUSCLE
    labels[lower & (mid[1] > 1.1)] = FAT  # fat between the muscles
    face = lower & (y > 0) & (depth > s0 + 4) & (depth < s0 + 9)  # maxilla, zygoma
    labels[face] = np.where((depth[face] > s0[face] + 5.5) & (depth[face] < s0[face] + 7.5), CANCELLOUS_BONE, CORTICAL_BONE)
    del plate, lower, face, below

    # intracranial: CSF, then the brain with a folded cortex
    cranial = (depth > s1) & above
    labels[cranial] = CSF
    t_csf = f32(p["t_csf"]) * (1 + f32(0.25) * np.clip(low[3], -2, 2))
    brain_depth = np.minimum(depth - s1, z - z_base) - t_csf
    brain = cranial & (brain_depth > 0)
    del cranial
    t_gm = f32(p["t_gm"]) * (1 + f32(0.15) * np.clip(low[3], -2, 2))
    sulcus = np.abs(mid[0]) * f32(6.0)  # ~ mm from the sulcal sheet (zero set of a 9 mm-scale field)
    deep_enough = brain_depth < f32(p["sulcus_depth"]) * (1 + f32(0.3) * low[4])
    grey = brain & ((brain_depth < t_gm) | (deep_enough & (sulcus < f32(p["sulcus_width"]) + t_gm)))
    labels[brain] = WHITE_MATTER
    labels[grey] = GREY_MATTER
    labels[brain & deep_enough & (sulcus < f32(p["sulcus_width"]))] = CSF
    del grey, deep_enough, sulcus, t_gm, t_csf

    # interhemispheric fissure (down to the corpus callosum, to the base in front and behind)
    fissure_floor = np.where(np.abs(y) > 45 * ky, -200.0, 28.0 * kz).astype(f32)
    split = brain & (z > fissure_floor)
    labels[split & (np.abs(x) < f32(p["t_gm"]) + 1.2)] = GREY_MATTER
    labels[split & (np.abs(x) < 1.2)] = CSF
    # tentorium between the occipital lobes and the cerebellum
    # (a tent: highest at the midline in front, sloping down backwards and sideways)
    z_tent = f32(-18 * kz) + f32(0.45) * (y + f32(20 * ky)) - f32(0.5) * np.abs(x)
    from_tent = np.abs(z - z_tent) * f32(1.0 / np.sqrt(1.0 + 0.45 ** 2 + 0.5 ** 2))  # ~ normal distance, mm
    tent = brain & (y < -20 * ky) & (from_tent < f32(p["t_gm"]) + 1.0)
    labels[tent] = GREY_MATTER
    labels[tent & (from_tent < 1.0)] = CSF
    del split, tent, z_tent, from_tent, fissure_floor, brain_depth

    # deep grey matter, ventricles, brainstem and cord
    in_brain = brain.__getitem__
    for side in (-1, 1):
        _paint_ellipsoid(labels, head, (side * 16 * kx, 8 * ky, 2 * kz), (7 * kx, 14 * ky, 9 * kz), GREY_MATTER, in_brain)
        _paint_ellipsoid(labels, head, (side * 9 * kx, -10 * ky, 2 * kz), (7 * kx, 10 * ky, 8 * kz), GREY_MATTER, in_brain)
    v = p["ventricles"]
    for side in (-1, 1):
        _paint_ellipsoid(labels, head, (side * (3 + 5 * v) * kx, 0, 14 * kz), (3.5 * v * kx, (22 + 4 * v) * ky, 5.5 * v * kz), VENTRICLES)
        _paint_ellipsoid(labels, head, (side * (4 + 4 * v) * kx, 20 * ky, 6 * kz), (3 * v * kx, 9 * ky, 6 * v * kz), VENTRICLES)
        _paint_ellipsoid(labels, head, (side * (6 + 7 * v) * kx, -28 * ky, 9 * kz), (2.5 * v * kx, 11 * ky, 4.5 * v * kz), VENTRICLES)
    _paint_ellipsoid(labels, head, (0, 0, -2 * kz), ((1 + 0.8 * v) * kx, 12 * ky, 7 * kz), VENTRICLES)
    _paint_ellipsoid(labels, head, (0, -34 * ky, (post + 12) * kz), (5 * kx, 4 * ky, 6 * kz), VENTRICLES)

    y_cord, z_fm = -30.0 * ky, (post + 1.0) * kz
    y_stem = np.float32(y_cord) + np.maximum(z - f32(z_fm), 0) * f32(0.25)
    radial = np.sqrt(x ** 2 + (y - y_stem) ** 2)
    stem = (z > z_fm) & (z < -5 * kz)
    labels[stem & (radial < f32(11 * kx)) & inner] = WHITE_MATTER
    canal = (z <= z_fm) & inner
    labels[canal & (radial < 13 * kx)] = CORTICAL_BONE  # foramen magnum rim, vertebral canal
    labels[canal & (radial < 9 * kx)] = CSF
    labels[canal & (radial < 6 * kx)] = WHITE_MATTER
    dens = canal & (np.sqrt(x ** 2 + (y - f32(y_cord + 19 * ky)) ** 2) < 8 * kx) & (z < z_fm - 6)
    labels[dens] = CORTICAL_BONE
    dens &= np.sqrt(x ** 2 + (y - f32(y_cord + 19 * ky)) ** 2) < 6.5 * kx
    labels[dens] = CANCELLOUS_BONE
    atlas = canal & (np.abs(radial - f32(15 * kx)) < 2.5) & (z > z_fm - 16 * kz) & (z < z_fm - 7 * kz)
    labels[atlas] = CORTICAL_BONE  # the ring of C1
    del y_stem, radial, stem, canal, dens, atlas, brain

    # mastoid processes (bone with air cells) and the rami of the mandible
    for side in (-1, 1):
        centre, radii = (side * 50 * kx, -16 * ky, (post + 6) * kz), (9 * kx, 10 * ky, 13 * kz)
        sl = head.box(centre, radii)
        cells = (head.q(sl, centre, radii) < 1) & inner[sl]
        labels[sl][cells] = np.where(fine[0][sl][cells] > 0.3, SINUS, CORTICAL_BONE)
        centre, radii = (side * 45 * kx, 14 * ky, (ant - 70) * kz), (4.5 * kx, 13 * ky, 30 * kz)
        _paint_ellipsoid(labels, head, centre, radii, CORTICAL_BONE)
        _paint_ellipsoid(labels, head, centre, (radii[0] - 1.8, radii[1] - 1.8, radii[2] - 1.8), CANCELLOUS_BONE)

    # orbits, eyes, sinuses and nasal cavity (positions from the anterior skin surface)
    ex, ez, er = float(p["eye"][0]) * kx, float(p["eye"][1]) * kz, float(p["eye"][2])
    y_eye = head.front(ex, ez, shape_at((ex, 0.0, ez)), p["shape_amp"]) - er - 1.5
    ethmoid = (0.0, y_eye - 6 * ky, ez + 2 * kz)
    eradii = (9 * kx, 15 * ky, 11 * kz)
    sl = head.box(ethmoid, eradii)
    cells = head.q(sl, ethmoid, eradii) < 1
    labels[sl][cells] = np.where(fine[0][sl][cells] > -0.4, SINUS, CORTICAL_BONE)
    nasal = (0.0, y_eye - 4 * ky, ez - 20 * kz)
    _paint_bone_shell(labels, head, nasal, (8 * kx, 22 * ky, 16 * kz), 2.5, SINUS)
    _paint_ellipsoid(labels, head, nasal, (1.2, 22 * ky, 16 * kz), CORTICAL_BONE)  # septum
    _paint_ellipsoid(labels, head, (0.0, -2 * ky, ez - 34 * kz), (11 * kx, 7 * ky, 13 * kz), SINUS)  # nasopharynx
    m = p["maxillary_size"]
    for side in (-1, 1):
        _paint_bone_shell(labels, head, (side * 27 * kx, y_eye - 8 * ky, ez - 26 * kz), (13 * m * kx, 16 * m * ky, 15 * m * kz), 2.0, SINUS)
    s = p["sphenoid_size"]
    _paint_bone_shell(labels, head, (0.0, 8 * ky, (sella - 13) * kz), (12 * s * kx, 10 * s * ky, 8 * s * kz), 2.5, SINUS)
    fz, fs = p["frontal_z"] * kz, p["frontal_size"]
    fradii = (13 * fs * kx, 5 * fs, 9 * fs * kz)
    y_fs = head.front(0.0, fz, shape_at((0.0, 0.0, fz)), p["shape_amp"]) - p["t_skin"] - p["t_fat"] - p["t_outer"] - fradii[1] - 0.5
    _paint_bone_shell(labels, head, (0.0, y_fs, fz), fradii, 3.0, SINUS)
    for side in (-1, 1):
        orbit = (side * (ex + 1.0), y_eye - 11 * ky, ez + 1.0)
        oradii = (13 * kx, 19 * ky, 13 * kz)
        behind = (lambda sl, y0=y_eye: head.y[sl] < y0 + 2.0)
        _paint_ellipsoid(labels, head, orbit, [r + 2.5 for r in oradii], CORTICAL_BONE, behind)
        _paint_ellipsoid(labels, head, orbit, oradii, FAT)
        _paint_ellipsoid(labels, head, (side * ex, y_eye, ez), (er, er, er), EYE)
    return labels


# --------------------------------------------------------------------------------------------------
# the case


def _table(column: str) -> np.ndarray:
    return np.array([getattr(t, column) for t in TISSUES], dtype=np.float32)


def _mr_signal(labels: np.ndarray, p: dict, texture: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Noise-free T1w scanner values of a label map: each tissue's relative intensity with texture,
    the partial-volume blur, a bias field spanning exactly 1 +- ``bias_amp`` over the body (from the
    smooth field `bias`) and the scanner scale."""
    mr_rel = _table("mr") * p["mr_jitter"].astype(np.float32)
    mr = mr_rel[labels] * (1 + _table("mr_texture")[labels] * texture)
    mr = ndimage.gaussian_filter(mr, sigma=p["blur"], truncate=3.0)
    body = labels != AIR
    b_lo, b_hi = float(bias[body].min()), float(bias[body].max())
    bias = (bias - np.float32((b_lo + b_hi) / 2)) * np.float32(2 * p["bias_amp"] / max(b_hi - b_lo, 1e-6)) + 1
    mr *= bias * np.float32(p["mr_scale"])
    return mr


def _rician(mr: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    """Magnitude-image noise (sigma ``mr_noise`` of the white matter signal), rounded to whole scanner units."""
    sigma = np.float32(p["mr_noise"] * TISSUES[WHITE_MATTER].mr * p["mr_scale"])
    real = mr + rng.standard_normal(mr.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(mr.shape, dtype=np.float32) * sigma
    return np.rint(np.sqrt(real * real + imag * imag))


def make_case(seed: int, index: int, size: str = "full") -> PhantomCase:
    """Build case `index` of `seed` on the ``small`` or ``full`` grid (see the module docstring)."""
    grid = _check_size(size)
    rng = np.random.default_rng([int(seed), int(index)])
    p = _draw_params(rng, index)
    low_coef = _coefficients(rng, 40.0, 7)  # shape, skin/fat, skull, csf/gm, sulcus depth, CT density, base
    bias_coef = _coefficients(rng, 70.0, 1)
    mid_coef = _coefficients(rng, 9.0, 2)  # sulci, fat pockets
    fine_coef = _coefficients(rng, 3.0, 1)  # texture, ethmoid cells
    # everything above is independent of the grid; the voxel noise below is drawn last

    head = _Head(grid, p)
    low = _evaluate(low_coef, 40.0, head.axes_mm)
    mid = _evaluate(mid_coef, 9.0, head.axes_mm)
    fine = _evaluate(fine_coef, 3.0, head.axes_mm)

    def shape_at(point_head: tuple[float, float, float]) -> float:
        return float(np.clip(_evaluate_at(low_coef[:1], 40.0, head.to_fov(np.asarray(point_head)))[0], -2.5, 2.5))

    labels = _anatomy(head, p, low, mid, fine, shape_at)
    del mid

    # CT: tissue values + texture (+ density variation in bone), clipped to each tissue's range
    lo, hi = _table("ct_range").T
    hu = p["ct_base"].astype(np.float32)[labels]
    hu += _table("ct_texture")[labels] * fine[0]
    bone = labels == CORTICAL_BONE
    hu[bone] += np.float32(150.0) * np.clip(low[5][bone], -2, 2)  # denser and thinner regions
    hu = np.clip(hu, lo[labels], hi[labels])
    hu = ndimage.gaussian_filter(hu, sigma=p["blur"], truncate=3.0)

    mr = _mr_signal(labels, p, fine[0], _evaluate(bias_coef, 70.0, head.axes_mm)[0])
    del fine, bone, low

    # voxel noise (the only draws that depend on the grid)
    hu += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(p["ct_noise"])
    mr = _rician(mr, p, rng)

    ct = np.clip(np.rint(hu), *CT_CLIP).astype(np.int16)
    mask = (labels != AIR).astype(np.uint8)
    return PhantomCase(labels=labels, ct=ct, mr=mr.astype(np.float32), mask=mask, affine=_affine(p, grid))


# --------------------------------------------------------------------------------------------------
# a paired case on real anatomy: a real CT and an MR rendered from its tissues

#: upper HU bounds (after a ~1 mm smoothing) of the tissues a real CT's body is labelled with; above the
#: last, cortical bone. Grey matter also stands for muscle (the same T1w intensity within 3 %).
CT_TISSUE_BOUNDS: tuple[tuple[float, int], ...] = (
    (-400.0, SINUS), (-30.0, FAT), (18.0, CSF), (32.0, WHITE_MATTER), (200.0, GREY_MATTER), (700.0, CANCELLOUS_BONE),
)
SKIN_MM = 2.0


def labels_from_ct(hu: np.ndarray, body: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Tissue labels (:data:`TISSUES`) of a real CT: air outside `body`; inside it, each voxel's HU after
    a ~1 mm smoothing against :data:`CT_TISSUE_BOUNDS`, and the body's outer ``SKIN_MM`` skin (air
    cavities open to it stay air). On CT, grey and white matter differ by ~10 HU, so the brain's
    labels follow its noise-smoothed densities, not its folding."""
    sigma = 1.0 / np.asarray(spacing, dtype=np.float64)
    smooth = ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma=sigma, truncate=3.0)
    bounds = np.array([bound for bound, _ in CT_TISSUE_BOUNDS], dtype=np.float32)
    classes = np.array([label for _, label in CT_TISSUE_BOUNDS] + [CORTICAL_BONE], dtype=np.uint8)
    labels = classes[np.digitize(smooth, bounds)]
    skin = body & (ndimage.distance_transform_edt(body, sampling=spacing) <= SKIN_MM)
    labels[skin & (labels != SINUS)] = SKIN
    labels[~body] = AIR
    return labels


def case_from_ct(hu: np.ndarray, affine: np.ndarray, seed: int = 0, name: str = "") -> PhantomCase:
    """A paired case on real anatomy: a real head CT (HU, (X, Y, Z) on `affine`) and a T1w MR rendered
    from its tissues (:func:`labels_from_ct`) as the phantom renders its own: the same intensity table,
    texture, blur, bias field and Rician noise, the scanner's parameters drawn from `seed` and `name`.

    The mask is the CT's body (:func:`~medcycle.transforms.compute_body_mask`: head holders, couches
    and frames left out); the case's CT is the input's HU inside it, air (-1024) outside, rounded and
    clipped to the phantom's range. The grid is the CT's own. A registered pair is what an unpaired
    CycleGAN lacks; this one teaches the MR-to-CT relation on a real skull, face and skull base.
    """
    from medcycle.image import spacing_of
    from medcycle.transforms import CT_BODY_THRESHOLD_HU, compute_body_mask

    hu = np.asarray(hu, dtype=np.float32)
    spacing = spacing_of(affine)
    body = compute_body_mask(hu, threshold=CT_BODY_THRESHOLD_HU, spacing=spacing)
    labels = labels_from_ct(hu, body, spacing)
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    p = _draw_params(rng, 0)
    texture_coef, bias_coef = _coefficients(rng, 3.0, 1), _coefficients(rng, 70.0, 1)
    # fields in mm about the body's centre; beyond the fields' box they stay at its edge's value
    centre = np.array([np.mean(np.nonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))[0])
                       for axis in range(3)])
    axes_mm = tuple(np.clip((np.arange(n) - c) * s, -h, h).astype(np.float32)
                    for n, c, s, h in zip(hu.shape, centre, spacing, _FIELD_HALF))
    mr = _mr_signal(labels, p, _evaluate(texture_coef, 3.0, axes_mm)[0], _evaluate(bias_coef, 70.0, axes_mm)[0])
    mr = _rician(mr, p, rng)
    ct = np.clip(np.rint(np.where(body, hu, CT_CLIP[0])), *CT_CLIP).astype(np.int16)
    return PhantomCase(labels=labels, ct=ct, mr=mr.astype(np.float32), mask=body.astype(np.uint8),
                       affine=np.asarray(affine, dtype=np.float64))


def write_case(folder: str | os.PathLike, case: PhantomCase, names: Optional[Iterable[str]] = None) -> list[Path]:
    """Write `case` as ``folder/{mr,ct,mask,labels}.nii.gz`` (or only the file `names`), atomically.

    Every file has the case's affine as both sform and qform; MR and CT are int16 (the MR holds whole
    numbers, so this is lossless), mask and labels uint8.
    """
    from medcycle.io import write_nifti

    folder = Path(folder)
    written = []
    for name in (FILES if names is None else list(names)):
        attribute, dtype = FILES[name]
        written.append(write_nifti(folder / name, getattr(case, attribute), case.affine, dtype))
    return written
