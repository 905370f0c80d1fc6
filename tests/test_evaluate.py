"""`medcycle evaluate` end to end on tiny synthetic NIfTI volumes: file and folder modes, reports, errors."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_head
from medcycle import dose
from medcycle.anatomy import anatomy_metrics
from medcycle.cli import main
from medcycle.io import write_nifti
from medcycle.metrics import image_metrics, ms_ssim

AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, 1.0, 0, -15.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
SHAPE = (22, 18, 12)
OFFSET = 25  # sCT = CT + OFFSET inside the body


def _phantom(seed):
    idx = np.indices(SHAPE, dtype=np.float64)
    r2 = sum(((i - (n - 1) / 2) / (0.42 * n)) ** 2 for i, n in zip(idx, SHAPE))
    body = r2 < 1
    ct = np.full(SHAPE, -1000.0)
    ct[body] = 40.0
    ct[body & (r2 > 0.55)] = 1200.0  # skull
    ct[r2 < 0.06] = -800.0  # a sinus
    rng = np.random.default_rng(seed)
    sct = np.where(body, ct + OFFSET, -1000.0 + rng.integers(-300, 300, SHAPE))  # outside: anything
    mr = np.where(body, 300.0, 3.0) + 5 * idx[1]
    return ct, sct, body, mr


def _write_case(folder: Path, seed: int, mask=True, mr=True):
    ct, sct, body, mr_values = _phantom(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / "ct.nii.gz", ct, AFFINE, np.int16)
    if mask:
        write_nifti(folder / "mask.nii.gz", body, AFFINE, np.uint8)
    if mr:
        write_nifti(folder / "mr.nii.gz", mr_values, AFFINE, np.float32)
    return ct, sct, body


def _expected(ct, sct, body, window=(-1024.0, 3000.0)):
    return image_metrics(sct.astype(np.float32), ct.astype(np.float32), body, window=window)


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _no_temporaries(folder: Path):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_file_mode_cli_end_to_end(tmp_path):
    ct, sct, body = _write_case(tmp_path / "p1", seed=0)
    write_nifti(tmp_path / "p1_sct.nii.gz", sct, AFFINE, np.int16)
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "medcycle", "evaluate", "--pred", str(tmp_path / "p1_sct.nii.gz"),
         "--ref", str(tmp_path / "p1" / "ct.nii.gz"), "--mask", str(tmp_path / "p1" / "mask.nii.gz"),
         "--mr", str(tmp_path / "p1" / "mr.nii.gz"), "--out", str(out)],
        capture_output=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "p1" in result.stdout and "mean" in result.stdout and "25.0" in result.stdout
    assert f"mask: {tmp_path / 'p1' / 'mask.nii.gz'}" in result.stdout
    assert 'dose metrics skipped: ' in result.stdout
    rows = _read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["case", "mae", "psnr", "ssim", "ms_ssim", "mae_bone", "mae_air", "mae_soft",
                             "dice_bone", "hd95_bone", "dice_air", "hd95_air"]
    assert [r["case"] for r in rows] == ["p1"]
    expected = _expected(ct, sct, body)
    expected["ms_ssim"] = ms_ssim(sct, ct, body, window=(-1024.0, 3000.0))  # --window applies to MS-SSIM too
    expected.update(anatomy_metrics(sct, ct, (1.0, 1.0, 2.5), mask=body))
    assert expected["dice_bone"] == 1.0 and expected["dice_air"] == 1.0  # an offset of 25 HU moves no structure
    assert 0.5 < expected["ms_ssim"] < 1.0
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-9)
    # hand values: a constant offset inside the body
    assert float(rows[0]["mae"]) == pytest.approx(OFFSET)
    for region in ("mae_bone", "mae_air", "mae_soft"):
        assert float(rows[0][region]) == pytest.approx(OFFSET)
    assert float(rows[0]["psnr"]) == pytest.approx(10 * math.log10(4024.0**2 / OFFSET**2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["window"] == [-1024.0, 3000.0]
    for key in ("mae", "psnr", "ssim", "ms_ssim", "mae_bone", "mae_air", "mae_soft", "dice_bone", "hd95_air"):
        assert set(summary[key]) >= {"mean", "std", "median"}
        assert summary[key]["mean"] == pytest.approx(expected[key])
    assert "not" in summary["dose"]["skipped"] and "photon_dose_error" not in summary
    assert (out / "p1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| p1 | 25.0 |" in report and "![p1](p1.png)" in report and "## Anatomy" in report
    assert "## Dose" in report and "Not computed" in report
    _no_temporaries(out)


def test_folder_mode_with_a_missing_prediction(tmp_path, capfd):
    ref, pred, out = tmp_path / "data", tmp_path / "sct", tmp_path / "report"
    expected = {}
    for seed, name in enumerate(("case_a", "case_b", "case_c", "case_d")):
        ct, sct, body = _write_case(ref / name, seed, mask=name != "case_b", mr=name != "case_a")
        if name == "case_a":
            write_nifti(pred / name / "sct.nii.gz", sct, AFFINE, np.int16)  # SynthRAD layout
        elif name in ("case_b", "case_d"):
            write_nifti(pred / f"{name}_sct.nii.gz", sct, AFFINE, np.int16)  # flat layout
        # case_c: no prediction
        expected[name] = (ct, sct, body)
    (ref / "notes").mkdir()  # a folder without ct.* is not a case

    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "case_c" in errors[0] and "without a prediction" in errors[0]
    assert "case_c" in captured.out and "MISSING" in captured.out
    rows = {r["case"]: r for r in _read_csv(out / "metrics.csv")}
    assert sorted(rows) == ["case_a", "case_b", "case_d"]
    for name, row in rows.items():
        ct, sct, body = expected[name]
        mask = body if name != "case_b" else None
        if mask is None:  # case_b has no mask.*: computed from the CT, which is the body here
            from medcycle.transforms import CT_BODY_THRESHOLD_HU, compute_body_mask

            mask = compute_body_mask(ct.astype(np.float32), threshold=CT_BODY_THRESHOLD_HU)
        for key, value in _expected(ct, sct, mask).items():
            assert float(row[key]) == pytest.approx(value, rel=1e-9), (name, key)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and summary["missing"] == ["case_c"]
    assert "computed" in summary["masks"]["case_b"] and summary["masks"]["case_a"].endswith("mask.nii.gz")
    assert summary["mae"]["mean"] == pytest.approx(np.mean([float(r["mae"]) for r in rows.values()]))
    assert summary["mae"]["median"] == pytest.approx(np.median([float(r["mae"]) for r in rows.values()]))
    assert summary["mae"]["std"] == pytest.approx(np.std([float(r["mae"]) for r in rows.values()]))
    assert sorted(p.name for p in out.glob("*.png")) == ["case_a.png", "case_b.png", "case_d.png"]
    _no_temporaries(out)


def test_grid_mismatch_is_one_line_naming_both_files(tmp_path, capfd):
    ct, sct, body = _write_case(tmp_path / "c", seed=0)
    bad = tmp_path / "shifted_sct.nii.gz"
    shifted = AFFINE.copy()
    shifted[0, 3] += 4.0
    write_nifti(bad, sct, shifted, np.int16)
    code = main(["evaluate", "--pred", str(bad), "--ref", str(tmp_path / "c" / "ct.nii.gz"), "--out", str(tmp_path / "r")])
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 1 and captured.out == ""  # no table heading for a refused case
    assert str(bad) in err[0] and str(tmp_path / "c" / "ct.nii.gz") in err[0]
    assert not (tmp_path / "r" / "metrics.csv").exists()

    small = tmp_path / "small_sct.nii.gz"
    write_nifti(small, sct[:, :, :-1], AFFINE, np.int16)
    code = main(["evaluate", "--pred", str(small), "--ref", str(tmp_path / "c" / "ct.nii.gz")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(small) in err[0] and "ct.nii.gz" in err[0]

    mask = tmp_path / "mask_other.nii.gz"
    write_nifti(mask, body[:-1], AFFINE, np.uint8)
    write_nifti(tmp_path / "good_sct.nii.gz", sct, AFFINE, np.int16)
    code = main(["evaluate", "--pred", str(tmp_path / "good_sct.nii.gz"), "--ref", str(tmp_path / "c" / "ct.nii.gz"),
                 "--mask", str(mask)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(mask) in err[0]


def test_file_mode_without_mask_uses_the_ct_and_2025_window(tmp_path, capfd):
    import medcycle.jobs.evaluate as evaluate
    from medcycle.transforms import CT_BODY_THRESHOLD_HU, compute_body_mask

    ct, sct, body = _write_case(tmp_path / "c", seed=1, mask=False, mr=False)
    write_nifti(tmp_path / "c" / "sct.nii.gz", sct, AFFINE, np.int16)
    summary = evaluate.run(pred=tmp_path / "c" / "sct.nii.gz", ref=tmp_path / "c" / "ct.nii.gz",
                           window=(-1024.0, 3071.0))
    out = capfd.readouterr().out
    assert "mask: computed from the CT" in out and "3071" in out
    mask = compute_body_mask(ct.astype(np.float32), threshold=CT_BODY_THRESHOLD_HU)
    expected = _expected(ct, sct, mask, window=(-1024.0, 3071.0))
    assert summary["cases"] == 1 and summary["window"] == [-1024.0, 3071.0]
    assert list(summary["masks"]) == ["c"]  # <case>/sct.nii.gz is named after its folder
    for key in ("mae", "psnr", "ssim"):
        assert summary[key]["mean"] == pytest.approx(expected[key])


def test_usage_and_input_errors(tmp_path, capfd):
    _write_case(tmp_path / "data" / "x", seed=0)
    (tmp_path / "sct").mkdir()
    code = main(["evaluate", "--pred", str(tmp_path / "sct"), "--ref", str(tmp_path / "data"),
                 "--mask", str(tmp_path / "data" / "x" / "mask.nii.gz")])
    assert code == 2 and "folder mode" in capfd.readouterr().err
    code = main(["evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--ref", str(tmp_path / "data" / "x" / "ct.nii.gz")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "nope.nii.gz" in err[0]
    code = main(["evaluate", "--pred", str(tmp_path / "data" / "x" / "ct.nii.gz"), "--ref", str(tmp_path / "data" / "x" / "ct.nii.gz"),
                 "--window", "3000", "-1024"])
    assert code == 2 and "--window" in capfd.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["evaluate", "--pred", str(tmp_path / "sct"), "--ref", str(empty)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no cases" in err[0]


def test_an_impossible_window_is_a_usage_error(tmp_path):
    import medcycle.jobs.evaluate
    from medcycle.errors import UsageError

    with pytest.raises(UsageError, match="--window: window must be finite with hi > lo"):
        medcycle.jobs.evaluate.run(pred=tmp_path / "sct.nii.gz", ref=tmp_path / "ct.nii.gz", window=(3000.0, -1024.0))


def test_named_windows_from_the_cli(tmp_path, capfd):
    ct, sct, body = _write_case(tmp_path / "c", seed=2, mr=False)
    write_nifti(tmp_path / "c" / "sct.nii.gz", sct, AFFINE, np.int16)
    args = ["evaluate", "--pred", str(tmp_path / "c" / "sct.nii.gz"), "--ref", str(tmp_path / "c" / "ct.nii.gz"),
            "--mask", str(tmp_path / "c" / "mask.nii.gz")]
    assert main(args + ["--window", "synthrad2025", "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["window"] == [-1024.0, 3071.0]
    assert summary["ms_ssim"]["mean"] == pytest.approx(ms_ssim(sct, ct, body, window=(-1024.0, 3071.0)))
    assert summary["psnr"]["mean"] == pytest.approx(_expected(ct, sct, body, window=(-1024.0, 3071.0))["psnr"])
    capfd.readouterr()
    for bad in (["synthrad2030"], ["-1024", "3000", "4000"]):
        assert main(args + ["--window", *bad]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--window" in err[0] and "synthrad2025" in err[0]


def _without_the_dose_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyRadPlan" else real(name, *a))


def test_dose_without_the_extra_stops_before_any_work_and_the_default_says_it_skipped(tmp_path, capfd, monkeypatch):
    _without_the_dose_extra(monkeypatch)
    _write_case(tmp_path / "c", seed=0, mr=False)
    ct_path = str(tmp_path / "c" / "ct.nii.gz")
    out = tmp_path / "r"
    code = main(["evaluate", "--pred", ct_path, "--ref", ct_path, "--dose", "proton", "--out", str(out)])
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and captured.out == "" and not out.exists()
    assert "--dose proton" in err[0] and "pyRadPlan" in err[0] and 'pip install "medcycle[dose]"' in err[0]

    code = main(["evaluate", "--pred", ct_path, "--ref", ct_path, "--target", ct_path])
    assert code == 2 and "--target" in capfd.readouterr().err

    code = main(["evaluate", "--pred", ct_path, "--ref", ct_path, "--out", str(out)])
    lines = capfd.readouterr().out.splitlines()
    assert code == 0
    skipped = [line for line in lines if line.startswith("dose metrics skipped")]
    assert len(skipped) == 1 and "pyRadPlan" in skipped[0] and 'pip install "medcycle[dose]"' in skipped[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mae"]["mean"] == 0.0 and "pyRadPlan" in summary["dose"]["skipped"]


def test_evaluate_without_dose_never_imports_the_dose_engine(tmp_path):
    _write_case(tmp_path / "c", seed=0, mr=False)
    ct_path = str(tmp_path / "c" / "ct.nii.gz")
    script = ("import sys, medcycle\n"
              "from medcycle.cli import main\n"
              f"medcycle.evaluate(pred={ct_path!r}, ref={ct_path!r}, out={str(tmp_path / 'r')!r})\n"
              f"assert main(['evaluate', '--pred', {ct_path!r}, '--ref', {ct_path!r}]) == 0\n"
              "print('engine modules:', sorted(m for m in sys.modules if m.split('.')[0] in ('pyRadPlan', 'pymedphys')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", errors="replace",
                            timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "engine modules: []" in result.stdout


# --------------------------------------------------------------------------------------------------
# the dose through evaluate (needs the dose extra)

needs_engine = pytest.mark.skipif(not dose.available(), reason=f"dose extra not installed: {dose.unavailable_reason()}")
HEAD_AFFINE = np.array([[-3.0, 0, 0, 80.0], [0, -3.0, 0, 90.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])  # LPS-like


def _write_head(path: Path, ras: np.ndarray, dtype=np.int16) -> Path:
    """An (X, Y, Z) RAS array written on HEAD_AFFINE (x and y flipped): evaluate must reorient it back."""
    return write_nifti(path, ras[::-1, ::-1, :], HEAD_AFFINE, dtype)


@pytest.fixture
def engine_calls(monkeypatch):
    """The arrays evaluate hands to the dose engine, per call (the real engine still runs)."""
    calls = []
    real = dose.evaluate_dose

    def recording(ct, sct, spacing, modality, target=None, settings=None):
        calls.append({"ct": np.array(ct), "sct": np.array(sct), "spacing": spacing, "modality": modality,
                      "target": None if target is None else np.array(target), "settings": settings})
        return real(ct, sct, spacing, modality, target=target, settings=settings)

    monkeypatch.setattr(dose, "evaluate_dose", recording)
    return calls


@needs_engine
def test_dose_of_the_ct_against_itself_through_the_cli(tmp_path, capfd, engine_calls):
    head = tiny_head()
    ct_path = _write_head(tmp_path / "head_ct.nii.gz", head)
    out = tmp_path / "report"
    code = main(["evaluate", "--pred", str(ct_path), "--ref", str(ct_path), "--dose", "both", "--dose-grid", "6",
                 "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "photon gamma 2%/2mm %" in captured.out and "dose metrics skipped" not in captured.out
    assert [c["modality"] for c in engine_calls] == ["photon", "proton"]
    for call in engine_calls:  # the engine got the RAS view: the gantry turns about the cranio-caudal axis
        assert np.array_equal(call["ct"], head) and call["spacing"] == (3.0, 3.0, 3.0) and call["target"] is None
        assert call["settings"].dose_grid_mm == 6.0
    row = _read_csv(out / "metrics.csv")[0]
    for modality in ("photon", "proton"):
        assert float(row[f"{modality}_dose_error"]) == 0.0
        assert float(row[f"{modality}_gamma_pass"]) == 100.0
        for key in ("target_d98", "oar_dmean", "oar_d2"):
            assert float(row[f"{modality}_{key}"]) == 0.0
        assert (out / f"head_ct_dose_{modality}.png").stat().st_size > 10_000  # named after the case, head_ct
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dose"]["modalities"] == ["photon", "proton"] and summary["dose"]["engine"].startswith("pyRadPlan")
    assert summary["proton_gamma_pass"]["mean"] == 100.0
    report = (out / "report.md").read_text()
    assert "### proton" in report and "![head_ct proton dose](head_ct_dose_proton.png)" in report
    _no_temporaries(out)


@needs_engine
def test_bone_free_and_shifted_scts_show_in_the_proton_dose_through_the_api(tmp_path, capfd, engine_calls):
    import medcycle
    from scipy import ndimage

    head = tiny_head()
    ref, pred = tmp_path / "data", tmp_path / "sct"
    scts = {"nobone": np.where(head >= 250, 40.0, head),
            "shift": ndimage.shift(head, (2.0 / 3.0, 0.0, 0.0), order=1, mode="nearest")}
    for name, sct in scts.items():
        _write_head(ref / name / "ct.nii.gz", head)
        _write_head(pred / name / "sct.nii.gz", sct, np.float32)
    target = dose.default_target(head, (3.0, 3.0, 3.0))
    _write_head(ref / "nobone" / "target.nii.gz", target, np.uint8)  # the default sphere, given as a file

    summary = medcycle.evaluate(pred=pred, ref=ref, dose="proton", dose_grid_mm=4.0, out=tmp_path / "r")
    assert [c["modality"] for c in engine_calls] == ["proton", "proton"]
    assert np.array_equal(engine_calls[0]["target"], target) and engine_calls[1]["target"] is None
    assert engine_calls[0]["settings"].dose_grid_mm == 4.0
    assert summary["dose"]["targets"]["nobone"].endswith("target.nii.gz")
    rows = {r["case"]: r for r in _read_csv(tmp_path / "r" / "metrics.csv")}
    assert "photon_dose_error" not in rows["nobone"]
    nobone, shift = ({k: float(v) for k, v in rows[n].items() if k != "case"} for n in ("nobone", "shift"))
    assert nobone["proton_dose_error"] > 5.0 and nobone["proton_gamma_pass"] < 97.0  # measured 9.4 %, 94.6 %
    assert shift["proton_dose_error"] > 1.5 and shift["proton_gamma_pass"] < 99.0  # measured 2.7 %, 97.9 %
    assert nobone["dice_bone"] == 0.0 and shift["dice_bone"] < 0.9
