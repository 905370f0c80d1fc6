"""`medcycle evaluate`: score synthetic CTs against the real CT: SynthRAD2023/2025 image metrics,
anatomy metrics and, on request, the dose of a plan made on the CT and recomputed on the sCT.

File mode: ``pred`` and ``ref`` are volumes (NIfTI/MHA/NRRD file or DICOM-series folder), ``mask``
is an optional body mask; without one the mask is computed from the reference CT
(:func:`medcycle.transforms.compute_body_mask` at ``CT_BODY_THRESHOLD_HU``) and the table says so.
``mr`` (optional) is shown in the figure; ``target`` (optional) is the dose plans' target.

Folder mode (``ref`` is a folder of cases): SynthRAD layout ``REF/<case>/ct.*`` with optional
``mask.*`` (else computed from the CT, as above), ``mr.*`` (shown in the figure) and ``target.*``
(the dose plans' target); the predictions are what ``medcycle convert`` writes in folder mode,
``PRED/<case>/sct.*`` or flat ``PRED/<case>_sct.*``. A case without a prediction, or that cannot be
scored, is reported and the others are still evaluated; the run then ends with an error (exit 1).

The prediction, mask, MR and target must lie on the reference's voxel grid (shape and affine):
otherwise a one-line error naming both files. A reference that is not a CT in Hounsfield units is
refused (:func:`medcycle.transforms.loading.check_modality`). Metrics, inside the mask:

* image (:mod:`medcycle.metrics`): MAE (HU, unclipped), PSNR, SSIM (SynthRAD2023) and MS-SSIM
  (SynthRAD2025), the last three clipped to ``window`` (``synthrad2023`` -1024..3000 HU by default,
  ``synthrad2025`` -1024..3071, or two numbers); MAE in bone (CT >= 250 HU), air (CT < -400 HU) and
  soft tissue;
* anatomy (:mod:`medcycle.anatomy`): Dice and HD95 (mm) of bone (>= 250 HU) and air cavities;
* dose (:mod:`medcycle.dose`, ``dose`` = ``photon``, ``proton`` or ``both``; needs the ``dose``
  extra): per modality the high-dose error and gamma pass rate (%), and the target D98 and
  organ-at-risk Dmean/D2 differences (% of the prescription), on a ``dose_grid_mm`` grid. Asked for
  without the extra, the run stops before any work with a usage error (exit 2) saying what to
  install: a report without the figures asked for would pass unnoticed in a script. Not asked
  for, the run says in one line that it skipped them and why.

Output: a table on stdout (one row per case and the mean); with ``out``: ``OUT/metrics.csv`` (one
row per case), ``OUT/summary.json`` (mean, std, median per metric; ``cases``; ``window``; the mask
used per case; ``dose``: what was computed, or why not), ``OUT/report.md`` (the tables and the
figures), ``OUT/<case>.png`` (3-view figure) and ``OUT/<case>_dose_<modality>.png`` (CT plan, same
plan on the sCT, difference), all written atomically.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medcycle import console
from medcycle.anatomy import ANATOMY_KEYS
from medcycle.cases import ct_cases, find_named_volume
from medcycle.dose import DOSE_METRIC_KEYS, MODALITIES, PRESCRIPTION_GY
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import atomic_write, stem
from medcycle.io import is_dicom_series

DOSE_CHOICES = ("photon", "proton", "both")
DEFAULT_DOSE_GRID_MM = 3.0
IMAGE_KEYS = ("mae", "psnr", "ssim", "ms_ssim", "mae_bone", "mae_air", "mae_soft")
# (title, decimals) of each metric in the printed table and report.md
TITLES = {"mae": ("MAE HU", 1), "psnr": ("PSNR dB", 2), "ssim": ("SSIM", 4), "ms_ssim": ("MS-SSIM", 4),
          "mae_bone": ("bone", 1), "mae_air": ("air", 1), "mae_soft": ("soft", 1),
          "dice_bone": ("Dice bone", 3), "hd95_bone": ("HD95 bone", 1), "dice_air": ("Dice air", 3),
          "hd95_air": ("HD95 air", 1)}
DOSE_TITLES = {"dose_error": ("dose error %", 2), "gamma_pass": ("gamma 2%/2mm %", 1),
               "target_d98": ("target D98 diff %", 2), "oar_dmean": ("OAR Dmean diff %", 2),
               "oar_d2": ("OAR D2 diff %", 2)}
PRINTED_DOSE_KEYS = ("dose_error", "gamma_pass")  # the stdout table; all five in the report


def dose_modalities(dose: Optional[str]) -> tuple[str, ...]:
    """The modalities of a ``dose`` request: none for None, both for ``both``."""
    if dose is None:
        return ()
    if dose not in DOSE_CHOICES:
        raise UsageError(f"--dose must be one of {', '.join(DOSE_CHOICES)}, got {dose!r}")
    return MODALITIES if dose == "both" else (dose,)


def dose_keys(modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The report's dose columns: ``<modality>_<figure>``."""
    return tuple(f"{m}_{k}" for m in modalities for k in DOSE_METRIC_KEYS)


def report_keys(modalities: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The metric columns of ``metrics.csv`` (after ``case``), in order."""
    return IMAGE_KEYS + ANATOMY_KEYS + dose_keys(modalities)


@dataclass
class EvalCase:
    """One comparison: the prediction (None when missing), the reference CT, optional mask, MR and
    dose target."""

    name: str
    pred: Optional[Path]
    ref: Path
    mask: Optional[Path] = None
    mr: Optional[Path] = None
    expected: str = ""  # where the prediction was looked for (folder mode)
    target: Optional[Path] = None


@dataclass(frozen=True)
class DoseRequest:
    """The dose plans of an evaluation: the modalities and the dose grid's voxel size in mm."""

    modalities: tuple[str, ...]
    dose_grid_mm: float = DEFAULT_DOSE_GRID_MM


# --------------------------------------------------------------------------------------------------
# finding the cases


def _plan_folder(pred: Path, ref: Path) -> list[EvalCase]:
    cases = []
    for case in ct_cases(ref):
        if case.problem:
            raise InputError(case.problem)
        name = case.name
        prediction = find_named_volume(pred / name, "sct") if (pred / name).is_dir() else None
        if prediction is None:
            prediction = find_named_volume(pred, f"{name}_sct")
        cases.append(EvalCase(name=name, pred=prediction, ref=case.volumes["ct"], mask=case.get("mask"), mr=case.get("mr"),
                              expected=f"{pred / name / 'sct.nii.gz'} or {pred / (name + '_sct.nii.gz')}",
                              target=find_named_volume(case.origin, "target")))
    return cases


def _file_case_name(pred: Path) -> str:
    name = stem(pred)
    if name.lower().endswith("_sct") and len(name) > 4:
        return name[:-4]
    if name.lower() in ("sct", "pred", "prediction") and pred.resolve().parent.name:
        return pred.resolve().parent.name  # SynthRAD layout <case>/sct.nii.gz
    return name


# --------------------------------------------------------------------------------------------------
# one case


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """`array` reoriented to the closest RAS axes (flips and axis swaps only) and its voxel size."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    new_spacing = np.empty(3)
    new_spacing[ornt[:, 0].astype(int)] = spacing
    return nib.orientations.apply_orientation(array, ornt), tuple(float(s) for s in new_spacing)


def _mask_for(case: EvalCase, ct: Any) -> tuple[np.ndarray, str]:
    """The boolean mask of a case and a description of where it came from."""
    from medcycle.image import check_same_grid, voxels
    from medcycle.io import load_volume
    from medcycle.transforms.body_mask import CT_BODY_THRESHOLD_HU, binary_mask, compute_body_mask

    if case.mask is not None:
        given = load_volume(case.mask, allow_constant=True)
        check_same_grid(ct, given)
        return binary_mask(given), str(case.mask)
    mask = compute_body_mask(voxels(ct), threshold=CT_BODY_THRESHOLD_HU)
    if not mask.any():
        raise InputError(f"{case.ref}: no body above {CT_BODY_THRESHOLD_HU:g} HU to compute a mask from; give --mask")
    return mask, f"computed from the CT (> {CT_BODY_THRESHOLD_HU:g} HU)"


def _dose_metrics(case: EvalCase, ct: Any, sct: Any, request: DoseRequest, out: Optional[Path]) -> dict[str, float]:
    """The dose figures of every requested modality (plan on the CT, recomputed on the sCT), in RAS
    orientation (the gantry turns about the cranio-caudal axis); writes the dose figures to `out`."""
    from medcycle import dose
    from medcycle.image import affine_of, check_same_grid, voxels
    from medcycle.io import load_volume
    from medcycle.transforms.body_mask import binary_mask

    affine = affine_of(ct)
    ct_view, spacing = _canonical(voxels(ct), affine)
    sct_view = _canonical(voxels(sct), affine)[0]
    target = None
    if case.target is not None:
        given = load_volume(case.target, allow_constant=True)
        check_same_grid(ct, given)
        target = _canonical(binary_mask(given), affine)[0]
        if not target.any():
            raise InputError(f"{case.target}: the dose target is empty")
    metrics: dict[str, float] = {}
    for modality in request.modalities:
        settings = dose.PlanSettings(modality, dose_grid_mm=request.dose_grid_mm)
        try:
            result = dose.evaluate_dose(ct_view, sct_view, spacing, modality, target=target, settings=settings)
        except ValueError as exc:
            raise InputError(f"{case.ref}: no {modality} plan can be made: {exc}") from None
        metrics.update({f"{modality}_{k}": v for k, v in result.metrics.items()})
        if out is not None:
            m = result.metrics
            dose.dose_figure(out / f"{case.name}_dose_{modality}.png", result,
                             title=f"{case.name}, {modality}: dose error {m['dose_error']:.2f} %, gamma 2%/2mm "
                                   f"{m['gamma_pass']:.1f} %, target D98 {m['target_d98']:+.2f} %")
    return metrics


def evaluate_case(case: EvalCase, window: tuple[float, float], out: Optional[Path],
                  dose: Optional[DoseRequest] = None) -> tuple[dict[str, float], str]:
    """(metrics, mask description) of one case; writes ``OUT/<case>.png`` (and the dose figures)
    when `out` is given."""
    from medcycle.anatomy import anatomy_metrics
    from medcycle.image import affine_of, check_same_grid, voxels
    from medcycle.io import load_volume
    from medcycle.metrics import image_metrics, ms_ssim
    from medcycle.transforms.loading import check_modality

    assert case.pred is not None
    ct = load_volume(case.ref)
    check_modality(ct, "ct")  # scores against a CT not in HU would mean nothing
    sct = load_volume(case.pred, allow_constant=True)  # a flat prediction is bad, not unusable
    check_same_grid(ct, sct)
    mask, mask_source = _mask_for(case, ct)
    affine = affine_of(ct)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))  # along the array's axes
    try:
        metrics = image_metrics(voxels(sct), voxels(ct), mask, window=window)
        metrics["ms_ssim"] = ms_ssim(voxels(sct), voxels(ct), mask, window=window)
        metrics.update(anatomy_metrics(voxels(sct), voxels(ct), spacing, mask=mask))
    except ValueError as exc:
        raise InputError(f"{case.ref}: cannot be scored: {exc}") from None
    if dose is not None and dose.modalities:
        metrics.update(_dose_metrics(case, ct, sct, dose, out))
    if out is not None:
        from medcycle.visualize import evaluation_figure

        mr = None
        if case.mr is not None:
            mr_image = load_volume(case.mr)
            check_same_grid(ct, mr_image)
            mr = _canonical(voxels(mr_image), affine)[0]
        sct_view, view_spacing = _canonical(voxels(sct), affine)
        title = (f"{case.name}: MAE {metrics['mae']:.1f} HU, PSNR {metrics['psnr']:.2f} dB, "
                 f"SSIM {metrics['ssim']:.3f} (inside the body mask)")
        evaluation_figure(out / f"{case.name}.png", sct_view, _canonical(voxels(ct), affine)[0], view_spacing, mr=mr,
                          mask=_canonical(mask, affine)[0], title=title)
    return {key: metrics[key] for key in report_keys(dose.modalities if dose else ())}, mask_source


# --------------------------------------------------------------------------------------------------
# reporting


def _stats(values: list[float]) -> dict[str, Optional[float]]:
    """mean, std (population) and median over the cases where the metric is defined; non-finite
    results (no such case, or an infinite PSNR or HD95) are written as null."""
    finite_or_inf = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)

    def clean(value: float) -> Optional[float]:
        return float(value) if math.isfinite(value) else None

    if finite_or_inf.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    with np.errstate(invalid="ignore"):
        return {"mean": clean(finite_or_inf.mean()), "std": clean(finite_or_inf.std()),
                "median": clean(float(np.median(finite_or_inf))), "n": int(finite_or_inf.size)}


def _fmt(value: Optional[float], digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _title(key: str) -> tuple[str, int]:
    """(title, decimals) of a report column; dose columns are ``<modality> <figure>``."""
    if key in TITLES:
        return TITLES[key]
    modality, figure = key.split("_", 1)
    title, digits = DOSE_TITLES[figure]
    return f"{modality} {title}", digits


class _Table:
    def __init__(self, names: list[str], keys: tuple[str, ...], show_mask: bool) -> None:
        self.width = max([len("case")] + [len(n) for n in names] + [len("median")])
        self.columns = [(key, *_title(key)) for key in keys]
        self.show_mask = show_mask

    def header(self) -> str:
        cells = [f"{'case':<{self.width}}"] + [f"{title:>9}" for _, title, _ in self.columns]
        return "  ".join(cells) + ("  mask" if self.show_mask else "")

    def row(self, name: str, values: dict[str, Optional[float]], mask: str = "") -> str:
        cells = [f"{name:<{self.width}}"] + [f"{_fmt(values.get(k), d):>{max(9, len(t))}}" for k, t, d in self.columns]
        return "  ".join(cells) + (f"  {mask}" if self.show_mask and mask else "")

    def note(self, name: str, text: str) -> str:
        return f"{name:<{self.width}}  {text}"


def _write_csv(path: Path, rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("case",) + keys)
            for row in rows:
                writer.writerow([row["case"]] + [repr(float(row[k])) for k in keys])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _markdown_table(keys: tuple[str, ...], rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    columns = [(key, *_title(key)) for key in keys]
    lines = ["| case | " + " | ".join(title for _, title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['case']} | " + " | ".join(_fmt(row[k], d) for k, _, d in columns) + " |")
    lines.append("| **mean** | " + " | ".join(_fmt(summary[k]["mean"], d) for k, _, d in columns) + " |")
    return lines + [""]


def _write_markdown(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any],
                    modalities: tuple[str, ...]) -> None:
    lo, hi = summary["window"]
    lines = [f"# medcycle evaluate: {len(rows)} case(s)", "",
             f"Inside the body mask; PSNR, SSIM (SynthRAD2023) and MS-SSIM (SynthRAD2025) in the window "
             f"[{lo:g}, {hi:g}] HU; MAE in bone (CT >= 250 HU), air (CT < -400 HU) and soft tissue.", "",
             "## Image metrics", "", *_markdown_table(IMAGE_KEYS, rows, summary),
             "## Anatomy", "", "Dice and HD95 (mm) of bone (>= 250 HU) and air cavities (< -400 HU, deeper than "
             "3 mm in the body), sCT against CT; HD95 `inf`: the structure is missing from one image.", "",
             *_markdown_table(ANATOMY_KEYS, rows, summary), "## Dose", ""]
    info = summary["dose"]
    if modalities:
        lines += [f"One plan per case and modality, optimised on the CT and recomputed on the sCT ({info['engine']}, "
                  f"{info['prescription_gy']:g} Gy per fraction, dose grid {info['dose_grid_mm']:g} mm): dose error = "
                  "mean |sCT - CT dose| where the CT plan gives >= 90 % of the prescription; gamma 2 %/2 mm global; "
                  "DVH differences sCT - CT; all in % (of the prescription).", ""]
        for modality in modalities:
            lines += [f"### {modality}", "", *_markdown_table(dose_keys((modality,)), rows, summary)]
    else:
        lines += [f"Not computed: {info['skipped']}.", ""]
    lines += ["## Figures", ""]
    for row in rows:
        name = row["case"]
        lines += [f"### {name}", "", f"![{name}]({name}.png)", ""]
        lines += [f"![{name} {m} dose]({name}_dose_{m}.png)" for m in modalities] + ([""] if modalities else [])
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines))


def _dose_info(request: Optional[DoseRequest]) -> dict[str, Any]:
    """What ``summary.json`` says of the dose: the engine and settings, or why it was skipped."""
    from medcycle import dose

    if request is not None:
        import importlib.metadata

        return {"modalities": list(request.modalities), "dose_grid_mm": request.dose_grid_mm,
                "prescription_gy": PRESCRIPTION_GY, "engine": f"pyRadPlan {importlib.metadata.version('pyRadPlan')}"}
    reason = dose.unavailable_reason()
    if reason:
        return {"skipped": f"the dose extra is missing: {reason}"}
    return {"skipped": "not requested (--dose photon|proton|both)"}


# --------------------------------------------------------------------------------------------------
# the job


def run(pred: str | Path, ref: str | Path, mask: Optional[str | Path] = None, out: Optional[str | Path] = None,
        mr: Optional[str | Path] = None, window: tuple[float, float] | str = "synthrad2023",
        dose: Optional[str] = None, dose_grid_mm: float = DEFAULT_DOSE_GRID_MM,
        target: Optional[str | Path] = None, quiet: bool = False) -> dict:
    """Evaluate `pred` against `ref` (files, or folders of cases); print the table (not when `quiet`) and
    a summary line, write the report to `out` when given, and return the summary (what ``summary.json`` holds).

    `window`: ``synthrad2023``, ``synthrad2025`` or (lo, hi) in HU. `dose`: None, ``photon``,
    ``proton`` or ``both`` (needs ``pip install "medcycle[dose]"``; UsageError without it), on a
    `dose_grid_mm` grid, planned on `target` (file mode; else a 30 mm sphere in the brain)."""
    started = time.perf_counter()
    pred, ref = Path(pred), Path(ref)
    mask_path = Path(mask) if mask is not None else None
    mr_path = Path(mr) if mr is not None else None
    target_path = Path(target) if target is not None else None
    out_path = Path(out) if out is not None else None
    from medcycle import dose as dose_module
    from medcycle.metrics import check_window

    try:
        lo, hi = check_window(window)
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from None
    modalities = dose_modalities(dose)
    if modalities:
        if not (math.isfinite(dose_grid_mm) and dose_grid_mm > 0):
            raise UsageError(f"--dose-grid must be a positive number of mm, got {dose_grid_mm!r}")
        reason = dose_module.unavailable_reason()
        if reason:
            raise UsageError(f"--dose {dose}: the dose metrics need the dose extra, and {reason}; nothing was evaluated")
    elif target_path is not None:
        raise UsageError("--target is the dose plans' target: give --dose photon|proton|both with it")
    if not ref.exists():
        raise InputError(f"{ref}: no such reference CT file or folder")
    if not pred.exists():
        raise InputError(f"{pred}: no such prediction file or folder")
    for given, what in ((mask_path, "mask"), (mr_path, "MR"), (target_path, "target")):
        if given is not None and not given.exists():
            raise InputError(f"{given}: no such {what} file or folder")
    if out_path is not None and out_path.exists() and not out_path.is_dir():
        raise UsageError(f"{out_path}: --out must be a folder, and this is a file")

    # a folder holding <case>/ct.* is a folder of cases; another folder must be one CT's DICOM series
    folder_mode = ref.is_dir() and (bool(ct_cases(ref)) or not is_dicom_series(ref))
    if folder_mode:
        if not pred.is_dir():
            raise UsageError(f"{pred}: REF {ref} is a folder of cases, so PRED must be the folder 'medcycle convert' wrote")
        if mask_path is not None or mr_path is not None or target_path is not None:
            raise UsageError("--mask, --mr and --target take one file for one case; in folder mode each case's "
                             "mask.*, mr.* and target.* are used")
        cases = _plan_folder(pred, ref)
        if not cases:
            raise InputError(f"{ref}: no cases found (expected <case>/ct.nii.gz folders, or a CT file)")
    else:
        if pred.is_dir() and not is_dicom_series(pred):
            raise UsageError(f"{pred}: REF {ref} is one CT, so PRED must be one synthetic CT file (or DICOM folder)")
        cases = [EvalCase(name=_file_case_name(pred), pred=pred, ref=ref, mask=mask_path, mr=mr_path,
                          target=target_path)]
    request = DoseRequest(modalities, float(dose_grid_mm)) if modalities else None
    return _evaluate(cases, (lo, hi), out_path, folder_mode, pred, request, quiet, started)


def _evaluate(cases: list[EvalCase], window: tuple[float, float], out: Optional[Path], folder_mode: bool,
              pred_root: Path, dose: Optional[DoseRequest], quiet: bool, started: float) -> dict:
    modalities = dose.modalities if dose else ()
    keys = report_keys(modalities)
    printed = IMAGE_KEYS + ANATOMY_KEYS + tuple(f"{m}_{k}" for m in modalities for k in PRINTED_DOSE_KEYS)
    table = _Table([c.name for c in cases], printed, show_mask=folder_mode)
    heading = [f"SynthRAD metrics inside the body mask; PSNR/SSIM/MS-SSIM window [{window[0]:g}, {window[1]:g}] HU; "
               "MAE in bone (CT >= 250 HU), air (CT < -400 HU) and soft tissue (the rest); Dice/HD95 (mm) of bone "
               "and air cavities" + ("; dose error and gamma 2%/2mm in %" if modalities else ""), table.header()]

    def emit(line: str) -> None:  # the heading comes with the first line: a refused single case prints only its error
        if quiet:
            return
        while heading:
            print(heading.pop(0))
        print(line, flush=True)

    rows: list[dict[str, Any]] = []
    masks: dict[str, str] = {}
    failed: dict[str, str] = {}
    missing: list[str] = []
    for case in cases:
        if case.pred is None:
            missing.append(case.name)
            failed[case.name] = f"no prediction (looked for {case.expected})"
            emit(table.note(case.name, f"MISSING prediction: looked for {case.expected}"))
            continue
        try:
            metrics, mask_source = evaluate_case(case, window, out, dose)
        except MedcycleError as exc:
            if not folder_mode:
                raise
            failed[case.name] = str(exc)
            emit(table.note(case.name, f"FAILED: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop the others
            if not folder_mode:
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failed[case.name] = f"{type(exc).__name__}: {text}"
            emit(table.note(case.name, f"FAILED: {failed[case.name]}"))
            continue
        rows.append({"case": case.name, **metrics})
        masks[case.name] = mask_source
        short = "file" if case.mask is not None else "from CT"
        emit(table.row(case.name, metrics, short))

    summary: dict[str, Any] = {key: _stats([r[key] for r in rows]) for key in keys}
    summary.update({"cases": len(rows), "window": [window[0], window[1]], "masks": masks,
                    "missing": missing, "failed": failed, "dose": _dose_info(dose)})
    if dose is not None:
        summary["dose"]["targets"] = {c.name: str(c.target) if c.target else "a 30 mm sphere at the brain's centre"
                                      for c in cases if c.name in masks}
    if rows:
        emit(table.row("mean", {k: summary[k]["mean"] for k in keys}))
        if len(rows) > 1:
            emit(table.row("std", {k: summary[k]["std"] for k in keys}))
        if not folder_mode:
            emit(f"mask: {masks[rows[0]['case']]}")
        else:
            emit("mask: 'file' = the case's mask.*, 'from CT' = computed from the CT "
                 "(body above the CT threshold; no mask.* in the case folder)")
        if dose is None:
            emit(f"dose metrics skipped: {summary['dose']['skipped']}")
    if out is not None and rows:
        _write_csv(out / "metrics.csv", rows, keys)
        _write_json(out / "summary.json", summary)
        _write_markdown(out / "report.md", rows, summary, modalities)
    if rows:
        mean = {k: summary[k]["mean"] for k in ("mae", "psnr", "ssim")}
        report = f" -> {out} (report.md, metrics.csv, summary.json, {len(rows)} figure(s))" if out is not None else ""
        console.summary("evaluate", f"{len(rows)} case(s), mean MAE {_fmt(mean['mae'], 1)} HU, PSNR "
                                    f"{_fmt(mean['psnr'], 2)} dB, SSIM {_fmt(mean['ssim'], 4)} inside the body mask"
                                    f"{report} in {console.seconds(time.perf_counter() - started)}")
    if failed:
        parts = []
        if missing:
            parts.append(f"{len(missing)} without a prediction in {pred_root} ({', '.join(missing)})")
        others = [name for name in failed if name not in missing]
        if others:
            parts.append(f"{len(others)} failed ({', '.join(others)})")
        raise MedcycleError(f"{len(failed)} of {len(cases)} cases not evaluated: {'; '.join(parts)}")
    return summary


__all__ = ["DOSE_CHOICES", "DoseRequest", "EvalCase", "evaluate_case", "report_keys", "run"]
