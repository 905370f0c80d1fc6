"""Dose metrics of a synthetic CT: a plan optimised on the CT, recomputed on the sCT (SynthRAD2023).

For each case and modality (``photon``, ``proton``) an automatic plan is made on the CT: a target
(a given mask, or a sphere of :attr:`PlanSettings.target_diameter_mm` at the centre of the brain),
a few coplanar fields (photons: 5 equispaced; protons: 2 lateral opposed), a prescription of 2 Gy
per fraction, fluence/spot weights optimised on the CT. The same plan (same beams, bixels, spot
energies and weights) is recomputed on the sCT, and the two doses are compared:

* ``dose_error``: mean ``|D_sct - D_ct|`` over the voxels receiving >= 90 % of the prescription on the
  CT plan, in % of the prescription;
* ``gamma_pass``: global gamma pass rate at 2 % (of the prescription) / 2 mm, over the voxels with
  at least 10 % of the prescription on the CT plan, in %, from ``pymedphys.gamma``;
* ``target_d98``, ``oar_dmean``, ``oar_d2``: sCT minus CT dose-volume figures in % of the
  prescription (target D98; mean dose and D2 of the organ at risk, the brain outside the target
  grown by 5 mm, or the body outside it where no brain is found).

The dose engine is pyRadPlan (pencil beams of matRad, which SynthRAD2023 used: SVD pencil beam for
photons, Hong pencil beam for protons) and gamma comes from pymedphys, both in the optional extra
``pip install "medcycle[dose]"``; they are imported only when a plan is made. Without them,
:func:`available` is False and :func:`unavailable_reason` says why. The plan geometry
(:func:`brain_region`, :func:`default_target`, :func:`organ_at_risk`), the figures on dose arrays
(:func:`high_dose_error`, :func:`dvh_metrics`) and :func:`dose_figure` need no extra;
:func:`gamma_pass_rate` and so :func:`dose_metrics` need pymedphys only.

Arrays are numpy ``(X, Y, Z)`` with ``spacing`` the voxel size in mm along those axes and Z the
cranio-caudal axis (axial slices along Z, as :mod:`medcycle.jobs.evaluate` orients volumes): the
gantry turns about Z. Doses are in Gy per fraction on the dose grid (:attr:`PlanSettings.dose_grid_mm`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

MODALITIES = ("photon", "proton")
PRESCRIPTION_GY = 2.0  # SynthRAD brain: 2 Gy per fraction
HIGH_DOSE_FRACTION = 0.9  # the dose error is scored where the CT plan gives >= 90 % of the prescription
GAMMA_DOSE_PERCENT = 2.0
GAMMA_DISTANCE_MM = 2.0
GAMMA_CUTOFF_PERCENT = 10.0  # gamma is scored where the CT plan gives >= 10 % of the prescription
BONE_HU = 250.0
OAR_MARGIN_MM = 5.0
ENGINE_PACKAGES = ("pyRadPlan", "pymedphys")
DOSE_METRIC_KEYS = ("dose_error", "gamma_pass", "target_d98", "oar_dmean", "oar_d2")

__all__ = [
    "DOSE_METRIC_KEYS", "MODALITIES", "PRESCRIPTION_GY", "DosePlan", "DoseResult", "PlanSettings",
    "available", "brain_region", "default_target", "dose_figure", "dose_metrics", "dvh_metrics", "evaluate_dose",
    "gamma_pass_rate", "high_dose_error", "make_plan", "organ_at_risk", "recompute", "unavailable_reason",
]


# --------------------------------------------------------------------------------------------------
# availability


def unavailable_reason() -> str:
    """Why dose metrics cannot be computed here ("" when they can): the missing packages."""
    missing = [name for name in ENGINE_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return ""
    return f"{' and '.join(missing)} not installed (pip install \"medcycle[dose]\")"


def available() -> bool:
    """True when the dose engine and the gamma implementation are installed."""
    return unavailable_reason() == ""


# --------------------------------------------------------------------------------------------------
# settings and plan geometry (numpy and scipy only)


@dataclass(frozen=True)
class PlanSettings:
    """How the automatic plan of one modality is made; the defaults are SynthRAD's brain case."""

    modality: str
    prescription_gy: float = PRESCRIPTION_GY
    gantry_angles: tuple[float, ...] = ()  # degrees; empty: 5 equispaced (photon), 90/270 (proton)
    dose_grid_mm: float = 3.0
    bixel_width_mm: float = 5.0  # photon bixel width, proton spot spacing
    target_diameter_mm: float = 30.0
    max_iterations: int = 60

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        for name in ("prescription_gy", "dose_grid_mm", "bixel_width_mm", "target_diameter_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")

    @property
    def angles(self) -> tuple[float, ...]:
        if self.gantry_angles:
            return tuple(float(a) for a in self.gantry_angles)
        if self.modality == "photon":
            return tuple(360.0 * i / 5 for i in range(5))
        return (90.0, 270.0)


def _check_volume(hu: Any, spacing: Sequence[float], name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    array = np.asarray(hu)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D array (X, Y, Z), got shape {array.shape}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return array, sp


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def brain_region(ct: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The intracranial soft tissue of a head CT: in each axial slice, the voxels of -100..100 HU
    enclosed by bone (>= 250 HU); the largest connected part. Empty when no slice has a closed skull."""
    hu, _ = _check_volume(ct, spacing, "ct")
    bone = hu >= BONE_HU
    enclosed = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[2]):
        if bone[:, :, z].any():
            enclosed[:, :, z] = ndimage.binary_fill_holes(bone[:, :, z]) & ~bone[:, :, z]
    soft = enclosed & (hu > -100) & (hu < 100)
    return _largest_component(soft) if soft.any() else soft


def body_region(ct: np.ndarray) -> np.ndarray:
    """The body of a CT (:func:`medcycle.transforms.compute_body_mask` at the CT threshold)."""
    from medcycle.transforms import CT_BODY_THRESHOLD_HU, compute_body_mask

    return compute_body_mask(np.asarray(ct), threshold=CT_BODY_THRESHOLD_HU)


def _ball(shape: Sequence[int], spacing: Sequence[float], centre_vox: Sequence[float], radius_mm: float) -> np.ndarray:
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre_vox, spacing)]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    return r2 <= radius_mm**2


def default_target(ct: np.ndarray, spacing: Sequence[float], diameter_mm: float = 30.0) -> np.ndarray:
    """A sphere of `diameter_mm` at the centre of the brain (:func:`brain_region`), kept inside it;
    at the centre of the body when the CT shows no skull. ValueError when the CT has no body."""
    hu, sp = _check_volume(ct, spacing, "ct")
    region = brain_region(hu, sp)
    if not region.any():
        region = body_region(hu)
    if not region.any():
        raise ValueError("no body in the CT to place a target in")
    centre = ndimage.center_of_mass(region)
    target = _ball(hu.shape, sp, centre, diameter_mm / 2) & region
    if not target.any():
        raise ValueError("the default target does not meet the brain/body region")
    return target


def _grow(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """`mask` grown by `margin_mm` (Euclidean, in mm)."""
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return distance <= margin_mm


def organ_at_risk(ct: np.ndarray, spacing: Sequence[float], target: np.ndarray) -> np.ndarray:
    """The organ at risk of the automatic plan: the brain (else the body) outside the target grown
    by 5 mm."""
    hu, sp = _check_volume(ct, spacing, "ct")
    region = brain_region(hu, sp)
    if not region.any():
        region = body_region(hu)
    return region & ~_grow(np.asarray(target, dtype=bool), sp, OAR_MARGIN_MM)


# --------------------------------------------------------------------------------------------------
# metrics on dose arrays (numpy only, except gamma: pymedphys)


def high_dose_error(dose_ref: np.ndarray, dose_eval: np.ndarray, prescription_gy: float) -> float:
    """Mean ``|dose_eval - dose_ref|`` over the voxels where ``dose_ref >= 90 %`` of the prescription,
    in % of the prescription; NaN when no voxel gets that much."""
    ref, ev = np.asarray(dose_ref, dtype=np.float64), np.asarray(dose_eval, dtype=np.float64)
    if ref.shape != ev.shape:
        raise ValueError(f"the doses differ in shape: {ref.shape} vs {ev.shape}")
    high = ref >= HIGH_DOSE_FRACTION * prescription_gy
    if not high.any():
        return math.nan
    return float(100.0 * np.abs(ev[high] - ref[high]).mean() / prescription_gy)


def dvh_metrics(dose: np.ndarray, target: np.ndarray, oar: np.ndarray) -> dict[str, float]:
    """Target D98 and organ-at-risk Dmean and D2 in Gy (Dx: the dose that x % of the volume receives
    at least, linear interpolation between voxels); NaN for an empty structure."""
    values = np.asarray(dose, dtype=np.float64)

    def percentile(mask: np.ndarray, q: float) -> float:
        inside = values[np.asarray(mask, dtype=bool)]
        return float(np.percentile(inside, q)) if inside.size else math.nan

    oar_values = values[np.asarray(oar, dtype=bool)]
    return {
        "target_d98": percentile(target, 2.0),
        "oar_dmean": float(oar_values.mean()) if oar_values.size else math.nan,
        "oar_d2": percentile(oar, 98.0),
    }


def gamma_pass_rate(dose_ref: np.ndarray, dose_eval: np.ndarray, spacing: Sequence[float],
                    normalisation_gy: float, dose_percent: float = GAMMA_DOSE_PERCENT,
                    distance_mm: float = GAMMA_DISTANCE_MM, cutoff_percent: float = GAMMA_CUTOFF_PERCENT) -> float:
    """Global gamma pass rate in % (``pymedphys.gamma``): `dose_percent` of `normalisation_gy`,
    `distance_mm`, over the reference voxels with at least `cutoff_percent` of `normalisation_gy`;
    NaN when there is no such voxel. Both doses lie on one grid of voxel size `spacing` (mm)."""
    import pymedphys

    ref = np.asarray(dose_ref, dtype=np.float64)
    ev = np.asarray(dose_eval, dtype=np.float64)
    if ref.shape != ev.shape:
        raise ValueError(f"the doses differ in shape: {ref.shape} vs {ev.shape}")
    if not (ref >= cutoff_percent / 100.0 * normalisation_gy).any():
        return math.nan
    axes = tuple(np.arange(n) * float(s) for n, s in zip(ref.shape, spacing))
    gamma = pymedphys.gamma(
        axes, ref, axes, ev, dose_percent_threshold=dose_percent, distance_mm_threshold=distance_mm,
        lower_percent_dose_cutoff=cutoff_percent, global_normalisation=normalisation_gy,
        max_gamma=1.1, skip_once_passed=True,  # only pass/fail is needed: stop searching once known
        interp_fraction=10, interp_algo="scipy",  # "scipy": no numba needed
    )
    scored = ~np.isnan(gamma)
    return float(100.0 * np.count_nonzero(gamma[scored] <= 1.0) / np.count_nonzero(scored))


def dose_metrics(dose_ref: np.ndarray, dose_eval: np.ndarray, spacing: Sequence[float], prescription_gy: float,
                 target: np.ndarray, oar: np.ndarray) -> dict[str, float]:
    """The SynthRAD2023 dose figures of `dose_eval` (sCT) against `dose_ref` (CT), see the module
    docstring: ``dose_error`` and ``gamma_pass`` in %, DVH differences in % of the prescription."""
    ref_dvh = dvh_metrics(dose_ref, target, oar)
    eval_dvh = dvh_metrics(dose_eval, target, oar)
    result = {
        "dose_error": high_dose_error(dose_ref, dose_eval, prescription_gy),
        "gamma_pass": gamma_pass_rate(dose_ref, dose_eval, spacing, prescription_gy),
    }
    for key in ref_dvh:
        result[key] = 100.0 * (eval_dvh[key] - ref_dvh[key]) / prescription_gy
    return result


# --------------------------------------------------------------------------------------------------
# the engine (pyRadPlan, imported lazily)


@contextlib.contextmanager
def _quiet_engine():
    """Keep the engine's progress bars and numerical warnings (rays parallel to a grid plane) off
    the console; errors still raise."""
    logger = logging.getLogger("pyRadPlan")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _sitk(array: np.ndarray, spacing: Sequence[float]) -> Any:
    """An (X, Y, Z) array as a SimpleITK image of that size and spacing, origin 0."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _engine_ct(hu: np.ndarray, spacing: Sequence[float]) -> Any:
    from pyRadPlan.ct import create_ct

    return create_ct(cube_hu=_sitk(hu.astype(np.float32), spacing))


def _structures(ct_obj: Any, target: np.ndarray, body: np.ndarray, spacing: Sequence[float]) -> Any:
    """The engine's structure set: the target (beam and spot placement) and the body (dose voxels)."""
    from pyRadPlan.cst import create_cst, create_voi

    def voi(name: str, kind: str, mask: np.ndarray) -> Any:
        return create_voi(name=name, voi_type=kind, mask=_sitk(mask.astype(np.uint8), spacing), ct_image=ct_obj)

    return create_cst([voi("TARGET", "TARGET", target), voi("BODY", "EXTERNAL", body)], ct=ct_obj)


def _optimise(matrix: Any, target: np.ndarray, oar: np.ndarray, body: np.ndarray, prescription_gy: float,
              max_iterations: int) -> np.ndarray:
    """Non-negative bixel/spot weights minimising matRad's usual objectives on the dose-grid voxels
    (flattened like the influence `matrix`'s rows): squared deviation from the prescription in the
    target (priority 1000), squared overdosing above half of it in the organ at risk (10) and
    above 80 % of it in the rest of the body (1), each a mean over its voxels.

    pyRadPlan's own optimiser is not used: its plan properties cannot cap the iterations, and its
    default of 500 L-BFGS-B iterations took 70 of the 90 s of a small plan (docs/results/dose.md)."""
    from scipy.optimize import minimize

    matrix = matrix.tocsr()
    rest = body & ~target & ~oar
    terms = [(np.flatnonzero(target), 1000.0, prescription_gy, False),
             (np.flatnonzero(oar), 10.0, 0.5 * prescription_gy, True),
             (np.flatnonzero(rest), 1.0, 0.8 * prescription_gy, True)]
    terms = [(rows, priority / rows.size, level, over) for rows, priority, level, over in terms if rows.size]
    blocks = [(matrix[rows], weight, level, over) for rows, weight, level, over in terms]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = 0.0, np.zeros_like(w)
        for block, weight, level, over in blocks:
            residual = block @ w - level
            if over:
                residual = np.maximum(residual, 0.0)
            value += weight * float(residual @ residual)
            gradient += 2.0 * weight * (block.T @ residual)
        return value, gradient

    unit = matrix[terms[0][0]] @ np.ones(matrix.shape[1])
    start = np.full(matrix.shape[1], prescription_gy / max(float(unit.mean()), 1e-12))
    result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * matrix.shape[1],
                      options={"maxiter": max_iterations})
    return np.asarray(result.x, dtype=np.float64)


@dataclass
class DosePlan:
    """A plan optimised on a CT: the engine's objects, the weights, and the CT plan's dose and
    structures on the dose grid ((X, Y, Z), voxel size ``dose_spacing``)."""

    settings: PlanSettings
    ct_spacing: tuple[float, float, float]
    ct_shape: tuple[int, int, int]
    target: np.ndarray  # on the CT grid
    oar: np.ndarray
    body: np.ndarray
    weights: np.ndarray
    dose: np.ndarray  # the CT plan's dose on the dose grid, Gy per fraction
    dose_spacing: tuple[float, float, float]
    dose_target: np.ndarray
    dose_oar: np.ndarray
    seconds: float
    _engine: dict = field(default_factory=dict, repr=False)


def _dose_array(dij: Any, weights: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    image = dij.compute_result_dose_grid(weights)["physical_dose"]
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).astype(np.float64)


def _engine_order(mask: np.ndarray) -> np.ndarray:
    """An (X, Y, Z) dose-grid mask flattened in the engine's voxel order (x fastest)."""
    return np.transpose(mask, (2, 1, 0)).ravel()


def _on_dose_grid(mask: np.ndarray, spacing: Sequence[float], dij: Any) -> np.ndarray:
    """`mask` (CT grid) resampled onto the engine's dose grid: voxels at least half inside."""
    import SimpleITK as sitk

    grid = dij.dose_grid
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputOrigin(tuple(float(v) for v in grid.origin))
    resampler.SetOutputSpacing(tuple(float(v) for v in grid.resolution_vector))
    resampler.SetOutputDirection(tuple(float(v) for v in np.asarray(grid.direction).ravel()))
    resampler.SetSize(tuple(int(v) for v in grid.dimensions))
    fraction = resampler.Execute(_sitk(mask.astype(np.float32), spacing))
    return np.transpose(sitk.GetArrayFromImage(fraction), (2, 1, 0)) >= 0.5


def make_plan(ct: np.ndarray, spacing: Sequence[float], settings: PlanSettings,
              target: Optional[np.ndarray] = None) -> DosePlan:
    """Optimise the automatic plan of `settings` on `ct` (HU, (X, Y, Z)); `target` (bool, same
    shape) or :func:`default_target`. Needs the ``dose`` extra (ImportError otherwise)."""
    with _quiet_engine():  # pyRadPlan's first import warns about its own type annotations
        from pyRadPlan import IonPlan, PhotonPlan, calc_dose_influence, generate_stf

    start = time.perf_counter()
    hu, sp = _check_volume(ct, spacing, "ct")
    if target is None:
        target_mask = default_target(hu, sp, settings.target_diameter_mm)
    else:
        target_mask = np.asarray(target) > 0
        if target_mask.shape != hu.shape:
            raise ValueError(f"the target's shape {target_mask.shape} differs from the CT's {hu.shape}")
        if not target_mask.any():
            raise ValueError("the target mask is empty")
    body = body_region(hu) | target_mask
    oar = organ_at_risk(hu, sp, target_mask)
    angles = settings.angles
    if settings.modality == "photon":
        pln = PhotonPlan(machine="Generic")
        generator, engine = "photonIMRT", "SVDPB"
    else:
        pln = IonPlan(radiation_mode="protons", machine="Generic")
        generator, engine = "IMPT", "HongPB"
    pln.prop_stf = {"generator": generator, "gantry_angles": list(angles), "couch_angles": [0.0] * len(angles),
                    "bixel_width": settings.bixel_width_mm}
    g = settings.dose_grid_mm
    pln.prop_dose_calc = {"engine": engine, "dose_grid": {"resolution": {"x": g, "y": g, "z": g}}}
    with _quiet_engine():
        ct_obj = _engine_ct(hu, sp)
        cst = _structures(ct_obj, target_mask, body, sp)
        stf = generate_stf(ct_obj, cst, pln)
        dij = calc_dose_influence(ct_obj, cst, stf, pln)
    on_grid = [_on_dose_grid(mask, sp, dij) for mask in (target_mask, oar, body)]
    weights = _optimise(dij.physical_dose.flat[0], *(_engine_order(m) for m in on_grid),
                        settings.prescription_gy, settings.max_iterations)
    return DosePlan(settings=settings, ct_spacing=sp, ct_shape=hu.shape, target=target_mask, oar=oar, body=body,
                    weights=weights, dose=_dose_array(dij, weights),
                    dose_spacing=tuple(float(v) for v in dij.dose_grid.resolution_vector),
                    dose_target=on_grid[0], dose_oar=on_grid[1], seconds=time.perf_counter() - start,
                    _engine={"pln": pln, "stf": stf})


def recompute(plan: DosePlan, hu: np.ndarray) -> np.ndarray:
    """The dose of `plan` (same beams, bixels, spots and weights) on another image of the CT's grid
    (the sCT), on the plan's dose grid, Gy per fraction."""
    with _quiet_engine():
        from pyRadPlan import calc_dose_influence

    image, _ = _check_volume(hu, plan.ct_spacing, "sct")
    if image.shape != plan.ct_shape:
        raise ValueError(f"the sCT's shape {image.shape} differs from the CT's {plan.ct_shape}")
    with _quiet_engine():
        ct_obj = _engine_ct(image, plan.ct_spacing)
        cst = _structures(ct_obj, plan.target, plan.body, plan.ct_spacing)
        dij = calc_dose_influence(ct_obj, cst, plan._engine["stf"], plan._engine["pln"])
    return _dose_array(dij, plan.weights)


@dataclass
class DoseResult:
    """One case and modality: the figures (:data:`DOSE_METRIC_KEYS`), both doses and the target on
    the dose grid, and the seconds spent planning and recomputing."""

    modality: str
    metrics: dict[str, float]
    dose_ct: np.ndarray
    dose_sct: np.ndarray
    dose_spacing: tuple[float, float, float]
    target: np.ndarray
    plan_seconds: float
    recompute_seconds: float


def evaluate_dose(ct: np.ndarray, sct: np.ndarray, spacing: Sequence[float], modality: str,
                  target: Optional[np.ndarray] = None, settings: Optional[PlanSettings] = None) -> DoseResult:
    """Plan `modality` on `ct`, recompute on `sct` (both HU, (X, Y, Z), one grid) and score the sCT
    dose against the CT dose (:func:`dose_metrics`). Needs the ``dose`` extra."""
    settings = replace(settings, modality=modality) if settings is not None else PlanSettings(modality=modality)
    plan = make_plan(ct, spacing, settings, target)
    start = time.perf_counter()
    dose_sct = recompute(plan, sct)
    recompute_seconds = time.perf_counter() - start
    metrics = dose_metrics(plan.dose, dose_sct, plan.dose_spacing, settings.prescription_gy,
                           plan.dose_target, plan.dose_oar)
    return DoseResult(modality=modality, metrics=metrics, dose_ct=plan.dose, dose_sct=dose_sct,
                      dose_spacing=plan.dose_spacing, target=plan.dose_target, plan_seconds=plan.seconds,
                      recompute_seconds=recompute_seconds)


def dose_figure(path: str | Path, result: DoseResult, prescription_gy: float = PRESCRIPTION_GY,
                title: str = "") -> Path:
    """Write a PNG of the axial dose-grid slice through the target's centre: the CT plan's dose,
    the same plan on the sCT, and their difference in % of the prescription; atomically. With RAS
    (X, Y, Z) arrays it is shown as medcycle's other figures are: anterior up, the patient's right
    on the left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medcycle.io import atomic_write

    z = int(round(ndimage.center_of_mass(result.target)[2])) if result.target.any() else result.dose_ct.shape[2] // 2
    planes = [result.dose_ct[:, :, z], result.dose_sct[:, :, z],
              100.0 * (result.dose_sct[:, :, z] - result.dose_ct[:, :, z]) / prescription_gy]
    limit = max(float(np.abs(planes[2]).max()), 1.0)
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    aspect = result.dose_spacing[1] / result.dose_spacing[0]
    for axes, plane, name, style in zip(
            figure.subplots(1, 3), planes, (f"{result.modality} plan on the CT (Gy)", "same plan on the sCT (Gy)",
                                             "sCT - CT (% of prescription)"),
            ({"cmap": "jet", "vmin": 0.0, "vmax": 1.1 * prescription_gy},) * 2
            + ({"cmap": "RdBu_r", "vmin": -limit, "vmax": limit},)):
        image = axes.imshow(plane.T[::-1, ::-1], aspect=aspect, **style)  # anterior up, patient's right left
        axes.set_title(name, fontsize=9)
        axes.axis("off")
        figure.colorbar(image, ax=axes, shrink=0.8)
    m = result.metrics
    figure.suptitle(title or (f"dose error {m['dose_error']:.2f} %, gamma 2%/2mm {m['gamma_pass']:.1f} %, "
                              f"target D98 {m['target_d98']:+.2f} %"), fontsize=10)
    path = Path(path)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
