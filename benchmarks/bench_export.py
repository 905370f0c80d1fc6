"""Figures of `medcycle export`: the model folder's size, and the sCT from it against the run's.

    python benchmarks/bench_export.py --run medcycle_demo/run --mr medcycle_demo/data/test/phantom_016/mr.nii.gz
    python benchmarks/bench_export.py --quick     # a random demo-config generator on a small phantom MRI

RUN is exported (with ONNX) to a temporary folder; then the MRI is converted three times with the
shipped pipeline (``tta="mirror"``): from the run folder, from the model folder, and from the model
folder with the generator replaced by ``models/model.onnx`` run by onnxruntime. Reported: the
folder's size (and the run's checkpoint's), whether the first two sCTs are identical, and the MAE in
HU between the ONNX sCT and medcycle's inside the body (voxels above -1000 HU in medcycle's sCT).
Needs ``onnx`` and ``onnxruntime``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402


class OnnxGenerator:
    """``models/model.onnx`` under onnxruntime, called like the torch generator (float32 in and out)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, batch):
        import torch

        return torch.from_numpy(self.session.run(None, {"mr": batch.float().cpu().numpy()})[0])


def random_run(folder: Path) -> Path:
    """A run folder holding a random generator with the demo config (for --quick)."""
    from bench_convert import demo_settings, make_checkpoint

    data, model, amp, _ = demo_settings()
    folder.mkdir(parents=True)
    make_checkpoint(folder / "best.pt", data, model, amp=amp)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder or checkpoint (default: a random demo-config generator)")
    parser.add_argument("--mr", type=Path, help="MRI to convert (default: a phantom head)")
    parser.add_argument("--quick", action="store_true", help="a small phantom MRI")
    args = parser.parse_args()

    import nibabel as nib
    import torch

    import medcycle.checkpoint
    import medcycle.jobs.export
    from medcycle.jobs.convert import run as convert

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        run = args.run or random_run(tmp / "run")
        mr = args.mr
        if mr is None:
            from bench_convert import head_mr, write_volume

            mr = write_volume(tmp / "mr.nii.gz", head_mr((128, 128, 8) if args.quick else (192, 224, 64)))
        started = time.perf_counter()
        medcycle.jobs.export.run(run, tmp / "model")
        export_seconds = time.perf_counter() - started
        folder_bytes = sum(p.stat().st_size for p in (tmp / "model").rglob("*") if p.is_file())
        checkpoint = medcycle.checkpoint.resolve_checkpoint(run)
        checkpoint_bytes = checkpoint.stat().st_size

        convert(mr, tmp / "from_run.nii.gz", run)
        convert(mr, tmp / "from_model.nii.gz", tmp / "model")
        real = medcycle.checkpoint.load_generator

        def onnx_generator(path, device="cpu"):
            _, config, metadata = real(path, device)
            return OnnxGenerator(Path(path) / "models/model.onnx"), config, metadata

        medcycle.checkpoint.load_generator = onnx_generator
        convert(mr, tmp / "from_onnx.nii.gz", tmp / "model")
        medcycle.checkpoint.load_generator = real

        sct = {name: np.asanyarray(nib.load(str(tmp / f"from_{name}.nii.gz")).dataobj).astype(np.float32)
               for name in ("run", "model", "onnx")}
        body = sct["model"] > -1000
        identical = bool(np.array_equal(sct["run"], sct["model"]))
        mae = float(np.abs(sct["onnx"] - sct["model"])[body].mean())
        worst = float(np.abs(sct["onnx"] - sct["model"]).max())

    print(f"\nmedcycle export of {run} ({checkpoint.name}: {checkpoint_bytes / 1e6:.1f} MB), MRI {mr}")
    print("| figure | value | target |")
    print("|---|---|---|")
    print(f"| model folder size (weights + ONNX + configs) | {folder_bytes / 1e6:.2f} MB | <= 10 MB |")
    print(f"| export time | {export_seconds:.1f} s | |")
    print(f"| sCT from the model folder == sCT from the run | {'identical' if identical else 'DIFFERENT'} | identical |")
    print(f"| ONNX sCT against medcycle's, body MAE | {mae:.3f} HU | <= 1 HU |")
    print(f"| ONNX sCT against medcycle's, largest difference | {worst:.0f} HU | |")


if __name__ == "__main__":
    main()
