"""What the commands show: one summary line per successful command, --quiet, progress bars fit for logs.

The whole chain phantom -> preprocess -> train -> convert -> evaluate runs through the real command line
(:func:`medcycle.cli.main`, one run as a subprocess) on two tiny phantom cases.
"""
from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np

from helpers import ROOT, TINY, make_checkpoint, phantom_mr, write_nifti
from medcycle.cli import main
from medcycle.console import LOG_INTERVAL_S, progress

DATA = ["data.tile_size=32", "data.spacing=[3.0, 3.0]", "data.val_cases=1", "data.min_body_fraction=0.05"]
SECONDS = r"\d+\.\d (s|min)"


def sets(overrides) -> list[str]:
    return [arg for key in overrides for arg in ("--set", key)]


def cli(capsys, *args: str) -> tuple[list[str], str]:
    """Run one command in-process; its stdout lines and its stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.splitlines(), err


def test_a_bar_into_a_log_writes_whole_lines_not_redraws(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    clock = iter(range(0, 10_000, 7))  # each update 7 s later: a line every LOG_INTERVAL_S at most
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))
    bar = progress(range(100), desc="train", unit="it")
    for _ in bar:
        pass
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%")
    assert 3 <= len(lines) <= 700 / LOG_INTERVAL_S + 2  # 700 s of updates, not one line per update
    assert all(a != b for a, b in zip(lines, lines[1:]))  # closing does not repeat the last line

    monkeypatch.setattr(sys, "stderr", log := io.StringIO())
    for _ in progress(range(5), desc="x", unit="it", quiet=True):
        pass
    assert log.getvalue() == ""


def test_every_command_ends_with_one_summary_line_and_quiet_shows_only_it(tmp_path, capsys):
    data, cache, run = tmp_path / "data", tmp_path / "cache", tmp_path / "run"

    lines, err = cli(capsys, "phantom", "--out", str(data), "--cases", "2", "--size", "small")
    assert re.fullmatch(rf"medcycle phantom: wrote 2 cases in {data} \(64x75x32, 3\.00x3\.00x5\.00 mm, seed 0\) "
                        rf"in {SECONDS}", lines[-1]), lines
    assert err.count("phantom: 100%") == 1 and "\r" not in err  # the bar, as lines (stderr is no terminal)
    lines, err = cli(capsys, "phantom", "--out", str(data), "--cases", "2", "--size", "small", "-q")
    assert len(lines) == 1 and "wrote 0 of 2 cases (2 already there)" in lines[0] and err == ""

    lines, err = cli(capsys, "preprocess", "--data", str(data), "--out", str(cache), *sets(DATA), "--quiet")
    # warnings stay with --quiet: the tiny tile cuts these heads, one line per case says so
    assert len(lines) == 1 and err.count("\n") == 2
    assert all(line.startswith("medcycle preprocess: warning: phantom_00") and "of the body out" in line
               for line in err.splitlines())
    assert re.fullmatch(rf"medcycle preprocess: 2 done, 0 skipped \(unchanged\), 0 failed, of 2 cases; \d+ tiles "
                        rf"\(1 train / 1 val cases\) -> {cache} in {SECONDS}", lines[0]), lines

    train = ["--data", str(cache), "--out", str(run), "--max-iters", "2", "--device", "cpu", *sets([*TINY, *DATA])]
    lines, err = cli(capsys, "train", *train, "-q")
    assert len(lines) == 1 and err == ""
    assert re.fullmatch(rf"medcycle train: finished at iteration 2 on cpu after {SECONDS} -> {run / 'last.pt'}; "
                        rf"best val MAE .* HU at iteration 2 \({run / 'best.pt'}\)", lines[0]), lines

    mr, sct = data / "phantom_000" / "mr.nii.gz", tmp_path / "sct.nii.gz"
    lines, err = cli(capsys, "convert", "-i", str(mr), "-o", str(sct), "-m", str(run), "--tta", "none", "-q")
    assert len(lines) == 1 and err == ""
    assert re.fullmatch(rf"medcycle convert: wrote {sct} \(64x75x32, 3\.00x3\.00x5\.00 mm\) on cpu in {SECONDS}",
                        lines[0]), lines

    lines, err = cli(capsys, "convert", "-i", str(data), "-o", str(tmp_path / "scts"), "-m", str(run), "--tta", "none")
    assert re.fullmatch(rf"medcycle convert: 2 converted, 0 skipped \(output exists\), 0 failed, of 2 cases -> "
                        rf"{tmp_path / 'scts'} on cpu in {SECONDS}", lines[-1]), lines
    assert "convert: 100%" in err and "\r" not in err

    report = tmp_path / "report"
    lines, err = cli(capsys, "evaluate", "--pred", str(tmp_path / "scts"), "--ref", str(data), "--out", str(report))
    assert len(lines) > 3 and lines[0].startswith("SynthRAD metrics")  # the table, then the summary line
    summary = rf"medcycle evaluate: 2 case\(s\), mean MAE \d+\.\d HU, PSNR \d+\.\d\d dB, SSIM -?\d\.\d{{4}} inside the " \
              rf"body mask -> {report} \(report.md, metrics.csv, summary.json, 2 figure\(s\)\) in {SECONDS}"
    assert re.fullmatch(summary, lines[-1]), lines
    lines, err = cli(capsys, "evaluate", "--pred", str(tmp_path / "scts"), "--ref", str(data), "--out", str(report), "-q")
    assert len(lines) == 1 and re.fullmatch(summary, lines[0]) and err == ""


def test_a_single_file_conversion_prints_its_summary_in_a_real_process(tmp_path):
    mr = write_nifti(tmp_path / "mr.nii.gz", phantom_mr((20, 18, 6)), np.diag([0.8, 0.8, 2.5, 1.0]))
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    result = subprocess.run([sys.executable, "-m", "medcycle", "convert", "-i", str(mr), "-o", str(tmp_path / "sct.nii.gz"),
                             "-m", str(model), "--quiet"], cwd=ROOT, capture_output=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr
    # with --quiet only warnings reach stderr: the tiny test volume is no head-shaped head
    assert all(line.startswith("medcycle convert: warning: ") and "not a head" in line
               for line in result.stderr.splitlines())
    assert re.fullmatch(rf"medcycle convert: wrote {tmp_path / 'sct.nii.gz'} \(20x18x6, 0\.80x0\.80x2\.50 mm\) on cpu "
                        rf"in {SECONDS}\n", result.stdout)
