"""`medcycle export`: a training run becomes a model folder to hand over (:mod:`medcycle.bundle`).

Only what conversion needs leaves the run: the MR-to-CT generator's weights, the preprocessing and
network config, and provenance (medcycle version, iteration, validation figures, hashes of the
training data and of the checkpoint). Never the optimiser state or the image pools (translated
images of the training patients), never the other three networks. The folder is written under a
temporary name beside MODEL and renamed when complete; an existing MODEL is replaced only with
``overwrite`` and only when it is a medcycle model folder.
"""
from __future__ import annotations

import datetime
import os
import shutil
import time
from pathlib import Path
from typing import Any

from medcycle.errors import InputError, UsageError
from medcycle.files import check_output_location, file_checksum, inside, output_lock, temporary_name


def run(run: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, checkpoint: str = "best",
        onnx: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Export RUN (a run folder or a checkpoint file; ``checkpoint``: ``best`` or ``last`` of a folder)
    to the model folder OUT; returns its ``medcycle`` metadata (provenance). Prints one summary line
    (`quiet` changes nothing: export draws no progress)."""
    from medcycle import console
    from medcycle.bundle import is_model_folder, onnx_available, write_model_folder
    from medcycle.checkpoint import load_generator, resolve_checkpoint

    started = time.perf_counter()
    source, out = Path(run), Path(out)
    if checkpoint not in ("best", "last"):
        raise UsageError(f"--checkpoint must be best or last, got {checkpoint!r}")
    if onnx and not onnx_available():
        raise UsageError("writing models/model.onnx needs the onnx package (pip install onnx); or pass --no-onnx")
    if is_model_folder(source):
        raise UsageError(f"{source}: is already an exported model folder; export takes a run folder or checkpoint")
    path = resolve_checkpoint(source, prefer=checkpoint)
    if inside(path, out):
        raise UsageError(f"--out {out}: holds the checkpoint {path}; write the model folder elsewhere")
    check_output_location(out / "x")
    generator, config, state = load_generator(path)
    provenance = _provenance(path, state)
    with output_lock(out):
        if out.exists():
            if not overwrite:
                raise InputError(f"{out}: already exists (use --overwrite to replace it)")
            if not is_model_folder(out):
                raise InputError(f"{out}: exists and is not a medcycle model folder; refusing to replace it")
        staging = out.parent / temporary_name(out)
        staging.mkdir()
        try:
            write_model_folder(staging, generator, config, provenance, onnx=onnx)
            _replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    console.summary("export", f"{path} (iteration {provenance['iteration']}) -> {out} ({size / 1e6:.1f} MB"
                              + (", with ONNX" if onnx else "") + f") in {console.seconds(time.perf_counter() - started)}")
    return provenance


def _replace(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` goes only once the new folder is in place."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / temporary_name(out)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _provenance(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Where the weights come from, as numbers and hashes: no images, no optimiser or pool state."""
    metrics = state.get("metrics") or {}
    preprocessing = state.get("preprocessing") or {}
    config = state["config"]
    return {
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"name": path.name, "sha256": file_checksum(path)},
        "iteration": int(state["iteration"]),
        "training_seconds": state.get("elapsed"),
        "validation": {"best_val_mae_hu": metrics.get("best_val_mae"), "best_iteration": metrics.get("best_iteration"),
                       "history": metrics.get("history", [])},
        "training_data": {"manifest_sha256": preprocessing.get("manifest_sha256"),  # absent before medcycle 0.2
                          "cases_hash": preprocessing.get("cases_hash"),
                          "data_config_hash": preprocessing.get("data_config_hash"),
                          "anatomy": preprocessing.get("anatomy", "unknown")},  # convert refuses other body parts
        "training_config": {"loss": config.get("loss"), "train": config.get("train")},
    }


__all__ = ["run"]
