"""Rigid registration: known motions applied to a real head CT and to phantoms, recovered; errors and times.

Each motion (up to 10 degrees about an oblique axis through the head's centre, up to 20 mm) moves
the CT, which is then resampled (scipy, cubic, an implementation independent of the one under test)
onto another grid: axis-aligned, another spacing, a 20 mm margin, plus independent noise (10 HU), as
a CT from another scanner would arrive. The fixed image is the original (the CT itself, or the
phantom's MR) without its first and last 15 mm of slices: the CT covers more than the fixed image,
as a planning CT does an MR (a resampled CT has an artificial edge where its field of view ended,
which a real CT has not). :func:`medcycle.registration.register_rigid` registers the moved CT onto
the fixed image; the error is the largest distance, over every voxel of the fixed image's head,
between where the found and the true transform send it, and the angle between their rotations.

    python benchmarks/real_scans.py fetch --out /work/realdata      # the real CT (Debian invesalius-examples)
    python benchmarks/bench_registration.py --ct /work/realdata/ct/invesalius_cranium.nii.gz

Without ``--ct`` only the phantom rows are measured (``--phantoms`` with no index: none). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medcycle.data.phantom import make_case
from medcycle.io import sitk_to_ras_affine
from medcycle.registration import register_rigid, transform_error
from medcycle.transforms import compute_body_mask

#: (rotation axis, degrees, translation mm): oblique axes, up to 10 degrees and 20 mm
MOTIONS = (
    ((1.0, 2.0, 3.0), 10.0, (12.0, -10.0, 12.0)),
    ((-2.0, 1.0, 0.5), 8.0, (-15.0, 5.0, -10.0)),
    ((0.3, -1.0, 2.0), 10.0, (5.0, 15.0, -12.0)),
    ((1.0, 0.0, 0.0), 5.0, (0.0, 0.0, 20.0)),
    ((0.0, 1.0, 1.0), 0.0, (20.0, 0.0, 0.0)),
)
NOISE_HU = 10.0
CROP_MM = 15.0  # the fixed image lacks this much at each end of its slices


def motion(centre: np.ndarray, axis: Sequence[float], degrees: float, shift: Sequence[float]) -> np.ndarray:
    """A rigid motion (RAS mm): `degrees` about `axis` through `centre`, then `shift`."""
    rotation = Rotation.from_rotvec(np.asarray(axis) / np.linalg.norm(axis) * np.radians(degrees)).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = np.asarray(centre) - rotation @ np.asarray(centre) + np.asarray(shift)
    return matrix


def moved_onto_another_grid(image: np.ndarray, affine: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                            background: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`image` moved by `truth`, on an axis-aligned grid of `spacing` covering its field of view + 20 mm, noisy."""
    corners = np.array([[i, j, k, 1.0] for i in (0, image.shape[0] - 1) for j in (0, image.shape[1] - 1)
                        for k in (0, image.shape[2] - 1)]) @ (truth @ affine).T
    low, high = corners[:, :3].min(axis=0) - 20.0, corners[:, :3].max(axis=0) + 20.0
    grid = np.diag([*spacing, 1.0])
    grid[:3, 3] = low
    shape = tuple(int(n) for n in np.ceil((high - low) / np.asarray(spacing)) + 1)
    index_map = np.linalg.inv(affine) @ np.linalg.inv(truth) @ grid  # moving voxel -> original voxel
    moved = ndimage.affine_transform(image.astype(np.float32), index_map[:3, :3], index_map[:3, 3],
                                     output_shape=shape, order=3, cval=background, output=np.float32)
    moved += np.random.default_rng(seed).normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    return moved, grid


def cropped(image: np.ndarray, affine: np.ndarray, millimetres: float) -> tuple[np.ndarray, np.ndarray]:
    """`image` without its first and last `millimetres` of slices (last axis), on the matching affine."""
    slices = int(np.rint(millimetres / np.linalg.norm(affine[:3, 2])))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ (0.0, 0.0, slices) + affine[:3, 3]
    return image[:, :, slices:image.shape[2] - slices], shifted


def measure(label: str, fixed: np.ndarray, ct: np.ndarray, affine: np.ndarray, body: np.ndarray,
            spacing: Sequence[float]) -> list[str]:
    """One table row per motion: `ct` moved onto another grid, registered onto `fixed` (cropped), on `affine`."""
    fixed, fixed_affine = cropped(fixed, affine, CROP_MM)
    fixed_body, _ = cropped(body, affine, CROP_MM)
    points = np.argwhere(fixed_body) @ fixed_affine[:3, :3].T + fixed_affine[:3, 3]
    centre = (np.argwhere(body) @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)
    rows = []
    for seed, (axis, degrees, shift) in enumerate(MOTIONS):
        truth = motion(centre, axis, degrees, shift)
        moved, grid = moved_onto_another_grid(ct, affine, truth, spacing, -1024.0, seed)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = register_rigid(fixed, fixed_affine, moved, grid, check=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        error_mm, error_deg = transform_error(result.matrix, truth, points)
        rows.append(f"| {label} | {degrees:g} deg about {tuple(axis)}, {np.linalg.norm(shift):.0f} mm "
                    f"| {moved.shape[0]}x{moved.shape[1]}x{moved.shape[2]} @ {'x'.join(f'{s:g}' for s in spacing)} "
                    f"| {error_mm:.2f} | {error_deg:.2f} | {result.dice:.3f} | {result.verdict} "
                    f"| {seconds:.1f} | {cpu_seconds:.1f} |")
        print(rows[-1], flush=True)
    return rows


def failures(ct: np.ndarray, affine: np.ndarray, other_head: np.ndarray, other_affine: np.ndarray) -> list[str]:
    """Rows for inputs that must be reported as failures: gross pose errors, a truncated CT, another head."""
    body = compute_body_mask(ct)
    centre = (np.argwhere(body) @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)
    top, top_affine = ct[:, :, -int(np.rint(25.0 / np.linalg.norm(affine[:3, 2]))):], affine.copy()
    top_affine[:3, 3] = affine[:3, :3] @ (0.0, 0.0, ct.shape[2] - top.shape[2]) + affine[:3, 3]
    cases = (
        ("on its side (90 deg about x)", ct, motion(centre, (1.0, 0.0, 0.0), 90.0, (0.0, 0.0, 0.0)) @ affine),
        ("facing backwards (180 deg about z: a header's flipped axes)", ct,
         motion(centre, (0.0, 0.0, 1.0), 180.0, (0.0, 0.0, 0.0)) @ affine),
        ("only its top 25 mm (truncated field of view)", top, top_affine),
    )
    rows = []
    for what, moving, moving_affine in cases:
        result = register_rigid(ct, affine, moving, moving_affine, check=False)
        rows.append(f"| real CT <- itself {what} | {result.rotation_deg:.1f} | {result.dice:.3f} | {result.coverage:.2f} "
                    f"| {result.verdict} |")
        print(rows[-1], flush=True)
    result = register_rigid(other_head, other_affine, ct, affine, check=False)
    rows.append(f"| phantom 0 MR <- real CT (another person) | {result.rotation_deg:.1f} | {result.dice:.3f} "
                f"| {result.coverage:.2f} | {result.verdict} |")
    print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, help="a real head CT (NIfTI, MHA or NRRD)")
    parser.add_argument("--phantoms", type=int, nargs="*", default=[0, 1], help="phantom cases (full size) to measure")
    args = parser.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    print("| fixed <- moving | known motion | moving grid | max error over the head (mm) | angle error (deg) "
          "| body Dice | verdict | seconds | CPU seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    if args.ct is not None:
        image = sitk.ReadImage(str(args.ct))
        ct = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)  # (X, Y, Z)
        affine = sitk_to_ras_affine(image)
        measure(f"real CT {args.ct.name} <- itself", ct, ct, affine, compute_body_mask(ct), (1.2, 1.2, 2.0))
    for index in args.phantoms:
        case = make_case(0, index, "full")  # 1 x 1 x 2.5 mm; case 1 has an oblique affine
        body = case.mask > 0
        measure(f"phantom {index} CT <- itself", case.ct, case.ct, case.affine, body, (1.2, 1.2, 3.0))
        measure(f"phantom {index} MR <- its CT", case.mr, case.ct, case.affine, body, (1.2, 1.2, 3.0))
    if args.ct is not None:
        other = make_case(0, 0, "full")
        print("\n| inputs that must fail | rotation found (deg) | body Dice | coverage | verdict |")
        print("|---|---|---|---|---|")
        failures(ct, affine, other.mr, other.affine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
