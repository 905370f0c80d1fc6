"""`medcycle demo`: the whole job end to end through the real CLI, with a tiny model and budget."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medcycle import dose
from medcycle.jobs.demo import TEST_CASES, TRAIN_CASES, format_mean, training_minutes

ROOT = Path(__file__).resolve().parents[1]


def test_training_gets_what_the_other_steps_leave():
    assert training_minutes(15.0, 0.5) == 13.25  # 1.25 min kept for conversion and evaluation
    assert training_minutes(3.0, 2.9) == 1.0  # never under a third of the budget
    assert training_minutes(15.0, 0.5, reserve=2.75) == 11.75  # with the dose plans


def test_report_values_missing_from_the_summary_print_as_na():
    assert format_mean({"mae": {"mean": 12.345}}, "mae", ".1f") == "12.3"
    assert format_mean({"mae_air": {"mean": None}}, "mae_air", ".1f") == "n/a"
    assert format_mean({}, "ssim", ".3f") == "n/a"


def test_demo_runs_the_whole_job_from_the_cli(tmp_path):
    out = tmp_path / "demo"
    tiny = ["model.gen_width=8", "model.gen_blocks=1", "model.disc_width=8", "train.val_every=10",
            "train.image_every=10", "train.checkpoint_every=10"]
    args = [sys.executable, "-m", "medcycle", "demo", "--out", str(out), "--minutes", "0.6"]
    for key in tiny:
        args += ["--set", key]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace",
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out MAE" in result.stdout and "[5/5]" in result.stdout and "MS-SSIM" in result.stdout
    if dose.available():
        assert "dose, photon / proton" in result.stdout
    else:  # the report says that it skipped them, and why
        assert 'dose figures skipped: the dose extra is missing: ' in result.stdout
        assert 'pip install "medcycle[dose]"' in (out / "report" / "report.md").read_text()

    test_cases = sorted(p.name for p in (out / "data" / "test").iterdir())
    assert len(test_cases) == TEST_CASES
    assert len(list((out / "data" / "train").iterdir())) == TRAIN_CASES
    for case in test_cases:  # each held-out MRI became an sCT on exactly its grid, with a figure
        mr = nib.load(out / "data" / "test" / case / "mr.nii.gz")
        sct = nib.load(out / "sct" / case / "sct.nii.gz")
        assert sct.shape == mr.shape
        np.testing.assert_allclose(sct.affine, mr.affine, atol=1e-6)
        assert sct.get_data_dtype() == np.int16
        assert (out / "report" / f"{case}.png").stat().st_size > 10_000
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert math.isfinite(summary["mae"]["mean"]) and summary["mae"]["n"] == TEST_CASES
    assert (out / "run" / "best.pt").is_file()  # chosen on the validation cases
    with open(out / "run" / "validation.csv") as f:
        assert len(list(csv.DictReader(f))) >= 1
