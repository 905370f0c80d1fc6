"""Benchmark `medcycle preprocess` against a bare nibabel + numpy baseline, and its workers.

    python benchmarks/bench_preprocess.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/bench_preprocess.py --quick    # small sizes, checks that the script works

1. One paired case, MR + CT of 256 x 256 x 160 voxels at 1 mm (synthetic head-like arrays written
   as int16 .nii.gz), preprocessed with ``data.spacing = [1, 1]`` and ``data.tile_size = 256``:

   * ``medcycle``: :func:`medcycle.jobs.preprocess.run` end to end (checksums, MONAI load / orientation /
     spacing, body mask, MR percentile normalisation, CT window, tiles, atomic .npy + record +
     manifest writes);
   * ``baseline``: nibabel alone reading both files (float32) and numpy writing the same number of
     256 x 256 float16 tiles for MR and CT and a uint8 mask tile stack.

   Each runs in its own subprocess: one warm-up, then ``--repeats`` timed runs (median reported).
   Peak memory is the subprocess's peak RSS (``VmHWM``), shown beside the RSS right after its
   imports (torch and MONAI alone take a few hundred MiB). Target: medcycle within 3x of the
   baseline's time.

2. A dataset of ``--cases`` (20) paired cases of 256 x 256 x 48 voxels (smaller than a full head so
   the run stays short; the per-case work is the same kind), preprocessed with ``workers=1`` and
   ``workers=2`` (each in a fresh subprocess, the heavy modules imported before timing). Target:
   speed-up >= 1.6x on 2 free cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MiB = 1024.0  # ru_maxrss is in KiB on Linux
OVERRIDES = ["data.spacing=[1.0, 1.0]", "data.tile_size=256", "data.context_slices=1"]


def rss_mib() -> float:
    """Peak RSS of this process so far, in MiB.

    ``VmHWM`` of /proc/self/status where there is one: unlike ``ru_maxrss`` (which a child inherits
    from its parent across fork and exec on Linux) it counts only this process's own memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MiB


# --------------------------------------------------------------------------------------------------
# data


def head(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(MR, CT) int16 arrays of a head-like ellipsoid: scalp, dark skull, brain, air sinus, noise."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = (x / 0.78) ** 2 + (y / 0.88) ** 2 + (z / 1.15) ** 2
    body, skull, brain = r <= 1.0, (r > 0.62) & (r <= 0.8), r <= 0.62
    sinus = ((x - 0.05) ** 2 + (y + 0.55) ** 2 <= 0.1**2) & (np.abs(z) < 0.4)
    mr = np.zeros(shape, dtype=np.float32)
    mr[body] = 650.0
    mr[skull] = 60.0
    mr[brain] = (420.0 + 80.0 * np.broadcast_to(x, shape))[brain]
    mr[sinus] = 0.0
    mr += np.abs(rng.normal(0.0, 12.0, shape)).astype(np.float32)
    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = 30.0
    ct[skull] = 1300.0
    ct[brain] = 38.0
    ct[sinus] = -1000.0
    ct += rng.normal(0.0, 8.0, shape).astype(np.float32)
    return np.rint(mr).astype(np.int16), np.rint(ct).astype(np.int16)


def write_case(folder: Path, shape: tuple[int, int, int], seed: int) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-(shape[0] - 1) / 2, -(shape[1] - 1) / 2, -(shape[2] - 1) / 2]
    mr, ct = head(shape, seed)
    for name, array in (("mr", mr), ("ct", ct)):
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(folder / f"{name}.nii.gz"))


# --------------------------------------------------------------------------------------------------
# children (each measurement runs in its own process)


def child_medcycle(args: argparse.Namespace) -> dict:
    import medcycle.jobs.preprocess as preprocess
    import medcycle.transforms  # noqa: F401 - imported before timing
    import scipy.ndimage  # noqa: F401
    import skimage.filters  # noqa: F401

    after_imports = rss_mib()
    times, tiles = [], 0
    for repeat in range(args.repeats + 1):
        out = Path(args.out) / f"run{repeat}"
        started = time.perf_counter()
        summary = preprocess.run(out=out, data=args.data, overrides=OVERRIDES, workers=args.workers)
        elapsed = time.perf_counter() - started
        tiles = summary["tiles"]
        if repeat > 0 or args.repeats == 0:
            times.append(elapsed)
        shutil.rmtree(out, ignore_errors=True)
    return {"times": times, "rss": rss_mib(), "rss_imports": after_imports, "tiles": tiles}


def child_baseline(args: argparse.Namespace) -> dict:
    import nibabel as nib

    after_imports = rss_mib()
    times = []
    case = Path(args.data) / sorted(os.listdir(args.data))[0]
    for repeat in range(args.repeats + 1):
        out = Path(args.out) / f"base{repeat}"
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        mr = nib.load(str(case / "mr.nii.gz")).get_fdata(dtype=np.float32)
        ct = nib.load(str(case / "ct.nii.gz")).get_fdata(dtype=np.float32)
        n = min(args.tiles, mr.shape[2])
        first = (mr.shape[2] - n) // 2
        for name, volume in (("mr", mr), ("ct", ct)):
            tiles = np.ascontiguousarray(np.moveaxis(volume[:, :, first:first + n], 2, 0)[:, None], dtype=np.float16)
            np.save(out / f"{name}.npy", tiles)
        mask = np.ascontiguousarray(np.moveaxis(mr[:, :, first:first + n] > 0, 2, 0)[:, None], dtype=np.uint8)
        np.save(out / "mask.npy", mask)
        elapsed = time.perf_counter() - started
        if repeat > 0 or args.repeats == 0:
            times.append(elapsed)
        shutil.rmtree(out, ignore_errors=True)
    return {"times": times, "rss": rss_mib(), "rss_imports": after_imports, "tiles": args.tiles}


def run_child(mode: str, data: Path, out: Path, repeats: int, workers: int = 1, tiles: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--data", str(data), "--out", str(out),
               "--repeats", str(repeats), "--workers", str(workers), "--tiles", str(tiles)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"child {mode} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that the script works")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--cases", type=int, default=20, help="cases of the worker benchmark (default 20)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the job's own prints; stdout carries the JSON
            result = child_medcycle(args) if args.child == "medcycle" else child_baseline(args)
        print(json.dumps(result))
        return

    big = (128, 128, 40) if args.quick else (256, 256, 160)
    small = (128, 128, 16) if args.quick else (256, 256, 48)
    n_cases = 4 if args.quick else args.cases
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        print(f"writing data in {tmp} ...", flush=True)
        write_case(tmp / "one" / "case000", big, seed=0)
        for i in range(n_cases):
            write_case(tmp / "many" / f"case{i:03d}", small, seed=100 + i)
        load = os.getloadavg()[0]

        medcycle = run_child("medcycle", tmp / "one", tmp / "out", repeats)
        baseline = run_child("baseline", tmp / "one", tmp / "out", repeats, tiles=medcycle["tiles"])
        serial = run_child("medcycle", tmp / "many", tmp / "out", 0, workers=1)
        parallel = run_child("medcycle", tmp / "many", tmp / "out", 0, workers=2)

    t_med, t_base = statistics.median(medcycle["times"]), statistics.median(baseline["times"])
    ratio = t_med / t_base
    t1, t2 = serial["times"][0], parallel["times"][0]
    speedup = t1 / t2
    shape = "x".join(map(str, big))
    print()
    print(f"Preprocessing one MR+CT case of {shape} voxels at 1 mm, tile 256 ({medcycle['tiles']} tiles); "
          f"median of {repeats} runs after a warm-up; {os.cpu_count()} CPUs, load average {load:.2f} at start")
    print()
    print("| pipeline | s / case | peak RSS MiB | RSS after imports MiB |")
    print("|---|---:|---:|---:|")
    print(f"| baseline: nibabel read + numpy tile writes | {t_base:.2f} | {baseline['rss']:.0f} | {baseline['rss_imports']:.0f} |")
    print(f"| medcycle preprocess | {t_med:.2f} | {medcycle['rss']:.0f} | {medcycle['rss_imports']:.0f} |")
    print(f"| ratio medcycle / baseline | {ratio:.2f}x (target <= 3x: {'met' if ratio <= 3 else 'MISSED'}) | "
          f"{medcycle['rss'] / baseline['rss']:.2f}x | |")
    print()
    print(f"Dataset: {n_cases} paired cases of {'x'.join(map(str, small))} voxels at 1 mm, tile 256")
    print()
    print("| workers | seconds | s / case | peak RSS MiB (parent) |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 | {t1:.2f} | {t1 / n_cases:.2f} | {serial['rss']:.0f} |")
    print(f"| 2 | {t2:.2f} | {t2 / n_cases:.2f} | {parallel['rss']:.0f} |")
    print(f"| speed-up | {speedup:.2f}x (target >= 1.6x: {'met' if speedup >= 1.6 else 'MISSED'}) | | |")


if __name__ == "__main__":
    main()
