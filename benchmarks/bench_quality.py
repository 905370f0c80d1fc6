"""Ablation: which training recipe gives the most faithful synthetic CT for the same wall-clock budget.

    python benchmarks/bench_quality.py                  # every recipe, 15 min each (about 1.5 h on 2 cores)
    python benchmarks/bench_quality.py --minutes 5      # a shorter budget for every recipe
    python benchmarks/bench_quality.py --recipes plain structure --minutes 2
    python benchmarks/bench_quality.py --set train.batch_size=2   # every recipe on a changed base config

Every recipe starts from ``configs/demo_cpu.yaml`` and sets all the keys it ablates explicitly, so
the rows differ only in what their name says. All recipes train on the same phantom cases (16 cases:
14 train, 2 validation; the model is selected on the validation cases, `best.pt`) and are reported
on 3 held-out phantom cases that no recipe and no model selection ever saw: MAE in HU inside the
body (overall, bone, air), PSNR and SSIM (SynthRAD2023 definitions, `medcycle.metrics`).
Two validation columns: ``val MAE tiles`` is the training's own check that chose `best.pt` (the
validation tiles on the model grid, mean per tile); ``val MAE volumes`` converts the validation cases
as whole volumes exactly as the held-out ones are (`medcycle convert`, mirroring, the input grid):
compare recipes on this one, it measures what the held-out column measures.

Three rows come first that no recipe can beat, measured on the same held-out cases (a few seconds):

* ``floor: model grid``: the real CT taken through the preprocessing chain onto the model grid
  (``data.spacing``) and back onto the input grid as ``medcycle convert`` does: what the grid alone costs;
* ``floor: tissue oracle``: every voxel given the median CT value of its tissue (phantom labels)
  over the training cases: a perfect tissue classifier on the input grid that cannot know a case's
  own tissue values (cortical density, for one, has no MR signal).
* ``floor: tissue oracle, model grid``: the tissue oracle taken onto the model grid and back: a perfect
  tissue classifier that works at the model's resolution, as every recipe does (the lowest MAE a
  recipe on this grid can expect).

The table is printed in Markdown (for the README) and written with the raw numbers to
``WORK/quality.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "demo_cpu.yaml"

# The keys every recipe sets; a recipe overrides some of them.
BASE = {
    "data.context_slices": 1,
    "loss.pairing": "unpaired",
    "loss.structure": 0.0,
    "train.amp": "auto",
}
RECIPES = {
    "plain": ("CycleGAN: LSGAN + cycle L1 (identity off, as in the demo), 2D", {}),
    "structure": ("plain + MIND structure loss (Yang et al. 2018)", {"loss.structure": 1.0}),
    "context": ("plain + 2.5D: 3 neighbouring slices as channels", {"data.context_slices": 3}),
    "demo": ("the demo default, `configs/demo_cpu.yaml`: 2.5D + MIND", None),
    "hybrid": ("the demo default + paired L1 on registered pairs (`loss.pairing=hybrid`)", {"loss.pairing": "hybrid"}),
    "demo-fp32": ("the demo default in fp32 (`train.amp=none`), to compare with the bf16 fast path", {"train.amp": "none"}),
}
TRAIN_CASES, TEST_CASES = 16, 3


def overrides_for(recipe: str, base: Sequence[str] = ()) -> list[str]:
    """``KEY=VALUE`` overrides of `recipe` on top of the demo config and the `base` overrides
    (`demo*` and `hybrid` keep the demo's recipe)."""
    extra = RECIPES[recipe][1]
    if recipe == "demo":
        return list(base)
    values = dict(extra) if recipe in ("hybrid", "demo-fp32") else {**BASE, **extra}
    return [*base, *(f"{key}={value}" for key, value in values.items())]


def make_data(work: Path, seed: int) -> tuple[Path, Path]:
    """Phantom cases split once into training (incl. validation) and held-out test folders."""
    import medcycle.jobs.phantom
    from medcycle.jobs.demo import _split_cases

    train_dir, test_dir = work / "data" / "train", work / "data" / "test"
    if not (train_dir.is_dir() and test_dir.is_dir()):
        staging = work / "data" / "phantom"
        medcycle.jobs.phantom.run(out=staging, cases=TRAIN_CASES + TEST_CASES, seed=seed, size="full")
        _split_cases(staging, train_dir, test_dir)
    return train_dir, test_dir


def run_recipe(recipe: str, work: Path, train_dir: Path, test_dir: Path, minutes: float, seed: int,
               base: Sequence[str] = ()) -> dict:
    """Preprocess (a cache per data config), train for `minutes`, convert and evaluate the held-out cases."""
    import medcycle.jobs.convert
    import medcycle.jobs.evaluate
    import medcycle.jobs.preprocess
    import medcycle.jobs.train
    from medcycle.checkpoint import load_checkpoint, resolve_checkpoint
    from medcycle.config import config_hash, load_config

    overrides = overrides_for(recipe, base)
    config = load_config(CONFIG, overrides)
    cache = work / f"cache_{config_hash(config.data)}"
    medcycle.jobs.preprocess.run(out=cache, data=train_dir, config=CONFIG, overrides=overrides, workers=2)
    run_dir = work / "runs" / recipe
    started = time.perf_counter()
    medcycle.jobs.train.run(config=CONFIG, data=cache, out=run_dir, resume=(run_dir / "last.pt").is_file(),
                        overrides=[*overrides, f"train.max_minutes={minutes}", f"train.seed={seed}"])
    trained = time.perf_counter() - started
    val_dir = validation_cases(cache, train_dir, work / "data" / f"val_{cache.name}")
    medcycle.jobs.convert.run(input=val_dir, output=work / "sct_val" / recipe, model=run_dir, overwrite=True)
    validation = medcycle.jobs.evaluate.run(pred=work / "sct_val" / recipe, ref=val_dir, out=work / "report_val" / recipe)
    sct = work / "sct" / recipe
    medcycle.jobs.convert.run(input=test_dir, output=sct, model=run_dir, overwrite=True)
    summary = medcycle.jobs.evaluate.run(pred=sct, ref=test_dir, out=work / "report" / recipe)
    best = load_checkpoint(resolve_checkpoint(run_dir))
    last = load_checkpoint(run_dir / "last.pt")
    return {
        "recipe": recipe,
        "what": RECIPES[recipe][0],
        "overrides": overrides,
        "minutes": trained / 60,
        "iterations": int(last["iteration"]),
        "selected_iteration": int(best["iteration"]),
        "val_mae": (best.get("metrics") or {}).get("best_val_mae"),
        "val_volume_mae": validation["mae"]["mean"],
        **{key: summary[key]["mean"] for key in ("mae", "mae_bone", "mae_air", "psnr", "ssim")},
    }


def validation_cases(cache: Path, train_dir: Path, out: Path) -> Path:
    """A folder `out` linking the cache's validation cases (its manifest's split) of `train_dir`."""
    from medcycle.data.cache import MANIFEST

    manifest = json.loads((cache / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for case, entry in manifest["cases"].items():
        link = out / case
        if entry["split"] == "val" and not link.exists():
            link.symlink_to((train_dir / case).resolve(), target_is_directory=True)
    return out


def floors(train_dir: Path, test_dir: Path, base: Sequence[str] = ()) -> list[dict]:
    """The three reference rows of the table (module docstring) for the held-out cases."""
    import nibabel as nib
    import numpy as np

    from monai.data import MetaTensor

    from medcycle.config import load_config
    from medcycle.image import affine_of, voxels
    from medcycle.io import load_volume
    from medcycle.metrics import image_metrics
    from medcycle.transforms import HUCodec, to_input_grid, volume_transforms

    def read(path: Path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).dataobj)

    labels = [read(case / "labels.nii.gz") for case in sorted(train_dir.iterdir())]
    cts = [read(case / "ct.nii.gz") for case in sorted(train_dir.iterdir())]
    median_of_label = np.full(256, np.nan, dtype=np.float32)  # uint8 labels -> HU; NaN: a tissue never seen
    for label in np.unique(np.concatenate([np.unique(lab) for lab in labels])):
        median_of_label[label] = np.median(np.concatenate([ct[lab == label] for ct, lab in zip(cts, labels)]))
    del labels, cts
    data = load_config(CONFIG, base).data
    chain = volume_transforms(data, ("ct",))
    codec = HUCodec.from_config(data)

    def through_model_grid(path: Path, ct: MetaTensor) -> np.ndarray:
        """The HU volume at `path` onto the model grid and back onto `ct`'s grid, as ``medcycle convert`` resamples."""
        on_model_grid = chain({"ct": str(path)})["ct"]
        return to_input_grid(codec.decode_(on_model_grid.as_tensor().clone()), affine_of(on_model_grid), ct)

    scores: dict[str, list[dict]] = {"grid": [], "oracle": [], "oracle_grid": []}
    with tempfile.TemporaryDirectory() as tmp:
        for case in sorted(test_dir.iterdir()):
            ct = load_volume(case / "ct.nii.gz")
            mask = read(case / "mask.nii.gz") > 0
            oracle = median_of_label[read(case / "labels.nii.gz")]
            oracle_file = Path(tmp) / f"{case.name}.nii.gz"
            nib.save(nib.Nifti1Image(oracle, affine_of(ct)), str(oracle_file))
            scores["grid"].append(image_metrics(through_model_grid(case / "ct.nii.gz", ct), voxels(ct), mask))
            scores["oracle"].append(image_metrics(oracle, voxels(ct), mask))
            scores["oracle_grid"].append(image_metrics(through_model_grid(oracle_file, ct), voxels(ct), mask))
    grid = f"{data.spacing[0]:g} x {data.spacing[1]:g} mm model grid"
    what = {
        "grid": ("floor: model grid", f"the real CT onto the {grid} and back"),
        "oracle": ("floor: tissue oracle", "each tissue's median CT over the training cases, from the phantom's labels"),
        "oracle_grid": ("floor: tissue oracle, model grid", f"the tissue oracle onto the {grid} and back"),
    }
    return [{"recipe": what[key][0], "what": what[key][1], "iterations": None, "val_mae": None,
             **{metric: float(np.mean([row[metric] for row in rows])) for metric in ("mae", "mae_bone", "mae_air", "psnr", "ssim")}}
            for key, rows in scores.items()]


def markdown(rows: list[dict]) -> str:
    """The README table."""
    lines = [
        "| recipe | what | iterations | val MAE tiles | val MAE volumes | test MAE | bone | air | PSNR | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def num(value: object, fmt: str) -> str:  # null when no held-out voxel is in that tissue
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['what']} | {num(r['iterations'], 'd')} | {num(r.get('val_mae'), '.0f')} | "
            f"{num(r.get('val_volume_mae'), '.0f')} | {num(r['mae'], '.0f')} | "
            f"{num(r['mae_bone'], '.0f')} | {num(r['mae_air'], '.0f')} | {num(r['psnr'], '.2f')} | {num(r['ssim'], '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget of every recipe (default 15)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="recipes to run")
    parser.add_argument("--work", type=Path, default=Path("bench_quality"), help="working folder (default ./bench_quality)")
    parser.add_argument("--seed", type=int, default=0, help="phantom and training seed (default 0)")
    parser.add_argument("--set", dest="base", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of the demo config for every recipe (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    train_dir, test_dir = make_data(args.work, args.seed)
    rows = floors(train_dir, test_dir, args.base)
    for recipe in args.recipes:
        print(f"\n=== {recipe}: {RECIPES[recipe][0]} ({args.minutes:g} min) ===", flush=True)
        rows.append(run_recipe(recipe, args.work, train_dir, test_dir, args.minutes, args.seed, args.base))
        result = {"minutes_per_recipe": args.minutes, "base_overrides": args.base, "rows": rows}
        (args.work / "quality.json").write_text(json.dumps(result, indent=2))
    changed = f"; demo config changed for all: {', '.join(args.base)}" if args.base else ""
    print(f"\nHeld-out phantom cases ({TEST_CASES}), {args.minutes:g} min of training per recipe; "
          f"model selected on the validation cases{changed}:\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
