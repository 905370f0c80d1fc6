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
    assert "[5/5]" in result.stdout and "MS-SSIM" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("medcycle demo: ")]
    assert len(summary) == 1 and summary[0].startswith("medcycle demo: held-out MAE ") and f"-> {out} in " in summary[0]
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


def test_quiet_demo_prints_only_its_summary_line_and_passes_the_device_on(tmp_path, monkeypatch, capsys):
    import medcycle.jobs.convert
    import medcycle.jobs.evaluate
    import medcycle.jobs.phantom
    import medcycle.jobs.preprocess
    import medcycle.jobs.train
    from medcycle.cli import main

    calls = {}

    def fake(name):
        def job(**kwargs):
            calls[name] = kwargs
            if name == "phantom":
                for i in range(TRAIN_CASES + TEST_CASES):
                    (Path(kwargs["out"]) / f"phantom_{i:03d}").mkdir(parents=True)
            if name == "evaluate":
                Path(kwargs["out"]).mkdir(parents=True)
                (Path(kwargs["out"]) / "summary.json").write_text(json.dumps({"mae": {"mean": 150.0}, "dose": {"skipped": "no"}}))
            print(f"medcycle {name}: its own summary line")  # a step's line: dropped with --quiet
        return job

    for name in ("phantom", "preprocess", "train", "convert", "evaluate"):
        monkeypatch.setattr(getattr(medcycle.jobs, name), "run", fake(name))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "3", "--device", "cpu", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("medcycle demo: held-out MAE 150.0 HU (bone n/a, air n/a)")
    assert all(kwargs["quiet"] for kwargs in calls.values())
    assert calls["train"]["device"] == calls["convert"]["device"] == "cpu"

    assert main(["demo", "--out", str(tmp_path / "loud"), "--minutes", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/5] phantom") and "medcycle train: its own summary line" in lines
    assert [line for line in lines if line.startswith("medcycle demo: ")] and lines[-1].startswith("  run (")
