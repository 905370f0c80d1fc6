"""Benchmark `medcycle convert`: the fast path against a naive one-slice-at-a-time fp32 loop.

    python benchmarks/bench_convert.py            # full run (about 13 minutes on 2 CPU cores)
    python benchmarks/bench_convert.py --rounds 1 --slices-256 32   # about 3 minutes
    python benchmarks/bench_convert.py --quick    # small sizes, checks that the script works

For each model (random weights, written to a real checkpoint):

* ``256-px``: ResNet generator width 64, 9 blocks, tile 256, 1 mm, context 1;
* ``demo``: ``configs/demo_cpu.yaml`` when present (else tile 64, width 32, 6 blocks, context 3),

a 256 x 256 x 160 head-like MRI (1 mm) is converted end to end (read, preprocess, synthesize, back to
the input grid, write int16 NIfTI) in two ways, each in its own subprocess, alternating for
``--rounds`` rounds (this shared machine's speed drifts by 10-20 % between minutes, so a single pair
of runs can mislead), both with ``tta="none"`` (mirroring multiplies either's network time by four):

* ``fast``: :func:`medcycle.jobs.convert.run` as shipped (MONAI SliceInferer over the body's region, as
  training tiles are cut; batches of windows; on a CPU a bf16 copy of the generator where the CPU
  has native bf16 and the checkpoint asks for AMP; body-mask window skipping);
* ``naive``: the same pipeline with the inference replaced by the seed tutorial's loop: one axial
  slice at a time, fp32, batch 1, windows over the whole slice (a slice larger than the tile is run
  window by window with the same gaussian blending).

The two place their windows differently (on the body, as in training, against over the whole
slice), so besides them ``fp32``, the shipped pipeline with AMP off, runs once: the MAE of ``fast``
against it is the cost of bf16 alone (the target), against ``naive`` that plus the placement.
Reported: the median seconds of ``run()`` over the rounds, the speed-up as the median of the
per-round ratios, peak RSS of the subprocesses, and the MAE in HU between the sCTs inside the body
(and over the whole volume against fp32). ``--slices-256 N`` times the 256-px model on the middle N slices only and
scales the times to 160 slices (the table says so; fixed costs such as loading the model are then
scaled too, which understates the speed-up). Finally the peak RSS of converting a
512 x 512 x 300 volume is measured in a subprocess with the 256-px model; its body fills only
``--band`` slices, so only those windows run: the full-size arrays (which set the peak) are all
exercised without spending an hour of CPU on inference.

Ensembles: the demo model converts the (partial) volume as users run it by default (``tta="mirror"``),
once alone and once as an ensemble of three (two more random generators) with ``uncertainty`` (the
standard deviation over members and mirrorings); the table gives the cost of the ensemble against
one model, each measured once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

GiB = 1024**3


# --------------------------------------------------------------------------------------------------
# data and models


def head_mr(shape: tuple[int, int, int], band: tuple[int, int] | None = None, seed: int = 0) -> np.ndarray:
    """A T1-like head: scalp, dark skull, grey/white matter, ventricles, noise; air elsewhere."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    gx, gy = np.meshgrid(np.linspace(-1, 1, x, dtype=np.float32), np.linspace(-1, 1, y, dtype=np.float32), indexing="ij")
    mr = np.zeros(shape, dtype=np.float32)
    lo, hi = band if band else (0, z)
    for k in range(lo, hi):
        t = (k - lo) / max(1, hi - lo - 1) * 2 - 1  # -1 .. 1 along the head
        scale = float(np.sqrt(max(0.0, 1.0 - (0.85 * t) ** 2)))
        if scale <= 0.05:
            continue
        r = np.sqrt((gx / (0.78 * scale)) ** 2 + (gy / (0.9 * scale)) ** 2)
        sl = np.zeros((x, y), dtype=np.float32)
        sl[r < 1.0] = 350.0  # scalp / fat
        sl[r < 0.93] = 40.0  # skull: dark on T1
        sl[r < 0.85] = 600.0  # grey matter
        sl[(r < 0.6) & ((gx * 3 + gy * 2) % 0.5 > 0.2)] = 800.0  # white matter texture
        sl[(np.abs(gx) < 0.12 * scale) & (np.abs(gy) < 0.3 * scale) & (r < 0.5)] = 120.0  # ventricles
        mr[:, :, k] = sl
    for k in range(lo, hi):  # noise only where the head is: slices outside a band stay exactly 0 (air)
        sl = mr[:, :, k]
        body = sl > 0
        sl += rng.normal(0.0, 8.0, size=sl.shape).astype(np.float32)
        sl[~body] = np.abs(rng.normal(0.0, 4.0, size=int((~body).sum()))).astype(np.float32)
    return mr


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(array.shape) * np.array(spacing) / 2
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def make_checkpoint(path: Path, data: dict, model: dict, amp: str = "auto", seed: int = 0) -> Path:
    import torch

    from medcycle.checkpoint import save_checkpoint
    from medcycle.config import Config, config_hash
    from medcycle.networks import build_generator

    config = Config.from_dict({"data": data, "model": model, "train": {"amp": amp}}).validate()
    torch.manual_seed(seed)
    generator = build_generator(config.data.context_slices, config.model.gen_width, config.model.gen_blocks)
    save_checkpoint(path, {
        "config": config.to_dict(),
        "preprocessing": {"data_config": config.to_dict()["data"], "data_config_hash": config_hash(config.data)},
        "iteration": 0,
        "nets": {"G_mr2ct": generator.state_dict()},
    })
    return path


def demo_settings() -> tuple[dict, dict, str, str]:
    """(data, model, amp, source) of configs/demo_cpu.yaml, or the documented demo defaults."""
    path = ROOT / "configs" / "demo_cpu.yaml"
    if path.is_file():
        from medcycle.config import load_config

        config = load_config(path).to_dict()
        return config["data"], config["model"], config["train"]["amp"], str(path.relative_to(ROOT))
    data = {"tile_size": 64, "context_slices": 3, "spacing": [1.0, 1.0]}
    model = {"gen_width": 32, "gen_blocks": 6}
    return data, model, "auto", "built-in (configs/demo_cpu.yaml absent)"


def fit_generator(source: Path, target: Path, mr: np.ndarray, seconds: float, seed: int = 0) -> tuple[Path, int]:
    """Fit the checkpoint's generator for `seconds` (paired L1, bf16) to a CT-like map of the phantom.

    Random weights amplify tiny perturbations (bf16 rounding) far more than trained weights do, so
    the MAE of bf16 against fp32 is also reported for a briefly fitted generator.
    """
    import torch

    from medcycle.checkpoint import load_checkpoint, save_checkpoint
    from medcycle.config import Config
    from medcycle.networks import build_generator

    state = load_checkpoint(source)
    config = Config.from_dict(state["config"])
    k, tile = config.data.context_slices, config.data.tile_size
    generator = build_generator(k, config.model.gen_width, config.model.gen_blocks)
    generator.load_state_dict(state["nets"]["G_mr2ct"])
    lo, hi = config.data.ct_window
    ct = np.where(mr < 20, -1000.0, np.where(mr < 80, 1200.0, np.where(mr < 200, 10.0, 40.0)))
    ct_norm = torch.from_numpy((2 * (np.clip(ct, lo, hi) - lo) / (hi - lo) - 1).astype(np.float32))
    mr_norm = torch.from_numpy(np.clip(mr / 800.0 * 2 - 1, -1, 1).astype(np.float32))
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999))
    x_size, y_size, z_size = mr.shape
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        xs, ys = [], []
        for _ in range(max(1, 8 * 64 * 64 // (tile * tile))):
            z = int(rng.integers(k // 2, z_size - k // 2))
            i, j = int(rng.integers(0, x_size - tile + 1)), int(rng.integers(0, y_size - tile + 1))
            xs.append(mr_norm[i:i + tile, j:j + tile, z - k // 2:z + k // 2 + 1].permute(2, 0, 1))
            ys.append(ct_norm[i:i + tile, j:j + tile, z - k // 2:z + k // 2 + 1].permute(2, 0, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (generator(torch.stack(xs)).float() - torch.stack(ys)).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    state["nets"]["G_mr2ct"] = generator.state_dict()
    save_checkpoint(target, {k_: v for k_, v in state.items() if k_ not in ("format", "version")})
    return target, steps


# --------------------------------------------------------------------------------------------------
# the naive loop (the seed tutorial's way)


def naive_synthesize(generator, mr_norm, tile, k, mask=None, tta="none", runtime=None, keep_mirrorings=False):
    """One axial slice at a time, fp32, batch 1, contiguous NCHW; same windows and blending."""
    if keep_mirrorings:
        raise ValueError("the naive loop times single-model conversion only")
    import torch
    from monai.inferers import sliding_window_inference

    from medcycle.inferers import context_stack

    centre = k // 2
    volume = mr_norm.as_tensor() if hasattr(mr_norm, "as_tensor") else torch.as_tensor(mr_norm)
    volume = volume.float().cpu()
    generator = generator.to(memory_format=torch.contiguous_format).float().eval()
    out = torch.empty_like(volume)
    with torch.no_grad():
        for z in range(volume.shape[-1]):
            slice_k = context_stack(volume, k, z, z + 1)[..., 0]  # (1, k, X, Y)
            result = sliding_window_inference(
                slice_k, (tile, tile), 1, lambda x: generator(x)[:, centre:centre + 1],
                overlap=0.25, mode="gaussian", padding_mode="constant", cval=-1.0,
            )
            out[0, :, :, z] = result[0, 0]
    return out.clamp_(-1, 1)


# --------------------------------------------------------------------------------------------------
# child process: one conversion, timed, with its peak RSS


def amp_off(synthesize):
    """`synthesize` with the checkpoint's AMP setting replaced by none."""
    import dataclasses

    def fp32_synthesize(*args, runtime=None, **kwargs):
        return synthesize(*args, runtime=dataclasses.replace(runtime, amp="none"), **kwargs)

    return fp32_synthesize


def child(args: argparse.Namespace) -> None:
    import torch

    import medcycle.inferers as inferers
    import medcycle.jobs.convert as convert

    torch.set_num_threads(args.threads)
    if args.child == "naive":
        inferers.synthesize = naive_synthesize
    elif args.child == "fp32":
        inferers.synthesize = amp_off(inferers.synthesize)
    ensemble = args.child in ("one", "ensemble")  # as users run it: mirroring on
    uncertainty = str(Path(args.output).with_name("sd.nii.gz")) if args.child == "ensemble" else None
    started = time.perf_counter()
    convert.run(args.input, args.output, args.model, overwrite=True, batch_size=args.batch_size, device="cpu",
                tta="mirror" if ensemble else "none", uncertainty=uncertainty)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def run_child(mode: str, model: Path | list[Path], volume: Path, output: Path, threads: int, batch_size: int) -> dict:
    models = model if isinstance(model, list) else [model]
    command = [sys.executable, __file__, "--child", mode, *(a for m in models for a in ("--model", str(m))),
               "--input", str(volume), "--output", str(output), "--threads", str(threads), "--batch-size", str(batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} conversion failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["process_seconds"] = time.perf_counter() - started
    return record


def rounds_of(rounds: int, model: Path, volume: Path, tmp: Path, threads: int, batch_size: int) -> tuple[dict, dict]:
    """`rounds` alternating fast/naive conversions (the order flips each round); median seconds, max peak RSS.

    ``fast["ratios"]`` holds each round's naive / fast seconds; ``fast["speedup"]`` their median.
    """
    runs: dict[str, list[dict]] = {"fast": [], "naive": []}
    for r in range(max(1, rounds)):
        for mode in (("fast", "naive") if r % 2 == 0 else ("naive", "fast")):
            runs[mode].append(run_child(mode, model, volume, tmp / f"{mode}.nii.gz", threads, batch_size))
    ratios = [n["seconds"] / f["seconds"] for f, n in zip(runs["fast"], runs["naive"])]

    def summary(records: list[dict]) -> dict:
        return {"seconds": float(np.median([x["seconds"] for x in records])), "peak_rss": max(x["peak_rss"] for x in records)}

    return {**summary(runs["fast"]), "ratios": ratios, "speedup": float(np.median(ratios))}, summary(runs["naive"])


def mae(a: Path, b: Path, body: np.ndarray) -> tuple[float, float]:
    import nibabel as nib

    x = np.asanyarray(nib.load(str(a)).dataobj).astype(np.float32)
    y = np.asanyarray(nib.load(str(b)).dataobj).astype(np.float32)
    diff = np.abs(x - y)
    return float(diff[body].mean()), float(diff.mean())


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script in seconds")
    parser.add_argument("--slices-256", type=int, default=160, help="slices the 256-px model is timed on (default: all 160)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating fast/naive rounds per model (default 3)")
    parser.add_argument("--band", type=int, default=8, help="body slices of the 512 x 512 x 300 volume (default 8)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fit-seconds", type=float, default=60.0,
                        help="also fit the demo generator this long and report its bf16-vs-fp32 MAE (0: skip)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 512 x 512 x 300 memory measurement")
    parser.add_argument("--child", choices=("fast", "naive", "fp32", "one", "ensemble"), help=argparse.SUPPRESS)
    parser.add_argument("--model", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from medcycle.engine.amp import autocast_dtype

    if args.quick:
        args.fit_seconds = min(args.fit_seconds, 5.0)
    size, slices = ((128, 128, 24), 8) if args.quick else ((256, 256, 160), min(args.slices_256, 160))
    large = (128, 128, 60) if args.quick else (512, 512, 300)
    demo_data, demo_model, demo_amp, demo_source = demo_settings()
    big_data = {"tile_size": 96 if args.quick else 256, "context_slices": 1, "spacing": [1.0, 1.0]}
    big_model = {"gen_width": 64, "gen_blocks": 9}
    dtype = autocast_dtype("auto", "cpu")
    print(f"medcycle convert benchmark: torch {torch.__version__}, {args.threads} threads, CPU bf16 autocast: "
          f"{'yes' if dtype == torch.bfloat16 else 'no'}; demo config: {demo_source}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        tmp = Path(tmp)
        mr = head_mr(size)
        body_full = mr > 20
        full_path = write_volume(tmp / "mr_full.nii.gz", mr)
        z0 = (size[2] - slices) // 2
        part_path = write_volume(tmp / "mr_part.nii.gz", np.ascontiguousarray(mr[:, :, z0:z0 + slices]))
        body_part = body_full[:, :, z0:z0 + slices]

        models = [
            ("256-px (w64, 9 blocks, tile %d)" % big_data["tile_size"], make_checkpoint(tmp / "big.pt", big_data, big_model), part_path, body_part, slices),
            ("demo (w%d, %d blocks, tile %d, ctx %d)" % (demo_model["gen_width"], demo_model["gen_blocks"], demo_data["tile_size"], demo_data["context_slices"]),
             make_checkpoint(tmp / "demo.pt", demo_data, {**demo_model}, amp=demo_amp), full_path, body_full, size[2]),
        ]
        def measure(model: Path, volume: Path, body: np.ndarray, rounds: int) -> tuple[dict, dict, dict, tuple]:
            fast, naive = rounds_of(rounds, model, volume, tmp, args.threads, args.batch_size)
            fp32 = run_child("fp32", model, volume, tmp / "fp32.nii.gz", args.threads, args.batch_size)
            maes = (*mae(tmp / "fast.nii.gz", tmp / "fp32.nii.gz", body), mae(tmp / "fast.nii.gz", tmp / "naive.nii.gz", body)[0])
            return fast, naive, fp32, maes

        for label, model, volume, body, measured in models:
            fast, naive, fp32, maes = measure(model, volume, body, args.rounds)
            scale = size[2] / measured
            rows.append((label, measured, scale, fast, naive, fp32, maes))
            print(f"  measured {label}: fast {fast['seconds']:.1f}s, naive {naive['seconds']:.1f}s, fp32 {fp32['seconds']:.1f}s "
                  f"on {measured} slices (medians of {args.rounds}; per-round speed-ups "
                  f"{', '.join(f'{r:.2f}' for r in fast['ratios'])})", flush=True)

        fitted_row = None
        if args.fit_seconds > 0:
            fitted, steps = fit_generator(models[1][1], tmp / "demo_fitted.pt", mr, args.fit_seconds)
            fitted_row = (steps, slices, *measure(fitted, part_path, body_part, 1))
            print(f"  measured fitted demo model ({steps} steps): MAE {fitted_row[-1][0]:.2f} HU in the body against fp32", flush=True)

        members = [models[1][1], *(make_checkpoint(tmp / f"demo_{seed}.pt", demo_data, demo_model, amp=demo_amp, seed=seed)
                                    for seed in (1, 2))]
        one = run_child("one", members[0], part_path, tmp / "one.nii.gz", args.threads, args.batch_size)
        three = run_child("ensemble", members, part_path, tmp / "ensemble.nii.gz", args.threads, args.batch_size)
        print(f"  measured ensemble: one model {one['seconds']:.1f}s, 3 + uncertainty {three['seconds']:.1f}s", flush=True)

        large_row = None
        if not args.skip_large:
            band = (large[2] // 2 - args.band // 2, large[2] // 2 + args.band // 2)
            big = head_mr(large, band=band)
            large_path = write_volume(tmp / "mr_large.nii", big)
            del big
            large_row = run_child("fast", models[0][1], large_path, tmp / "large_sct.nii.gz", args.threads, args.batch_size)

    shape = "x".join(map(str, size))
    print(f"\nconvert {shape} MRI (1 mm), end to end (read -> sCT NIfTI), {args.threads} CPU threads")
    print("| model | slices timed | naive fp32 s | fast s | speed-up | medcycle fp32 s | naive peak RSS | fast peak RSS "
          "| MAE vs fp32, body HU | MAE vs fp32, all HU | MAE vs naive, body HU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fitted_rows = []
    if fitted_row:
        steps, measured, fast, naive, fp32, maes = fitted_row
        fast = {**fast, "speedup": naive["seconds"] / fast["seconds"]}
        fitted_rows.append((f"demo, fitted {args.fit_seconds:g} s ({steps} steps, paired L1 on the phantom)", measured, None,
                            fast, naive, fp32, maes))
    for label, measured, scale, fast, naive, fp32, maes in rows + fitted_rows:
        if scale is None:
            slices_note, scale = f"{measured} (MAE only)", 1.0
        else:
            slices_note = f"{size[2]}" + ("" if scale == 1 else f" (x{scale:g} from {measured})")
        print(f"| {label} | {slices_note} | {naive['seconds'] * scale:.1f} | {fast['seconds'] * scale:.1f} | "
              f"{fast['speedup']:.2f}x | {fp32['seconds'] * scale:.1f} | {naive['peak_rss'] / GiB:.2f} GiB | "
              f"{fast['peak_rss'] / GiB:.2f} GiB | {maes[0]:.2f} | {maes[1]:.2f} | {maes[2]:.2f} |")
    print(f"\nensemble: demo model, {size[0]}x{size[1]}x{slices} MRI, tta mirror, end to end, {args.threads} CPU threads")
    print("| models | seconds | cost against one model | peak RSS |")
    print("|---|---|---|---|")
    for label, record in (("one model", one), ("ensemble of 3 + uncertainty", three)):
        print(f"| {label} | {record['seconds']:.1f} | {record['seconds'] / one['seconds']:.2f}x | "
              f"{record['peak_rss'] / GiB:.2f} GiB |")
    if large_row:
        print(f"\n{'x'.join(map(str, large))} volume, 256-px model, fast path: peak RSS {large_row['peak_rss'] / GiB:.2f} GiB "
              f"(target < 4 GiB), {large_row['seconds']:.1f}s with body in {args.band} slices")
    print("targets: MAE < 5 HU against fp32, speed-up >= 2x, 512x512x300 peak < 4 GiB")


if __name__ == "__main__":
    main()
