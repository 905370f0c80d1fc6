"""Figures on real anatomy: sCTs of the held-out Colin27 T1 against the CT head template (issue 21).

    python benchmarks/real_anatomy.py --data DATA --sct "real heads=SCT.nii.gz" --sct "phantom=SCT2.nii.gz" --out DIR \
        [--real-ct DATA/ct/invesalius_cranium.nii.gz]

No registered MR/CT pair of one person ships in a registry, so the figures are comparative: Colin27
(one subject's T1) and the CT head template (an average of many head CTs, in HU after
``real_scans.py fetch``) both lie in MNI space, close enough to compare two models, not for an
absolute error. DATA is the layout of ``benchmarks/real_scans.py fetch``. Per sCT (on Colin27's grid,
as ``medcycle convert`` writes it):

* MAE inside the head: mean |sCT - template| over the template's body (> -500 HU, holes filled);
* bone Dice: sCT >= 300 HU against template >= 300 HU; and the same above MNI z = -11 mm (the cranium,
  above the orbits' floor): below it the template, an average of heads aligned on the brain, blurs the
  thin bones of the face and skull base under 300 HU, so that part measures the template as much as the sCT;
  the same below that level (the face and skull base), and the sCT's bone volume (>= 300 HU in the head);
* the brain: the skull-stripped MNI152 template's non-zero voxels, eroded by 5 mm: the median sCT
  there (grey/white matter are 20-40 HU) and the share of its voxels >= 300 HU (CSF is not bone).

With ``--real-ct``, a real head CT of another person is scored in the same way as a row of its own: its
body (medcycle's mask: no head holder), affinely registered onto the template (SimpleITK, mutual
information) as Colin27 was placed in MNI space, is what a perfect sCT of a head other than the
template's average would score, the figures' ceiling (the template's skull, blurred by averaging, is
thinner at 300 HU than any one skull).

The template (2 mm) and the brain (1 mm) are resampled onto Colin27's grid (linear, nearest) through
their affines. Writes DIR/figures.md (the table), DIR/figures.json and DIR/sct.png (three planes of
Colin27, the template and each sCT).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BONE_HU = 300.0
BODY_HU = -500.0
BRAIN_EROSION_MM = 5.0
CRANIUM_Z_MM = -11.0


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)


def resample_onto(values: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                  order: int, cval: float) -> np.ndarray:
    """`values` (on `affine`) sampled at every voxel of the grid (`shape`, `target_affine`), through world space."""
    from scipy import ndimage

    index = np.indices(tuple(shape), dtype=np.float64).reshape(3, -1)
    world = target_affine[:3, :3] @ index + target_affine[:3, 3:4]
    source = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])
    out = ndimage.map_coordinates(values, source, order=order, mode="constant", cval=cval)
    return out.reshape(tuple(shape)).astype(np.float32)


def references(data: Path) -> dict:
    """Colin27's grid with the template (HU), the head and the eroded brain on it."""
    from scipy import ndimage

    sys.path.insert(0, str(ROOT))
    from medcycle.transforms.body_mask import compute_body_mask

    colin, colin_affine = load(data / "heldout" / "colin27_t1.nii.gz")
    template, template_affine = load(data / "reference" / "ct_template_hu.nii.gz")
    brain, brain_affine = load(data / "reference" / "mni152_brain.nii.gz")
    spacing = np.linalg.norm(colin_affine[:3, :3], axis=0)
    template = resample_onto(template, template_affine, colin.shape, colin_affine, order=1, cval=-1024.0)
    head = compute_body_mask(template, threshold=BODY_HU, spacing=spacing)
    brain = resample_onto((brain > 0).astype(np.float32), brain_affine, colin.shape, colin_affine, order=0, cval=0.0) > 0
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    index = np.indices(colin.shape, dtype=np.float32).reshape(3, -1)
    world_z = (colin_affine[2, :3] @ index + colin_affine[2, 3]).reshape(colin.shape)
    return {"colin": colin, "affine": colin_affine, "spacing": spacing, "template": template, "head": head,
            "brain": depth > BRAIN_EROSION_MM, "cranium": head & (world_z >= CRANIUM_Z_MM)}


def register_onto_template(ct_path: Path, template_path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The body of a head CT (HU, air outside it) affinely registered onto the template.

    Returns the CT resampled onto the template's grid (NIfTI voxel order; NaN where its field of view
    does not reach), the template's affine and the registration's final mutual-information metric
    (more negative: better). Both images are clipped to -1024..2000 HU for the metric; moments
    initialise the centre, three levels (4, 2, 1) refine, run to convergence (a registration stopped
    early scored the real head CT 0.05 lower).
    """
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT))
    from medcycle.transforms.body_mask import compute_body_mask

    moving = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(moving)  # (Z, Y, X): the body mask's axial axis is its first here
    body = compute_body_mask(values.transpose(2, 1, 0), threshold=BODY_HU, spacing=moving.GetSpacing())
    body_image = sitk.GetImageFromArray(np.where(body.transpose(2, 1, 0), values, -1024.0).astype(np.float32))
    body_image.CopyInformation(moving)
    fixed = sitk.ReadImage(str(template_path), sitk.sitkFloat32)
    clip = [sitk.Clamp(image, sitk.sitkFloat32, -1024.0, 2000.0) for image in (fixed, body_image)]
    initial = sitk.CenteredTransformInitializer(*clip, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(48)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 1000)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(*clip)
    warped = sitk.Resample(body_image, fixed, transform, sitk.sitkLinear, float("nan"))
    _, template_affine = load(template_path)
    return sitk.GetArrayFromImage(warped).transpose(2, 1, 0), template_affine, float(method.GetMetricValue())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def figures(sct: np.ndarray, ref: dict) -> dict:
    head, brain, cranium, template = ref["head"], ref["brain"], ref["cranium"], ref["template"]
    voxel_cm3 = float(np.prod(ref["spacing"])) / 1000.0
    bone_sct, bone_ref = (sct >= BONE_HU) & head, (template >= BONE_HU) & head
    inside = sct[brain]
    return {
        "mae_head_hu": float(np.abs(sct[head] - template[head]).mean()),
        "bone_dice": dice(bone_sct, bone_ref),
        "cranial_bone_dice": dice(bone_sct & cranium, bone_ref & cranium),
        "face_bone_dice": dice(bone_sct & ~cranium, bone_ref & ~cranium),
        "bone_cm3": float(bone_sct.sum() * voxel_cm3),
        "brain_median_hu": float(np.median(inside)),
        "brain_bone_percent": 100.0 * float((inside >= BONE_HU).mean()),
        "head_voxels": int(head.sum()),
        "brain_voxels": int(brain.sum()),
    }


def picture(path: Path, ref: dict, volumes: dict) -> None:
    """Rows: Colin27 T1, the template, each volume (label -> HU on Colin27's grid); columns: axial, coronal,
    sagittal through the brain's centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cx, cy, cz = (int(v) for v in np.round(np.argwhere(ref["brain"]).mean(axis=0)))
    rows = [("Colin27 T1 (held out)", ref["colin"], None), ("CT template (HU)", ref["template"], (-200, 1000))]
    rows += [(label, values, (-200, 1000)) for label, values in volumes.items()]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.5 * len(rows)), squeeze=False)
    for row, (label, volume, window) in enumerate(rows):
        low, high = window or tuple(np.percentile(volume[volume > 0], [1, 99.5]))
        planes = (volume[:, :, cz].T, volume[:, cy, :].T, volume[cx, :, :].T)
        for col, (plane, name) in enumerate(zip(planes, ("axial", "coronal", "sagittal"))):
            ax = axes[row, col]
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
        axes[row, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"Colin27 (held out) and its sCTs against the CT head template; window -200..1000 HU; "
                 f"slices x={cx} y={cy} z={cz}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", type=Path, required=True, help="the layout of benchmarks/real_scans.py fetch")
    parser.add_argument("--sct", action="append", required=True, metavar="NAME=PATH",
                        help="an sCT of DATA/heldout/colin27_t1.nii.gz on its grid (repeat to compare models)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--real-ct", type=Path, metavar="CT",
                        help="also score a real head CT of another person, affinely registered onto the template "
                             "(the figures' ceiling), e.g. DATA/ct/invesalius_cranium.nii.gz")
    args = parser.parse_args(argv)
    if args.real_ct is not None and not args.real_ct.is_file():
        print(f"real_anatomy: error: {args.real_ct}: no such file", file=sys.stderr)
        return 1
    ref = references(args.data)
    volumes, rows = {}, {}
    for item in args.sct:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--sct {item}: expected NAME=PATH")
        values, affine = load(Path(path))
        if values.shape != ref["colin"].shape or not np.allclose(affine, ref["affine"], atol=1e-4):
            print(f"real_anatomy: error: {path}: not on Colin27's grid", file=sys.stderr)
            return 1
        volumes[f"sCT: {name}"], rows[name] = values, figures(values, ref)
    if args.real_ct is not None:
        try:
            warped, template_affine, metric = register_onto_template(args.real_ct,
                                                                     args.data / "reference" / "ct_template_hu.nii.gz")
        except RuntimeError as error:  # SimpleITK: an unreadable file, or a registration that cannot start
            print(f"real_anatomy: error: {args.real_ct}: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        values = resample_onto(warped, template_affine, ref["colin"].shape, ref["affine"], order=1, cval=np.nan)
        covered = 100.0 * float(np.isfinite(values[ref["head"]]).mean())
        if covered < 99.0:
            print(f"real_anatomy: warning: {args.real_ct}: its field of view covers {covered:.1f} % of the head: "
                  "the rest counts as air", file=sys.stderr)
        name = f"real CT {args.real_ct.name.split('.')[0]} (registered)"
        volumes[name] = values = np.nan_to_num(values, nan=-1024.0)  # not an sCT: no prefix
        rows[name] = figures(values, ref) | {"registration_mattes_mi": metric, "head_covered_percent": covered}
    lines = ["| model | MAE in the head (HU) | bone Dice (>= 300 HU) | cranial bone Dice (z >= -11 mm) | "
             "face bone Dice (below) | bone in the head (cm3) | median sCT in the brain (HU) | "
             "brain voxels >= 300 HU (%) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['mae_head_hu']:.0f} | {r['bone_dice']:.3f} | {r['cranial_bone_dice']:.3f} | "
              f"{r['face_bone_dice']:.3f} | {r['bone_cm3']:.0f} | {r['brain_median_hu']:.0f} | "
              f"{r['brain_bone_percent']:.1f} |" for name, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    head_cm3 = ref["head"].sum() * float(np.prod(ref["spacing"])) / 1000.0
    brain_cm3 = ref["brain"].sum() * float(np.prod(ref["spacing"])) / 1000.0
    write_atomic(args.out / "figures.md", f"{table}\n\nhead {head_cm3:.0f} cm3, brain (eroded {BRAIN_EROSION_MM:g} mm) "
                 f"{brain_cm3:.0f} cm3; targets: median in the brain 15-50 HU, < 1 % of it >= 300 HU, bone Dice >= 0.5\n")
    write_atomic(args.out / "figures.json", json.dumps({"date": datetime.date.today().isoformat(), "models": rows,
                                                         "scts": {n: p.partition("=")[2] for n, p in zip(rows, args.sct)},
                                                         "real_ct": None if args.real_ct is None else str(args.real_ct)},
                                                        indent=1) + "\n")
    picture(args.out / "sct.png", ref, volumes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
