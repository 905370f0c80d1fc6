"""`medcycle demo`: the whole job on built-in phantom data, with no arguments needed.

phantom cases -> preprocess (training and validation cases only) -> train ``configs/demo_cpu.yaml``
within a wall-clock budget -> convert the held-out MRIs -> evaluate against their CT -> report.
With the dose extra installed the evaluation includes a photon and a proton plan per held-out case on
a coarse dose grid (:data:`DOSE_GRID_MM`), and training leaves them :data:`DOSE_RESERVE_MIN`.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from medcycle.config import find_config
from medcycle.errors import UsageError

DEFAULT_CONFIG = "demo_cpu"  # built-in: medcycle/configs/demo_cpu.yaml
TRAIN_CASES = 16  # the last `data.val_cases` of these validate; the rest train
TEST_CASES = 3  # held out: never preprocessed, never seen in training or model selection
FINISH_RESERVE_MIN = 1.25  # converting and evaluating the held-out cases: ~15 s on 2 CPU cores at 2 mm, 40-60 s at 1 mm
DOSE_GRID_MM = 5.0  # coarse: the demo's photon and proton plans stay quick (docs/results/dose.md)
DOSE_RESERVE_MIN = 2.0  # those plans for the 3 held-out cases: about 2 min of CPU (docs/results/dose.md)


def _split_cases(phantom_dir: Path, train_dir: Path, test_dir: Path) -> None:
    cases = sorted(p for p in phantom_dir.iterdir() if p.is_dir())
    for folder, chosen in ((train_dir, cases[:TRAIN_CASES]), (test_dir, cases[TRAIN_CASES:])):
        folder.mkdir(parents=True, exist_ok=True)
        for case in chosen:
            shutil.move(str(case), str(folder / case.name))
    phantom_dir.rmdir()


def training_minutes(budget: float, spent: float, reserve: float = FINISH_RESERVE_MIN) -> float:
    """Training minutes of a demo with a total `budget` after `spent` minutes of data preparation:
    what is left less the `reserve` the conversion and evaluation need, never under a third of the budget."""
    return round(max(budget / 3, budget - spent - reserve), 2)


def format_mean(summary: dict, key: str, fmt: str) -> str:
    """The summary's mean of `key` formatted, or ``n/a`` (null when no held-out voxel is in that tissue)."""
    value = (summary.get(key) or {}).get("mean")
    return format(value, fmt) if isinstance(value, (int, float)) else "n/a"


def run(out: str | Path = "medcycle_demo", minutes: float = 15.0, config: Optional[str | Path] = None,
        overrides: Sequence[str] = (), seed: int = 0, device: Optional[str] = None, quiet: bool = False) -> dict:
    """Run the demo in `out` within about `minutes` in all; returns the held-out evaluation summary.

    `device` trains and converts (:func:`medcycle.device.resolve_device`, default ``auto``); `quiet`:
    no progress bars and no step lines, only the summary line at the end.
    """
    started = time.perf_counter()  # before the imports: loading torch and MONAI takes ~5 s of the budget
    import medcycle.dose
    import medcycle.jobs.convert
    import medcycle.jobs.evaluate
    import medcycle.jobs.phantom
    import medcycle.jobs.preprocess
    import medcycle.jobs.train
    from medcycle.console import note, seconds, summary
    from medcycle.device import resolve_device

    if minutes <= 0:
        raise UsageError(f"--minutes must be > 0, got {minutes}")
    resolve_device(device)  # an unavailable device is refused before the data is made
    config = find_config(config or DEFAULT_CONFIG)
    out = Path(out)
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"

    note(f"[1/5] phantom: {TRAIN_CASES + TEST_CASES} paired MR/CT head cases in {out / 'data'}", quiet)
    if not (train_dir.is_dir() and test_dir.is_dir()):
        staging = out / "data" / "phantom"
        with _step_lines(quiet):
            medcycle.jobs.phantom.run(out=staging, cases=TRAIN_CASES + TEST_CASES, seed=seed, size="full", quiet=quiet)
        _split_cases(staging, train_dir, test_dir)

    note(f"[2/5] preprocess: {TRAIN_CASES} cases -> {out / 'cache'}", quiet)
    with _step_lines(quiet):
        medcycle.jobs.preprocess.run(out=out / "cache", data=train_dir, config=config, overrides=overrides, workers=2,
                                     quiet=quiet)

    with_dose = medcycle.dose.available()
    reserve = FINISH_RESERVE_MIN + (DOSE_RESERVE_MIN if with_dose else 0.0)
    train_minutes = training_minutes(minutes, (time.perf_counter() - started) / 60, reserve)
    note(f"[3/5] train: {config.name} for {train_minutes:g} min -> {out / 'run'}", quiet)
    train_overrides = [*overrides, f"train.max_minutes={train_minutes}", f"train.seed={seed}"]
    resume = (out / "run" / "last.pt").is_file()
    with _step_lines(quiet):
        medcycle.jobs.train.run(config=config, data=out / "cache", out=out / "run", overrides=train_overrides,
                                resume=resume, device=device, quiet=quiet)

    note(f"[4/5] convert: {TEST_CASES} held-out MRIs -> {out / 'sct'}", quiet)
    with _step_lines(quiet):
        medcycle.jobs.convert.run(input=test_dir, output=out / "sct", model=out / "run", overwrite=True, device=device,
                                  quiet=quiet)

    note(f"[5/5] evaluate against the real CT{' with photon and proton plans' if with_dose else ''} -> {out / 'report'}",
         quiet)
    with _step_lines(quiet):
        medcycle.jobs.evaluate.run(pred=out / "sct", ref=test_dir, out=out / "report", dose="both" if with_dose else None,
                                   dose_grid_mm=DOSE_GRID_MM, quiet=quiet)
    result = json.loads((out / "report" / "summary.json").read_text())

    def mean(key: str, fmt: str) -> str:
        return format_mean(result, key, fmt)

    summary("demo", f"held-out MAE {mean('mae', '.1f')} HU (bone {mean('mae_bone', '.1f')}, air {mean('mae_air', '.1f')}), "
                    f"PSNR {mean('psnr', '.2f')} dB, SSIM {mean('ssim', '.3f')} on {TEST_CASES} cases -> {out} "
                    f"in {seconds(time.perf_counter() - started)}")
    if with_dose:
        dose_line = (f"  dose, photon / proton plan on the CT recomputed on the sCT: dose error {mean('photon_dose_error', '.2f')}"
                     f" / {mean('proton_dose_error', '.2f')} %, gamma 2%/2mm {mean('photon_gamma_pass', '.1f')} / "
                     f"{mean('proton_gamma_pass', '.1f')} %")
    else:
        dose_line = f"  dose figures skipped: {result['dose']['skipped']}"
    note(f"  MS-SSIM {mean('ms_ssim', '.3f')}; bone Dice {mean('dice_bone', '.3f')}, HD95 {mean('hd95_bone', '.1f')} mm; "
         f"air cavities Dice {mean('dice_air', '.3f')}, HD95 {mean('hd95_air', '.1f')} mm\n{dose_line}\n"
         f"  synthetic CTs: {out / 'sct'}\n  report (tables and figures): {out / 'report' / 'report.md'}\n"
         f"  run (checkpoints, losses.csv, tensorboard, images): {out / 'run'}", quiet)
    return result


@contextlib.contextmanager
def _step_lines(quiet: bool) -> Iterator[None]:
    """With `quiet`, a step's own summary line is dropped: the demo ends with its one line."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
