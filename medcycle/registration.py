"""Rigid registration of one volume onto another (SimpleITK, Mattes mutual information).

Paired real data arrive unregistered: the CT lies on its own grid, often in another scanner's frame.
SynthRAD registers each CT onto its MR (rigid, elastix); :func:`register_rigid` does the same with
SimpleITK and :func:`resample_onto` puts the moving image onto the fixed grid.

Conventions (those of :mod:`medcycle.io`): arrays are ``(X, Y, Z)`` in the file's voxel order with a
4x4 voxel-to-RAS-mm affine. A transform is a 4x4 matrix in RAS millimetres that maps a point of the
fixed image's world to the point of the moving image's world showing the same anatomy (ITK's
fixed-to-moving direction, the one resampling needs): ``resampled(p) = moving(T @ p)``.

Method: the two bodies' centroids are matched (body masks: a CT's couch or another field of view
matter little, and no intensity moments of two modalities are compared), and of the cube's 24
orientations the one with the best mutual information on coarse images is kept (the images' own
unless another is clearly better), so that a gross pose error is found and then reported rather
than ending in a wrong nearby optimum. From there a rigid (Euler) transform about the fixed body's
centroid is optimised by L-BFGS-B within bounds, coarse to fine (shrink 4-2-1 where the grid
allows, Gaussian smoothing 2-1-0 voxels), on Mattes mutual information at a fixed number of random
points in the fixed body and a margin of air around it (fixed seed: the same inputs give the same
transform). Lengths are in units of the body's radius inside the optimisation, so that a unit step
turns or shifts the body alike.

A registration that fails is reported, not used, when: the bodies overlap with a Dice below
:data:`MIN_DICE` inside the common field of view; less than :data:`MIN_COVERAGE` of the fixed body
lies inside the moving image; the rotation exceeds :data:`MAX_ROTATION_DEG`; the mutual information
ends worse than with the images as they lie; the optimiser stopped at its iteration or evaluation
limit on the finest level (not converged); or SimpleITK gave up (no sample left inside the moving
image).
"""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medcycle.errors import InputError
from medcycle.io import LPS_TO_RAS, sitk_image  # LPS_TO_RAS is its own inverse
from medcycle.transforms import compute_body_mask

MIN_DICE = 0.8  # body masks (fixed vs moving resampled) inside the common field of view
MIN_COVERAGE = 0.5  # fraction of the fixed body that must lie inside the moving image
MAX_ROTATION_DEG = 30.0  # head poses of one patient on two scanners differ by far less
METRIC_TOLERANCE = 0.01  # relative: final MI may not be worse than the starting MI by more than this

HISTOGRAM_BINS = 64
SAMPLES_PER_LEVEL = 20_000  # random points inside the fixed body; cost per iteration is proportional
SEED = 20261129
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS = {4: 2.0, 2: 1.0, 1: 0.0}  # voxels, per shrink factor
COARSEST_SPACING_MM = 8.0  # coarser levels than this drop (a 3 mm grid is not shrunk 4x)
BODY_MARGIN_MM = 10.0  # the metric sees the body plus this margin of air: the skin edge is the strongest cue
METRIC_CHECK_VOXELS = 400_000  # the before/after metric check runs on a subsampled fixed grid
MAX_ITERATIONS = 100
MAX_EVALUATIONS = 500
COST_CONVERGENCE = 1e9  # stop when an iteration improves the metric by < 2e-7 relative
GRADIENT_TOLERANCE = 1e-5
SEARCH_SPACING_MM = 6.0  # the orientation search compares poses on images this coarse
SEARCH_MARGIN = 0.1  # relative MI gain another orientation needs over the images' own
MAX_STEP_FROM_START = 1.0  # bound of every parameter: 1 radian (57 degrees), 1 body radius (~70 mm)
INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}

TransformLike = Union[np.ndarray, "RigidResult"]


@dataclass(frozen=True)
class RigidResult:
    """The outcome of :func:`register_rigid`; ``ok`` is False when any failure criterion was met."""

    matrix: np.ndarray  # 4x4 RAS mm, fixed world -> moving world
    metric_before: float  # Mattes MI (ITK sign: lower is better) with the images as they lie
    metric_after: float  # the same samples, after registration
    dice: float  # body masks inside the common field of view
    coverage: float  # fraction of the fixed body inside the moving image
    iterations: int  # optimiser iterations on the finest level
    evaluations: tuple[int, ...]  # metric evaluations per resolution level, coarse to fine
    stop: str  # the optimiser's stop condition on the finest level
    seconds: float
    failures: tuple[str, ...] = field(default=())  # each met failure criterion, in words

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "failed: " + "; ".join(self.failures)

    @property
    def angles_deg(self) -> tuple[float, float, float]:
        """Rotation angles about the RAS x, y, z axes in degrees, the matrix being Rz @ Ry @ Rx."""
        return tuple(float(a) for a in Rotation.from_matrix(self.matrix[:3, :3]).as_euler("xyz", degrees=True))

    @property
    def rotation_deg(self) -> float:
        """The total rotation angle (axis-angle) in degrees."""
        return rotation_angle_deg(self.matrix)

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        """The matrix's translation column: ``T(p) = R @ p + t`` (RAS mm)."""
        return tuple(float(t) for t in self.matrix[:3, 3])

    def record(self) -> dict:
        """A JSON-serialisable summary for the case's record."""
        return {
            "method": "rigid, Mattes mutual information (SimpleITK)",
            "direction": "fixed world (RAS mm) -> moving world",
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "angles_deg": [round(a, 4) for a in self.angles_deg],
            "rotation_deg": round(self.rotation_deg, 4),
            "translation_mm": [round(t, 4) for t in self.translation_mm],
            "metric_before": round(self.metric_before, 6),
            "metric_after": round(self.metric_after, 6),
            "dice": round(self.dice, 4),
            "coverage": round(self.coverage, 4),
            "iterations": self.iterations,
            "evaluations": list(self.evaluations),
            "stop": self.stop,
            "verdict": self.verdict,
            "seconds": round(self.seconds, 2),
        }

    def raise_if_failed(self, name: str, fixed_name: str = "the fixed image") -> None:
        """Refuse a failed registration with one line naming `name` (the moving file)."""
        if not self.ok:
            raise InputError(f"{name}: rigid registration onto {fixed_name} failed ({'; '.join(self.failures)})")


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """The rotation angle (axis-angle magnitude) of a 4x4 or 3x3 rigid matrix, in degrees."""
    return float(np.degrees(Rotation.from_matrix(np.asarray(matrix)[:3, :3]).magnitude()))


def transform_error(estimated: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    """(largest distance in mm between where the two transforms send `points` (N, 3), angle in degrees)."""
    points = np.asarray(points, dtype=np.float64)
    homogeneous = np.c_[points, np.ones(len(points))]
    distance = np.linalg.norm((homogeneous @ (np.asarray(estimated) - np.asarray(truth)).T)[:, :3], axis=1)
    angle = rotation_angle_deg(np.asarray(estimated)[:3, :3].T @ np.asarray(truth)[:3, :3])
    return float(distance.max()), angle


# --------------------------------------------------------------------------------------------------
# numpy/RAS <-> SimpleITK/LPS


def _grid_image(shape: Sequence[int], affine: np.ndarray) -> sitk.Image:
    """An empty image carrying a grid, as the reference of a resampling."""
    return sitk_image(np.zeros(tuple(int(v) for v in shape), dtype=np.uint8), affine)


def _array(image: sitk.Image) -> np.ndarray:
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def _itk_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """The ITK (LPS) transform of a RAS fixed-to-moving matrix."""
    lps = LPS_TO_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_TO_RAS
    return sitk.AffineTransform(lps[:3, :3].ravel().tolist(), lps[:3, 3].tolist())


def _ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """The RAS 4x4 matrix of an affine ITK transform, read off the images of four points."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    lps = np.eye(4)
    lps[:3, 3] = origin
    for axis in range(3):
        lps[:3, axis] = np.array(transform.TransformPoint(tuple(np.eye(3)[axis]))) - origin
    return LPS_TO_RAS @ lps @ LPS_TO_RAS


def _matrix_of(transform: TransformLike) -> np.ndarray:
    matrix = transform.matrix if isinstance(transform, RigidResult) else np.asarray(transform, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"a transform is a 4x4 matrix, got shape {matrix.shape}")
    return matrix


# --------------------------------------------------------------------------------------------------
# resampling


def resample_onto(moving: np.ndarray, moving_affine: np.ndarray, transform: TransformLike,
                  fixed_shape: Sequence[int], fixed_affine: np.ndarray, default_value: float = -1024.0,
                  interpolator: str = "linear") -> np.ndarray:
    """`moving` on the fixed grid (exactly `fixed_shape` on `fixed_affine`) through `transform`.

    `transform` is a fixed-to-moving RAS matrix or a :class:`RigidResult`; voxels that map outside
    the moving image get `default_value`. `interpolator`: ``linear``, ``nearest`` (masks, labels) or
    ``bspline``. Returns float32 (X, Y, Z).
    """
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(INTERPOLATORS)}, got {interpolator!r}")
    resampled = sitk.Resample(sitk_image(moving, moving_affine, sitk.sitkFloat32), _grid_image(fixed_shape, fixed_affine),
                              _itk_transform(_matrix_of(transform)), INTERPOLATORS[interpolator],
                              float(default_value), sitk.sitkFloat32)
    return _array(resampled)


# --------------------------------------------------------------------------------------------------
# registration


def _prepared(array: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
              name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, affine, body mask): the mask given (non-zero = body) or computed."""
    array = np.asarray(array)
    if array.ndim != 3 or np.asarray(affine).shape != (4, 4):
        raise ValueError(f"{name}: expected an (X, Y, Z) array and a 4x4 affine, got {array.shape} and {np.shape(affine)}")
    if mask is not None and np.shape(mask) != array.shape:
        raise ValueError(f"{name}: mask shape {np.shape(mask)} differs from the image's {array.shape}")
    body = compute_body_mask(array) if mask is None else np.asarray(mask) > 0
    if not body.any():
        raise InputError(f"{name}: no body found (empty mask); nothing to register")
    return array, np.asarray(affine, dtype=np.float64), body


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    centre = np.array(ndimage.center_of_mass(mask))
    return np.asarray(affine)[:3, :3] @ centre + np.asarray(affine)[:3, 3]


def _radius(mask: np.ndarray, affine: np.ndarray, centre: np.ndarray) -> float:
    """Root-mean-square distance (mm) of the body's voxels from `centre` (every 2nd voxel per axis)."""
    points = np.argwhere(mask[::2, ::2, ::2]) * 2.0 @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return float(np.sqrt(((points - centre) ** 2).sum(axis=1).mean())) if len(points) else 1.0


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _metric_region(body: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The body and a margin of air around it (the skin edge is where MR and CT agree best)."""
    size = [2 * int(np.ceil(BODY_MARGIN_MM / s)) + 1 for s in _spacing(affine)]
    return ndimage.maximum_filter(body.astype(np.uint8), size=size)


def _shrink_factors(affine: np.ndarray) -> list[int]:
    finest = float(_spacing(affine).min())
    return [f for f in SHRINK_FACTORS if f == 1 or f * finest <= COARSEST_SPACING_MM]


def _sampling_percentages(shape: Sequence[int], region_fraction: float, factors: Sequence[int]) -> list[float]:
    # ITK draws percentage x voxels at random and drops those outside the mask: aim for a fixed count inside
    percentages = []
    for factor in factors:
        voxels = float(np.prod([int(np.ceil(s / factor)) for s in shape]))
        percentages.append(float(min(1.0, SAMPLES_PER_LEVEL / max(voxels * region_fraction, 1.0))))
    return percentages


def _mattes(method: sitk.ImageRegistrationMethod) -> None:
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetInterpolator(sitk.sitkLinear)  # B-spline: a little more accurate on 3 mm grids, 4x slower
    # gradients at the sample points only: filtering whole images for them costs seconds per level
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)


def _metric_value(fixed: sitk.Image, moving: sitk.Image, region: sitk.Image, matrix: np.ndarray) -> float:
    """Mattes MI for one transform at the fixed image's voxels in `region` (deterministic)."""
    method = sitk.ImageRegistrationMethod()
    _mattes(method)
    method.SetMetricFixedMask(region)
    method.SetInitialTransform(_itk_transform(matrix))
    try:
        return float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:  # no sample maps inside the moving image: no shared information at all
        return 0.0


def _subsampled(image: sitk.Image, voxels: int = METRIC_CHECK_VOXELS) -> sitk.Image:
    """Every k-th voxel along each axis, k the smallest that leaves at most `voxels` (MetricEvaluate uses all)."""
    factor = 1
    while np.prod([int(np.ceil(n / factor)) for n in image.GetSize()]) > voxels:
        factor += 1
    return sitk.Shrink(image, [factor] * 3) if factor > 1 else image


def _common_fov_overlap(fixed_body: np.ndarray, fixed_affine: np.ndarray, moving_body: np.ndarray,
                        moving_affine: np.ndarray, matrix: np.ndarray) -> tuple[float, float]:
    """(Dice of the two bodies inside the common field of view, fraction of the fixed body inside it)."""
    outside = 2.0  # the label of fixed voxels that map outside the moving image
    moved = resample_onto(moving_body.astype(np.uint8), moving_affine, matrix, fixed_body.shape, fixed_affine,
                          default_value=outside, interpolator="nearest")
    inside = moved != outside
    fixed_in = fixed_body & inside
    moving_in = moved == 1
    coverage = float(fixed_in.sum()) / float(fixed_body.sum())
    total = float(fixed_in.sum() + moving_in.sum())
    dice = 2.0 * float((fixed_in & moving_in).sum()) / total if total else 0.0
    return dice, coverage


def _coarse(image: sitk.Image, mm_per_unit: float) -> sitk.Image:
    """`image` block-averaged to voxels of about :data:`SEARCH_SPACING_MM`."""
    factors = [max(1, round(SEARCH_SPACING_MM / (s * mm_per_unit))) for s in image.GetSpacing()]
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)


def _starting_pose(fixed: sitk.Image, moving: sitk.Image, region: sitk.Image, centre: np.ndarray,
                   shift: np.ndarray, units_per_mm: float) -> np.ndarray:
    """The start (RAS matrix, body-radius units): centroids matched, in the best of the cube's 24 orientations.

    Mutual information is compared on coarse images; another orientation than the images' own is
    taken only when clearly better (:data:`SEARCH_MARGIN`). A pose error the optimiser could not
    recover (a head on its side, a header's flipped axes) then ends far from the images' own
    orientation and is reported (rotation), rather than stuck in a wrong nearby optimum.
    """
    fixed, moving = _coarse(fixed, 1.0 / units_per_mm), _coarse(moving, 1.0 / units_per_mm)
    region = sitk.Cast(_coarse(region, 1.0 / units_per_mm) > 0, sitk.sitkUInt8)
    rotations = Rotation.create_group("O").as_matrix()
    rotations = rotations[np.argsort([-np.trace(r) for r in rotations], kind="stable")]  # the identity first
    poses, values = [], []
    for rotation in rotations:
        pose = np.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = centre + shift - rotation @ centre  # turned about the fixed body's centroid
        poses.append(pose)
        values.append(_metric_value(fixed, moving, region, pose))
    best = int(np.argmin(values))
    return poses[best] if values[best] < values[0] - SEARCH_MARGIN * abs(values[0]) else poses[0]


def register_rigid(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray, *,
                   fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                   name: str = "the moving image", fixed_name: str = "the fixed image",
                   check: bool = True) -> RigidResult:
    """Register `moving` rigidly onto `fixed` (any modalities: mutual information).

    Arrays are (X, Y, Z) on 4x4 voxel-to-RAS affines; masks (same shapes, non-zero = body) default
    to :func:`medcycle.transforms.compute_body_mask` of each image. Returns the fixed-to-moving
    transform with its quality figures. A failed registration (see the module docstring) raises
    :class:`~medcycle.errors.InputError` naming `name` when `check`, else comes back with ``ok``
    False so the caller can report it.
    """
    start = time.perf_counter()
    fixed, fixed_affine, fixed_body = _prepared(fixed, fixed_affine, fixed_mask, fixed_name)
    moving, moving_affine, moving_body = _prepared(moving, moving_affine, moving_mask, name)
    region = _metric_region(fixed_body, fixed_affine)
    # the optimiser works in units of the body's radius: a unit step of a rotation (radian) and of a
    # translation then move the body alike (L-BFGS-B takes no parameter scales; in millimetres its
    # first steps turn the head by radians and it stops early in flat valleys, millimetres off)
    centre = _centroid(fixed_body, fixed_affine)
    to_units = np.diag([1.0 / _radius(fixed_body, fixed_affine, centre)] * 3 + [1.0])
    fixed_image = sitk_image(fixed, to_units @ fixed_affine, sitk.sitkFloat32)
    moving_image = sitk_image(moving, to_units @ moving_affine, sitk.sitkFloat32)
    region_image = sitk_image(region, to_units @ fixed_affine, sitk.sitkUInt8)
    # the starting pose is a fixed part of the transform, so the optimiser's bounds
    # (MAX_STEP_FROM_START) count from there
    centre_units = to_units[:3, :3] @ centre
    shift_units = to_units[:3, :3] @ (_centroid(moving_body, moving_affine) - centre)
    start_pose = _starting_pose(fixed_image, moving_image, region_image, centre_units, shift_units, to_units[0, 0])
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter((LPS_TO_RAS[:3, :3] @ centre_units).tolist())

    factors = _shrink_factors(fixed_affine)
    region_fraction = float(region.mean())
    method = sitk.ImageRegistrationMethod()
    _mattes(method)
    method.SetMetricSamplingPercentagePerLevel(_sampling_percentages(fixed.shape, region_fraction, factors), SEED)
    method.SetMetricFixedMask(region_image)
    # L-BFGS-B: regular-step and plain gradient descent with physical-shift scales crawl along the
    # rotations or oscillate in translation on this metric (docs/results/registration.md)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=GRADIENT_TOLERANCE, numberOfIterations=MAX_ITERATIONS,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=MAX_EVALUATIONS,
                                costFunctionConvergenceFactor=COST_CONVERGENCE,
                                lowerBound=-MAX_STEP_FROM_START, upperBound=MAX_STEP_FROM_START)
    method.SetShrinkFactorsPerLevel(factors)
    method.SetSmoothingSigmasPerLevel([SMOOTHING_SIGMAS[f] for f in factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetMovingInitialTransform(_itk_transform(start_pose))
    method.SetInitialTransform(rigid, inPlace=False)
    evaluations: list[int] = []  # metric evaluations per level (what the time goes into)
    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: evaluations.append(0))
    method.AddCommand(sitk.sitkIterationEvent, lambda: evaluations.__setitem__(-1, evaluations[-1] + 1))
    failures = []
    try:
        optimised = _ras_matrix(method.Execute(fixed_image, moving_image))
        stop, iterations = method.GetOptimizerStopConditionDescription(), method.GetOptimizerIteration()
    except RuntimeError as exc:  # e.g. the optimiser moved every sample outside the moving image
        lines = str(exc).strip().splitlines() or ["SimpleITK error"]
        stop, iterations, optimised = re.sub(r"^.*\(0x[0-9a-f]+\):\s*", "", lines[-1])[:120], 0, np.eye(4)
        failures.append(f"SimpleITK stopped: {stop}")
    units_matrix = start_pose @ optimised  # ITK applies the optimised transform first
    matrix = np.linalg.inv(to_units) @ units_matrix @ to_units  # back to millimetres

    check_fixed, check_region = _subsampled(fixed_image), _subsampled(region_image)
    metric_before = _metric_value(check_fixed, moving_image, check_region, np.eye(4))
    metric_after = _metric_value(check_fixed, moving_image, check_region, units_matrix)
    dice, coverage = _common_fov_overlap(fixed_body, fixed_affine, moving_body, moving_affine, matrix)

    if coverage < MIN_COVERAGE:
        failures.append(f"only {coverage:.0%} of the fixed body lies inside the moving image (< {MIN_COVERAGE:.0%})")
    if dice < MIN_DICE:
        failures.append(f"body Dice {dice:.2f} < {MIN_DICE}")
    if rotation_angle_deg(matrix) > MAX_ROTATION_DEG:
        failures.append(f"rotation {rotation_angle_deg(matrix):.1f} deg > {MAX_ROTATION_DEG:g} deg")
    if metric_after > metric_before + METRIC_TOLERANCE * abs(metric_before):
        failures.append(f"mutual information got worse ({metric_before:.4f} -> {metric_after:.4f})")
    if iterations >= MAX_ITERATIONS or "too many function evaluations" in stop.lower():
        failures.append(f"the optimiser did not converge ({stop.split(':')[-1].strip()[:60]})")
    result = RigidResult(matrix=matrix, metric_before=metric_before, metric_after=metric_after, dice=dice,
                         coverage=coverage, iterations=iterations, evaluations=tuple(evaluations), stop=stop,
                         seconds=time.perf_counter() - start, failures=tuple(failures))
    if check:
        result.raise_if_failed(name, fixed_name)
    return result
