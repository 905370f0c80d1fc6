"""`medcycle evaluate` end to end on tiny synthetic NIfTI volumes: file and folder modes, reports, errors."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medcycle.cli import main
from medcycle.io import write_nifti
from medcycle.metrics import image_metrics

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
    rows = _read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["case", "mae", "psnr", "ssim", "mae_bone", "mae_air", "mae_soft"]
    assert [r["case"] for r in rows] == ["p1"]
    expected = _expected(ct, sct, body)
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-9)
    # hand values: a constant offset inside the body
    assert float(rows[0]["mae"]) == pytest.approx(OFFSET)
    for region in ("mae_bone", "mae_air", "mae_soft"):
        assert float(rows[0][region]) == pytest.approx(OFFSET)
    assert float(rows[0]["psnr"]) == pytest.approx(10 * math.log10(4024.0**2 / OFFSET**2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["window"] == [-1024.0, 3000.0]
    for key in ("mae", "psnr", "ssim", "mae_bone", "mae_air", "mae_soft"):
        assert set(summary[key]) >= {"mean", "std", "median"}
        assert summary[key]["mean"] == pytest.approx(expected[key])
    assert (out / "p1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
