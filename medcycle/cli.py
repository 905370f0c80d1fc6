"""The ``medcycle`` command line: one sub-command per job, each a thin layer over ``medcycle.jobs``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional, Sequence

from medcycle import __version__
from medcycle.device import DEVICE_HELP
from medcycle.errors import MedcycleError

EXAMPLES = {
    "phantom": "medcycle phantom --out data --cases 8 --size full\n"
    "  medcycle phantom --out data --cases 8 --from-ct head_ct.nii.gz   # + a pair on a real head's anatomy",
    "preprocess": "medcycle preprocess --data data --out cache --config configs/demo_cpu.yaml --workers 2\n"
    "  medcycle preprocess --mr-dir mr/ --ct-dir ct/ --out cache",
    "train": "medcycle train --config configs/demo_cpu.yaml --data cache --out run --max-iters 2000\n"
    "  medcycle train --config configs/demo_cpu.yaml --data cache --out run --resume\n"
    "  torchrun --nproc_per_node=2 -m medcycle train --config configs/demo_cpu.yaml --data cache --out run",
    "convert": "medcycle convert -i mr.nii.gz -o sct.nii.gz --model run\n"
    "  medcycle convert -i patients/ -o sct/ --model run/best.pt --dicom-out sct_dicom/\n"
    "  medcycle convert -i mr.nii.gz -o sct.nii.gz -m model_a -m model_b -m model_c --uncertainty sd.nii.gz",
    "export": "medcycle export run --out model          # model/: configs/, models/model.safetensors, model.onnx",
    "evaluate": "medcycle evaluate --pred sct.nii.gz --ref ct.nii.gz --mask mask.nii.gz --out report\n"
    "  medcycle evaluate --pred sct/ --ref data/ --out report --window synthrad2025 --dose both",
    "demo": "medcycle demo                  # phantom -> preprocess -> train 15 min -> convert -> evaluate\n"
    "  medcycle demo --minutes 3 --out demo_quick",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line, like every other medcycle error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="example:\n  " + EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or step lines: only warnings, errors and the final summary line")
    return parser


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults when omitted")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = _Parser(
        prog="medcycle",
        description="MRI to synthetic CT in Hounsfield units with an unpaired CycleGAN built on MONAI.",
        epilog="examples:\n  " + "\n  ".join(e.splitlines()[0] for e in EXAMPLES.values())
        + "\n\nRun 'medcycle COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medcycle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _add(sub, "phantom", "write synthetic paired MR/CT head cases in the SynthRAD2023 layout")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (one sub-folder per case)")
    p.add_argument("--cases", type=int, metavar="N", help="number of phantom cases (default 8; 0 with --from-ct)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; same seed, same data (default 0)")
    p.add_argument("--size", choices=("small", "full"), default="full",
                   help="full: 192x224x64 voxels of 1x1x2.5 mm (the whole head); small: 64x75x32 of 3x3x5 mm, for tests "
                        "(default full)")
    p.add_argument("--from-ct", nargs="+", default=[], metavar="CT",
                   help="also a pair on real anatomy per real head CT (file, DICOM series or a folder of them): "
                        "OUT/pair_<name>/ holds the CT (body only) and a T1w MR rendered from its tissues")

    p = _add(sub, "preprocess", "turn MR/CT volumes into a cache of normalised 2D tiles for training")
    p.add_argument("--data", metavar="DIR", help="SynthRAD layout: DIR/<case>/mr.*, optional ct.*, mask.*")
    p.add_argument("--mr-dir", metavar="DIR", help="unpaired layout: a folder of MR volumes")
    p.add_argument("--ct-dir", metavar="DIR", help="unpaired layout: a folder of CT volumes")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder (re-runs skip finished cases)")
    _add_config(p)
    p.add_argument("--workers", type=int, default=1, metavar="N", help="cases processed in parallel (default 1)")
    p.add_argument("--register", choices=("none", "rigid"), default="none",
                   help="rigid: register each paired case's CT that lies on another grid onto its MR (mutual "
                        "information) and record the transform; none (default): such a case is refused")

    p = _add(sub, "train", "train the MR<->CT CycleGAN on a preprocessed cache")
    _add_config(p)
    p.add_argument("--data", required=True, metavar="CACHE", help="cache folder written by 'medcycle preprocess'")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder: checkpoints, logs, images")
    p.add_argument("--max-iters", type=int, metavar="N", help="stop after N iterations (overrides train.iterations)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt exactly where it stopped")
    _add_device(p)

    p = _add(sub, "convert", "convert an MRI volume (or a folder of them) to a synthetic CT in HU")
    p.add_argument("-i", "--input", required=True, metavar="INPUT", help="NIfTI/MHA/NRRD file, DICOM-series folder, or a folder of cases")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output .nii.gz (or folder in folder mode)")
    p.add_argument("-m", "--model", required=True, action="append", metavar="MODEL",
                   help="exported model folder ('medcycle export'), run folder (uses best.pt, else last.pt) or a .pt "
                        "file; repeat for an ensemble (the mean of the members' sCTs in HU)")
    p.add_argument("--uncertainty", metavar="PATH", help="also write the voxel-wise standard deviation in HU over the "
                   "--model members and test-time mirrorings (float32 .nii.gz on the sCT's grid): a file for one "
                   "input, a folder (one <case>_sd.nii.gz per case) for a folder of cases")
    p.add_argument("--mask", metavar="MASK", help="body mask; computed from the MR when omitted")
    p.add_argument("--no-mask", action="store_true", help="keep the model's values outside the body (default: -1000 HU)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="slices per forward pass (default 8)")
    _add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--dicom-out", metavar="DIR", help="also write the sCT as a CT DICOM series")
    p.add_argument("--dicom-ref", metavar="MR_SERIES", help="with --dicom-out: the patient's MR (DICOM folder or file) "
                   "giving patient, study and frame of reference (default: the input when it is a DICOM series)")
    p.add_argument("--rtstruct", action="store_true", help="with --dicom-out: also write the body contour as an RT "
                   "Structure Set (RS_BODY.dcm in the series folder)")
    p.add_argument("--allow-other-anatomy", action="store_true",
                   help="convert a scan that is not a head (e.g. a chest) with a model trained on heads only; refused "
                        "by default, since its sCT means nothing")
    p.add_argument("--tta", choices=("mirror", "none"), default="mirror",
                   help="test-time augmentation: 'mirror' (default) averages the four in-plane mirrorings of each "
                        "slice (less invented texture; 4x the compute), 'none' runs each slice once")

    p = _add(sub, "export", "write a run's generator as a model folder to hand over (MONAI bundle layout, ONNX)")
    p.add_argument("run", metavar="RUN", help="run folder (uses best.pt, else last.pt) or a checkpoint file")
    p.add_argument("--out", required=True, metavar="MODEL", help="model folder to write (written whole, then renamed)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of a run folder (default best, else last)")
    p.add_argument("--no-onnx", action="store_true", help="skip models/model.onnx (which needs the onnx package)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")

    p = _add(sub, "evaluate", "SynthRAD metrics (MAE/PSNR/SSIM/MS-SSIM in HU, bone and air Dice/HD95 inside the body), "
             "optional dose metrics, and figures")
    p.add_argument("--pred", required=True, metavar="SCT", help="synthetic CT file or folder")
    p.add_argument("--ref", required=True, metavar="CT", help="reference CT file or folder of cases")
    p.add_argument("--mask", metavar="MASK", help="body mask (folder mode: each case's mask.*)")
    p.add_argument("--mr", metavar="MR", help="MR shown in the figure (folder mode: each case's mr.*)")
    p.add_argument("--out", metavar="DIR", help="write report.md, metrics.csv, summary.json and the figures")
    p.add_argument("--window", nargs="+", default=["synthrad2023"], metavar=("NAME|LO", "HI"),
                   help="HU range for PSNR/SSIM/MS-SSIM: synthrad2023 (default, -1024 3000), synthrad2025 "
                        "(-1024 3071) or two numbers")
    p.add_argument("--dose", choices=("photon", "proton", "both"), help="also plan on the CT, recompute on the sCT "
                   "and report dose error, gamma 2%%/2mm and DVH differences (needs pip install \"medcycle[dose]\")")
    p.add_argument("--dose-grid", type=float, default=3.0, metavar="MM", help="dose grid voxel size (default 3 mm)")
    p.add_argument("--target", metavar="MASK", help="with --dose: the plans' target (folder mode: each case's "
                   "target.*; default a 30 mm sphere at the brain's centre)")

    p = _add(sub, "demo", "the whole job on built-in phantom data: data, training, conversion, evaluation")
    p.add_argument("--out", default="medcycle_demo", metavar="DIR", help="demo folder (default medcycle_demo)")
    p.add_argument("--minutes", type=float, default=15.0, help="budget of the whole demo in minutes; training gets what the other "
                   "steps leave (default 15)")
    p.add_argument("--config", default=None, metavar="FILE", help="config (default configs/demo_cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--seed", type=int, default=0, help="phantom and training seed (default 0)")
    _add_device(p)
    return parser


def _job(args: argparse.Namespace) -> Callable[[], object]:
    import medcycle

    if args.command == "phantom":
        return lambda: medcycle.phantom(out=args.out, cases=args.cases, seed=args.seed, size=args.size, quiet=args.quiet,
                                        from_ct=args.from_ct)
    if args.command == "preprocess":
        return lambda: medcycle.preprocess(out=args.out, data=args.data, mr_dir=args.mr_dir, ct_dir=args.ct_dir,
                                           config=args.config, overrides=args.overrides, workers=args.workers,
                                           quiet=args.quiet, register=args.register)
    if args.command == "train":
        return lambda: medcycle.train(config=args.config, data=args.data, out=args.out, overrides=args.overrides,
                                      max_iters=args.max_iters, resume=args.resume, device=args.device,
                                      quiet=args.quiet)
    if args.command == "convert":
        return lambda: medcycle.convert(input=args.input, output=args.output, model=args.model, mask=args.mask,
                                        no_mask=args.no_mask, batch_size=args.batch_size, device=args.device,
                                        overwrite=args.overwrite, dicom_out=args.dicom_out, tta=args.tta,
                                        dicom_ref=args.dicom_ref, rtstruct=args.rtstruct, uncertainty=args.uncertainty,
                                        allow_other_anatomy=args.allow_other_anatomy, quiet=args.quiet)
    if args.command == "export":
        return lambda: medcycle.export(run=args.run, out=args.out, overwrite=args.overwrite, checkpoint=args.checkpoint,
                                       onnx=not args.no_onnx, quiet=args.quiet)
    if args.command == "evaluate":
        window = args.window[0] if len(args.window) == 1 else tuple(args.window)
        return lambda: medcycle.evaluate(pred=args.pred, ref=args.ref, mask=args.mask, out=args.out, mr=args.mr,
                                         window=window, dose=args.dose, dose_grid_mm=args.dose_grid,
                                         target=args.target, quiet=args.quiet)
    return lambda: medcycle.demo(out=args.out, minutes=args.minutes, config=args.config,
                                 overrides=args.overrides, seed=args.seed, device=args.device, quiet=args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one sub-command; user errors print one line and return their exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _job(args)()
    except MedcycleError as exc:
        print(f"medcycle {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"medcycle {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
