"""`medcycle evaluate`: score synthetic CTs against the real CT with the SynthRAD2023 metrics.

File mode: ``pred`` and ``ref`` are volumes (NIfTI/MHA/NRRD file or DICOM-series folder), ``mask``
is an optional body mask; without one the mask is computed from the reference CT
(:func:`medcycle.transforms.compute_body_mask` at ``CT_BODY_THRESHOLD_HU``) and the table says so.
``mr`` (optional) is shown in the figure.

Folder mode (``ref`` is a folder of cases): SynthRAD layout ``REF/<case>/ct.*`` with optional
``mask.*`` (else computed from the CT, as above) and ``mr.*`` (shown in the figure); the predictions
are what ``medcycle convert`` writes in folder mode, ``PRED/<case>/sct.*`` or flat
``PRED/<case>_sct.*``. A case without a prediction, or that cannot be scored, is reported and the
others are still evaluated; the run then ends with an error (exit 1).

The prediction, mask and MR must lie on the reference's voxel grid (shape and affine): otherwise
a one-line error naming both files. A reference that is not a CT in Hounsfield units is refused
(:func:`medcycle.transforms.loading.check_modality`). Metrics (:mod:`medcycle.metrics`): MAE (HU, unclipped),
PSNR and SSIM (clipped to ``window``, data range ``hi - lo``) inside the mask, and MAE in bone
(CT >= 250 HU), air (CT < -400 HU) and soft tissue. Output: a table on stdout (one row per case and
the mean); with ``out``: ``OUT/metrics.csv`` (one row per case), ``OUT/summary.json`` (mean, std,
median per metric; ``cases``; ``window``; the mask used per case) and ``OUT/<case>.png`` (3-view
figure), all written atomically.
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
from medcycle.cases import ct_cases, find_named_volume
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import atomic_write, stem
from medcycle.io import is_dicom_series

CSV_COLUMNS = ("case", "mae", "psnr", "ssim", "mae_bone", "mae_air", "mae_soft")
SUMMARY_KEYS = CSV_COLUMNS[1:]


@dataclass
class EvalCase:
    """One comparison: the prediction (None when missing), the reference CT, optional mask and MR."""

    name: str
    pred: Optional[Path]
    ref: Path
    mask: Optional[Path] = None
    mr: Optional[Path] = None
    expected: str = ""  # where the prediction was looked for (folder mode)


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
                              expected=f"{pred / name / 'sct.nii.gz'} or {pred / (name + '_sct.nii.gz')}"))
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


def evaluate_case(case: EvalCase, window: tuple[float, float], out: Optional[Path]) -> tuple[dict[str, float], str]:
    """(metrics, mask description) of one case; writes ``OUT/<case>.png`` when `out` is given."""
    from medcycle.image import affine_of, check_same_grid, voxels
    from medcycle.io import load_volume
    from medcycle.metrics import image_metrics
    from medcycle.transforms.loading import check_modality

    assert case.pred is not None
    ct = load_volume(case.ref)
    check_modality(ct, "ct")  # scores against a CT not in HU would mean nothing
    sct = load_volume(case.pred, allow_constant=True)  # a flat prediction is bad, not unusable
    check_same_grid(ct, sct)
    mask, mask_source = _mask_for(case, ct)
    try:
        metrics = image_metrics(voxels(sct), voxels(ct), mask, window=window)
    except ValueError as exc:
        raise InputError(f"{case.ref}: cannot be scored: {exc}") from None
    if out is not None:
        from medcycle.visualize import evaluation_figure

        affine = affine_of(ct)
        mr = None
        if case.mr is not None:
            mr_image = load_volume(case.mr)
            check_same_grid(ct, mr_image)
            mr = _canonical(voxels(mr_image), affine)[0]
        sct_view, spacing = _canonical(voxels(sct), affine)
        title = (f"{case.name}: MAE {metrics['mae']:.1f} HU, PSNR {metrics['psnr']:.2f} dB, "
                 f"SSIM {metrics['ssim']:.3f} (inside the body mask)")
        evaluation_figure(out / f"{case.name}.png", sct_view, _canonical(voxels(ct), affine)[0], spacing, mr=mr,
                          mask=_canonical(mask, affine)[0], title=title)
    return metrics, mask_source


# --------------------------------------------------------------------------------------------------
# reporting


def _stats(values: list[float]) -> dict[str, Optional[float]]:
    """mean, std (population) and median over the cases where the metric is defined; non-finite
    results (no such case, or an infinite PSNR) are written as null."""
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


TABLE_COLUMNS = (("mae", "MAE HU", 1), ("psnr", "PSNR dB", 2), ("ssim", "SSIM", 4),
                 ("mae_bone", "bone", 1), ("mae_air", "air", 1), ("mae_soft", "soft", 1))


class _Table:
    def __init__(self, names: list[str], show_mask: bool) -> None:
        self.width = max([len("case")] + [len(n) for n in names] + [len("median")])
        self.show_mask = show_mask

    def header(self) -> str:
        cells = [f"{'case':<{self.width}}"] + [f"{title:>9}" for _, title, _ in TABLE_COLUMNS]
        return "  ".join(cells) + ("  mask" if self.show_mask else "")

    def row(self, name: str, values: dict[str, Optional[float]], mask: str = "") -> str:
        cells = [f"{name:<{self.width}}"] + [f"{_fmt(values.get(k), d):>9}" for k, _, d in TABLE_COLUMNS]
        return "  ".join(cells) + (f"  {mask}" if self.show_mask and mask else "")

    def note(self, name: str, text: str) -> str:
        return f"{name:<{self.width}}  {text}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                writer.writerow([row["case"]] + [repr(float(row[k])) for k in CSV_COLUMNS[1:]])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------
# the job


def run(pred: str | Path, ref: str | Path, mask: Optional[str | Path] = None, out: Optional[str | Path] = None,
        mr: Optional[str | Path] = None, window: tuple[float, float] = (-1024.0, 3000.0), quiet: bool = False) -> dict:
    """Evaluate `pred` against `ref` (files, or folders of cases); print the table (not when `quiet`) and
    a summary line, write the report to `out` when given, and return the summary (what ``summary.json`` holds)."""
    started = time.perf_counter()
    pred, ref = Path(pred), Path(ref)
    mask_path = Path(mask) if mask is not None else None
    mr_path = Path(mr) if mr is not None else None
    out_path = Path(out) if out is not None else None
    from medcycle.metrics import check_window

    try:
        lo, hi = check_window(window)
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from None
    if not ref.exists():
        raise InputError(f"{ref}: no such reference CT file or folder")
    if not pred.exists():
        raise InputError(f"{pred}: no such prediction file or folder")
    for given, what in ((mask_path, "mask"), (mr_path, "MR")):
        if given is not None and not given.exists():
            raise InputError(f"{given}: no such {what} file or folder")
    if out_path is not None and out_path.exists() and not out_path.is_dir():
        raise UsageError(f"{out_path}: --out must be a folder, and this is a file")

    # a folder holding <case>/ct.* is a folder of cases; another folder must be one CT's DICOM series
    folder_mode = ref.is_dir() and (bool(ct_cases(ref)) or not is_dicom_series(ref))
    if folder_mode:
        if not pred.is_dir():
            raise UsageError(f"{pred}: REF {ref} is a folder of cases, so PRED must be the folder 'medcycle convert' wrote")
        if mask_path is not None or mr_path is not None:
            raise UsageError("--mask and --mr take one file for one case; in folder mode each case's mask.* and mr.* are used")
        cases = _plan_folder(pred, ref)
        if not cases:
            raise InputError(f"{ref}: no cases found (expected <case>/ct.nii.gz folders, or a CT file)")
    else:
        if pred.is_dir() and not is_dicom_series(pred):
            raise UsageError(f"{pred}: REF {ref} is one CT, so PRED must be one synthetic CT file (or DICOM folder)")
        cases = [EvalCase(name=_file_case_name(pred), pred=pred, ref=ref, mask=mask_path, mr=mr_path)]
    return _evaluate(cases, (lo, hi), out_path, folder_mode, pred, quiet, started)


def _evaluate(cases: list[EvalCase], window: tuple[float, float], out: Optional[Path], folder_mode: bool,
              pred_root: Path, quiet: bool, started: float) -> dict:
    table = _Table([c.name for c in cases], show_mask=folder_mode)
    heading = [f"SynthRAD metrics inside the body mask; PSNR/SSIM window [{window[0]:g}, {window[1]:g}] HU; "
               "MAE in bone (CT >= 250 HU), air (CT < -400 HU) and soft tissue (the rest)", table.header()]

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
            metrics, mask_source = evaluate_case(case, window, out)
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

    summary: dict[str, Any] = {key: _stats([r[key] for r in rows]) for key in SUMMARY_KEYS}
    summary.update({"cases": len(rows), "window": [window[0], window[1]], "masks": masks,
                    "missing": missing, "failed": failed})
    if rows:
        emit(table.row("mean", {k: summary[k]["mean"] for k in SUMMARY_KEYS}))
        if len(rows) > 1:
            emit(table.row("std", {k: summary[k]["std"] for k in SUMMARY_KEYS}))
        if not folder_mode:
            emit(f"mask: {masks[rows[0]['case']]}")
        else:
            emit("mask: 'file' = the case's mask.*, 'from CT' = computed from the CT "
                 "(body above the CT threshold; no mask.* in the case folder)")
    if out is not None and rows:
        _write_csv(out / "metrics.csv", rows)
        _write_json(out / "summary.json", summary)
    if rows:
        mean = {k: summary[k]["mean"] for k in ("mae", "psnr", "ssim")}
        report = f" -> {out} (metrics.csv, summary.json, {len(rows)} figure(s))" if out is not None else ""
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


__all__ = ["EvalCase", "evaluate_case", "run"]
