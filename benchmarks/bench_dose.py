"""Benchmark the dose metrics (:mod:`medcycle.dose`, needs ``pip install "medcycle[dose]"``).

    python benchmarks/bench_dose.py            # the demo-sized head (about 3 minutes on 2 CPU cores)
    python benchmarks/bench_dose.py --quick    # the small phantom, checks that the script works
    python benchmarks/bench_dose.py --water    # the engine's sanity in water (about 2 minutes)

The head is case 0 of the built-in phantom (seed 0): ``full`` (192 x 224 x 64 voxels of
1 x 1 x 2.5 mm) resampled to 1 mm slices (linear) and padded with air to the demo size,
256 x 256 x 160 voxels at 1 mm; ``--quick`` takes the ``small`` case (64 x 75 x 32 voxels of
3 x 3 x 5 mm) as it is. The sCT is the CT with its bone (>= 250 HU) set to 40 HU, the worst
bulk-density error. Each modality runs in its own subprocess (the engine imported before timing):
plan on the CT (beams, dose influence, optimisation), recompute on the sCT, metrics (gamma
included). Peak memory is the subprocess's peak RSS (``VmHWM``). Target: photon + proton within
2 minutes on this 2-core CPU.

``--water``: the engine alone in a water tank (0 HU from 19 mm on, 2 mm voxels, gantry 0):
single proton spots of 100, 150 and 200 MeV (depth of the distal 80 % of the laterally
integrated depth dose, R80, against the CSDA range in water, NIST PSTAR) and a 10 x 10 cm photon
field (6 MV, isocentre at 81 mm depth: depth of the maximum and the central-axis depth dose).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEMO_SHAPE = (256, 256, 160)
CSDA_RANGE_MM = {100.0: 77.18, 150.0: 157.7, 200.0: 259.6}  # water, NIST PSTAR
WATER_SURFACE_MM = 19.0  # the first water voxel (index 10 of 2 mm voxels) starts here


def rss_mib() -> float:
    """Peak RSS of this process so far, in MiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def head(quick: bool) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The benchmark CT in HU, (X, Y, Z), and its voxel size."""
    from scipy import ndimage

    from medcycle.data.phantom import make_case

    case = make_case(0, 0, "small" if quick else "full")
    ct = case.ct.astype(np.float32)
    if quick:
        return ct, case.spacing
    ct = ndimage.zoom(ct, (1.0, 1.0, case.spacing[2]), order=1)[:, :, : DEMO_SHAPE[2]]
    pads = [((n - s) // 2, n - s - (n - s) // 2) for n, s in zip(DEMO_SHAPE, ct.shape)]
    return np.pad(ct, pads, constant_values=-1024.0), (1.0, 1.0, 1.0)


def run_one(modality: str, quick: bool) -> dict:
    """Time one modality in this process and return the row as a dict."""
    from medcycle import dose

    ct, spacing = head(quick)
    sct = np.where(ct >= 250.0, 40.0, ct).astype(np.float32)
    import pyRadPlan  # noqa: F401  (import time is not part of the figure)
    import pymedphys  # noqa: F401

    start, cpu_start = time.perf_counter(), time.process_time()
    result = dose.evaluate_dose(ct, sct, spacing, modality)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"modality": modality, "shape": list(ct.shape), "spacing": list(spacing), "seconds": total, "cpu": cpu,
            "plan_seconds": result.plan_seconds, "recompute_seconds": result.recompute_seconds,
            "metrics": result.metrics, "peak_mib": rss_mib(), "dose_grid": list(result.dose_ct.shape)}


def water() -> None:
    """Print the engine's proton ranges and photon depth dose in water (see the module docstring)."""
    import logging

    from pyRadPlan import IonPlan, PhotonPlan, calc_dose_influence, generate_stf

    from medcycle import dose

    logging.disable(logging.WARNING)
    spacing, shape = (2.0, 2.0, 2.0), (100, 170, 100)  # (X, Y, Z): the beam (gantry 0) runs along Y
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[:, 10:, :] = 0.0
    ct = dose._engine_ct(hu, spacing)
    depth = np.arange(shape[1]) * spacing[1] - WATER_SURFACE_MM

    def beam_dose(pln, target: np.ndarray) -> np.ndarray:
        cst = dose._structures(ct, target, hu > -500, spacing)
        with dose._quiet_engine():
            stf = generate_stf(ct, cst, pln)
            dij = calc_dose_influence(ct, cst, stf, pln)
        return dose._dose_array(dij, np.ones(dij.total_num_of_bixels))

    grid = {"resolution": {"x": 2.0, "y": 2.0, "z": 2.0}}
    print("| proton energy MeV | R80 mm | CSDA range mm | difference mm |")
    print("|---|---|---|---|")
    for energy, csda in CSDA_RANGE_MM.items():
        target = np.zeros(shape, dtype=bool)
        target[48:52, 60:64, 48:52] = True
        pln = IonPlan(radiation_mode="protons", machine="Generic")
        pln.prop_stf = {"generator": "ionSingleSpot", "fix_energy": energy, "gantry_angles": [0.0],
                        "couch_angles": [0.0]}
        pln.prop_dose_calc = {"engine": "HongPB", "dose_grid": grid}
        idd = beam_dose(pln, target).sum(axis=(0, 2))
        peak = int(np.argmax(idd))
        j = peak + int(np.flatnonzero(idd[peak:] < 0.8 * idd[peak])[0])
        r80 = depth[j - 1] + (depth[j] - depth[j - 1]) * (idd[j - 1] - 0.8 * idd[peak]) / (idd[j - 1] - idd[j])
        print(f"| {energy:g} | {r80:.1f} | {csda:.1f} | {r80 - csda:+.1f} |")
    target = np.zeros(shape, dtype=bool)
    target[25:75, 45:55, 25:75] = True  # 100 x 100 mm at the isocentre, 71-91 mm deep
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {"generator": "photonIMRT", "gantry_angles": [0.0], "couch_angles": [0.0], "bixel_width": 5.0}
    pln.prop_dose_calc = {"engine": "SVDPB", "dose_grid": grid}
    axis = beam_dose(pln, target)[49:51, :, 49:51].mean(axis=(0, 2))
    peak = int(np.argmax(axis))
    print(f"\nphoton 6 MV 10 x 10 cm: maximum at {depth[peak]:.0f} mm depth; depth dose (% of the maximum):")
    print("| depth mm | " + " | ".join(f"{depth[k]:.0f}" for k in range(20, shape[1], 10)) + " |")
    print("|---|" + "---|" * len(range(20, shape[1], 10)))
    print("| % | " + " | ".join(f"{100 * axis[k] / axis[peak]:.1f}" for k in range(20, shape[1], 10)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small phantom instead of the demo head")
    parser.add_argument("--modalities", default="photon,proton")
    parser.add_argument("--water", action="store_true", help="the engine's sanity in water instead")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one modality, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.quick)))
        return
    from medcycle import dose

    if not dose.available():
        sys.exit(f"bench_dose: {dose.unavailable_reason()}")
    if args.water:
        water()
        return
    import importlib.metadata as md

    engine = f"pyRadPlan {md.version('pyRadPlan')}"
    rows = []
    for modality in args.modalities.split(","):
        command = [sys.executable, __file__, "--one", modality] + (["--quick"] if args.quick else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    shape = "x".join(str(n) for n in rows[0]["shape"])
    spacing = "x".join(f"{s:g}" for s in rows[0]["spacing"])
    print(f"case {shape} voxels at {spacing} mm, dose grid 3 mm, sCT = CT with bone set to 40 HU\n")
    print("| case | engine | modality | plan s | recompute + metrics s | total s | CPU s | peak MiB "
          "| dose error % | gamma 2%/2mm % | target D98 diff % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = row["metrics"]
        print(f"| {shape} | {engine} | {row['modality']} | {row['plan_seconds']:.1f} "
              f"| {row['seconds'] - row['plan_seconds']:.1f} | {row['seconds']:.1f} | {row['cpu']:.1f} | {row['peak_mib']:.0f} "
              f"| {m['dose_error']:.2f} | {m['gamma_pass']:.1f} | {m['target_d98']:+.2f} |")
    print(f"\nall modalities: {sum(r['seconds'] for r in rows):.1f} s wall, {sum(r['cpu'] for r in rows):.1f} s CPU "
          f"(wall exceeds CPU when other processes share the cores)")


if __name__ == "__main__":
    main()
