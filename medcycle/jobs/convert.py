"""`medcycle convert`: a patient MRI (or a folder of them) becomes a synthetic CT NIfTI in HU.

One case:

1. the checkpoint gives the generator and the preprocessing it was trained with (``config.data``:
   orientation, in-plane spacing, tile size, context slices, MR percentiles, CT window); nothing is
   retyped on the command line;
2. the MRI is read and validated (:func:`medcycle.io.load_volume`), then put on the model grid by the
   shared MONAI transforms (:func:`medcycle.transforms.volume_transforms`): oriented, resampled
   in-plane, body mask (``--mask``, or computed from the MR), MR normalised to [-1, 1];
3. :func:`medcycle.inferers.synthesize` runs the generator over every axial slice (sliding windows
   on the body's region, 2.5D context, bf16 on CPUs that have it, by default the mean over the four
   in-plane mirrorings: ``tta``);
4. the output is mapped to HU (the inverse of the CT window mapping), resampled back onto the
   input's voxel grid (MONAI ``SpatialResample`` to the input's affine and shape), set to -1000 HU
   outside the body mask (unless ``no_mask``) and written as int16 NIfTI whose affine (sform and
   qform) and shape are the input's. For DICOM/MHA/NRRD inputs the geometry is the one SimpleITK
   reads. With ``dicom_out`` the sCT is also written as a CT DICOM series on the same geometry.

INPUT is a NIfTI/MHA/NRRD file, a DICOM-series folder, or a folder of cases (folder mode):

* SynthRAD layout ``INPUT/<case>/mr.{nii.gz,nii,mha,nrrd}`` (or ``<case>/mr/`` holding a DICOM
  series) -> ``OUTPUT/<case>/sct.nii.gz``; the case's ``mask.*`` is used as its body mask when present;
* flat layout ``INPUT/<name>.{nii.gz,nii,mha,nrrd}`` -> ``OUTPUT/<name>_sct.nii.gz``; files named
  ``*_sct.*`` (outputs) and ``*_mask.*`` are not cases, and ``<name>_mask.*`` is used as the body
  mask of ``<name>`` when present; a sub-folder holding a DICOM series is a case too
  (-> ``OUTPUT/<folder>_sct.nii.gz``);
* with ``dicom_out`` each case's series goes to ``DICOM_OUT/<case or name>/``.

Folder mode loads the generator once, shows a progress bar, skips cases whose output exists (unless
``overwrite``), goes on past a failed case, prints a summary and raises :class:`MedcycleError`
(exit 1) when any case failed. In file mode an existing output is refused unless ``overwrite``.
Outputs are written atomically, so a failure never leaves a partial file, and inputs are only read.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.io import (
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    Volume,
    check_same_grid,
    find_named_volume,
    is_dicom_series,
    load_volume,
    save_nifti,
)

AIR_HU = -1000.0
# Output voxels resampled per MONAI SpatialResample call (its sampling grid is 3 floats per voxel).
RESAMPLE_CHUNK_VOXELS = 4_000_000


@dataclass
class Case:
    """One conversion: where the MR is, its optional mask, and where the outputs go."""

    name: str
    mr: Path
    output: Path
    mask: Optional[Path] = None
    dicom_out: Optional[Path] = None


# --------------------------------------------------------------------------------------------------
# planning: which cases, which outputs; every refusal before any heavy work


def _volume_suffix(path: Path) -> Optional[str]:
    name = path.name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _stem(path: Path) -> str:
    suffix = _volume_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_output_location(path: Path) -> None:
    """Refuse early an output whose folder cannot be created or written (one clear line)."""
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{path}: cannot create the output folder ({ancestor} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{path}: the output folder {ancestor} is not writable")
    if parent.is_dir():
        try:  # catches read-only file systems and ACLs that os.access misses
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".medcycle-probe-"):
                pass
        except OSError as exc:
            raise InputError(f"{path}: the output folder {parent} is not writable ({exc.strerror or exc})") from None


def _check_case_outputs(case: Case, input_root: Path) -> None:
    mr = case.mr.resolve()
    if case.output.resolve() == mr:
        raise InputError(f"{case.output}: the output path is the input; choose another output file")
    if case.mask is not None and case.output.resolve() == case.mask.resolve():
        raise InputError(f"{case.output}: the output path is the mask; choose another output file")
    if case.mr.is_dir() and _inside(case.output, case.mr):
        raise InputError(f"{case.output}: is inside the input DICOM folder {case.mr}; write it elsewhere")
    if case.output.exists() and case.output.is_dir():
        raise InputError(f"{case.output}: is a folder; give an output file name ending in .nii.gz")
    if case.dicom_out is not None:
        if (case.dicom_out.resolve() == mr or _inside(case.mr, case.dicom_out) or _inside(input_root, case.dicom_out)
                or (case.mr.is_dir() and _inside(case.dicom_out, case.mr))):
            raise InputError(f"{case.dicom_out}: the DICOM output folder is, holds or lies in the input; choose another folder")
        if case.dicom_out.exists() and not case.dicom_out.is_dir():
            raise InputError(f"{case.dicom_out}: exists and is not a folder")


def _plan_file(input: Path, output: Path, mask: Optional[Path], dicom_out: Optional[Path]) -> Case:
    if output.is_dir():
        output = output / f"{_stem(input)}_sct.nii.gz"
    elif not output.name.lower().endswith(NIFTI_SUFFIXES):
        raise UsageError(f"{output}: the output must be a NIfTI file name ending in .nii.gz or .nii")
    return Case(name=_stem(input), mr=input, output=output, mask=mask, dicom_out=dicom_out)


def _plan_folder(input: Path, output: Path, dicom_out: Optional[Path]) -> tuple[list[Case], list[str]]:
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: INPUT is a folder of cases, so OUTPUT must be a folder, not a file")
    if output.resolve() == input.resolve():
        raise UsageError(f"{output}: the output folder is the input folder; choose another folder")
    cases: list[Case] = []
    ignored: list[str] = []
    for entry in sorted(input.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _inside(output, entry) or (dicom_out is not None and _inside(dicom_out, entry)):
                continue  # our own output folder inside the input folder
            mr = find_named_volume(entry, "mr")
            if mr is not None:
                cases.append(Case(entry.name, mr, output / entry.name / "sct.nii.gz", find_named_volume(entry, "mask"),
                                  dicom_out / entry.name if dicom_out else None))
            elif is_dicom_series(entry):
                cases.append(Case(entry.name, entry, output / f"{entry.name}_sct.nii.gz", None,
                                  dicom_out / entry.name if dicom_out else None))
            else:
                ignored.append(entry.name)
        elif _volume_suffix(entry) is not None:
            stem = _stem(entry)
            if stem.endswith(("_sct", "_mask")):  # our outputs; masks of the flat layout
                continue
            cases.append(Case(stem, entry, output / f"{stem}_sct.nii.gz", find_named_volume(input, f"{stem}_mask"),
                              dicom_out / stem if dicom_out else None))
    if not cases:
        raise InputError(
            f"{input}: no cases found (expected <case>/mr.nii.gz folders, volume files, or a DICOM series)"
        )
    names = [c.output for c in cases]
    if len(set(names)) != len(names):
        dupes = sorted({str(n) for n in names if names.count(n) > 1})
        raise InputError(f"{input}: several inputs would write {dupes[0]} (e.g. case.nii and case.nii.gz)")
    return cases, ignored


def _resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    return resolved


# --------------------------------------------------------------------------------------------------
# one case


def _preprocess(data_cfg: Any, mr: Path, mask: Optional[Path]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(normalised MR, body mask) on the model grid, as MetaTensors (1, X', Y', Z') with affines."""
    from medcycle.transforms import volume_transforms

    keys = ("mr", "mask") if mask is not None else ("mr",)
    data = {"mr": str(mr)}
    if mask is not None:
        data["mask"] = str(mask)
    out = volume_transforms(data_cfg, keys)(data)
    return out["mr"], out.get("mask")


def _affine_of(tensor: torch.Tensor) -> np.ndarray:
    affine = getattr(tensor, "affine", None)
    if affine is None:
        raise RuntimeError("the preprocessing transforms returned a tensor without an affine")
    return np.asarray(affine, dtype=np.float64)


def to_input_grid(values: torch.Tensor, values_affine: np.ndarray, like: Volume, mode: str = "bilinear",
                  post: Optional[Callable[[np.ndarray], np.ndarray]] = None, dtype: Any = np.float32) -> np.ndarray:
    """Resample (X', Y', Z') `values` on `values_affine` onto the (X, Y, Z) grid of `like`.

    :func:`medcycle.transforms.to_original_grid` (MONAI ``SpatialResample`` in world coordinates, so
    orientation changes and in-plane resampling are undone exactly; border padding) in chunks of the
    input's last axis to bound memory; `post` maps each float32 chunk (e.g. rounding to int16,
    thresholding a mask) into a `dtype` result.
    """
    from medcycle.transforms import to_original_grid

    values = values.as_tensor() if hasattr(values, "as_tensor") else torch.as_tensor(values)
    values = values.reshape(values.shape[-3:])
    x_size, y_size, z_size = like.shape
    result = np.empty((x_size, y_size, z_size), dtype=dtype)
    if tuple(values.shape) == like.shape and np.allclose(values_affine, like.affine, atol=1e-6):
        chunk = values.to(torch.float32).numpy()
        result[...] = post(chunk) if post else chunk
        return result
    step = max(1, RESAMPLE_CHUNK_VOXELS // (x_size * y_size))
    for z0 in range(0, z_size, step):
        z1 = min(z_size, z0 + step)
        shift = np.eye(4)
        shift[2, 3] = z0
        out = to_original_grid(values, values_affine, like.affine @ shift, (x_size, y_size, z1 - z0), mode=mode)
        chunk = torch.as_tensor(out)[0].detach().cpu().numpy()
        result[..., z0:z1] = post(chunk) if post else chunk
    return result


def _round_int16(chunk: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(chunk), -32768, 32767).astype(np.int16)


def convert_case(case: Case, generator: torch.nn.Module, config: Any, device: torch.device, batch_size: int,
                 no_mask: bool, overwrite: bool, tta: str = "mirror") -> dict[str, Any]:
    """Convert one case with an already loaded generator; returns its result record."""
    started = time.perf_counter()
    volume = load_volume(case.mr)
    given_mask = None
    if case.mask is not None:
        given_mask = load_volume(case.mask, allow_constant=True)
        check_same_grid(volume, given_mask)
        if not (given_mask.array > 0).any():
            raise InputError(f"{case.mask}: the mask is empty (no voxel > 0)")
    if case.dicom_out is not None:
        from medcycle.dicom import check_affine

        check_affine(volume.affine, case.dicom_out)  # refuse before any work
    # Only the geometry (and NIfTI header) of the input is needed from here on: free its voxels.
    volume.array = np.broadcast_to(np.zeros((), dtype=np.float32), volume.shape)

    from medcycle.transforms import norm_to_hu

    data = config.data
    mr_norm, model_mask = _preprocess(data, case.mr, case.mask)
    model_affine = _affine_of(mr_norm)
    use_mask = not no_mask and model_mask is not None
    sct = synthesize_case(generator, mr_norm, model_mask if use_mask else None, config, device, batch_size, tta=tta)
    del mr_norm
    hu = to_input_grid(norm_to_hu(sct, data), model_affine, volume, post=_round_int16, dtype=np.int16)
    del sct
    if not no_mask:
        if given_mask is not None:
            body = given_mask.array > 0
        elif model_mask is not None:
            body = to_input_grid(model_mask, model_affine, volume, post=lambda c: c >= 0.5, dtype=bool)
        else:
            raise RuntimeError("the preprocessing transforms returned no body mask")
        hu[~body] = int(AIR_HU)
        del body
    del model_mask, given_mask

    save_nifti(case.output, hu, like=volume, dtype=np.int16)
    record: dict[str, Any] = {"case": case.name, "input": str(case.mr), "output": str(case.output)}
    if case.dicom_out is not None:
        from medcycle.dicom import write_ct_series

        reference = case.mr if case.mr.is_dir() else None
        write_ct_series(case.dicom_out, hu, volume.affine, reference=reference, overwrite=overwrite)
        record["dicom"] = str(case.dicom_out)
    record.update(status="converted", seconds=round(time.perf_counter() - started, 3), shape=list(volume.shape),
                  mask="none" if no_mask else ("given" if case.mask is not None else "computed"))
    return record


def synthesize_case(generator: torch.nn.Module, mr_norm: torch.Tensor, mask: Optional[torch.Tensor], config: Any,
                    device: torch.device, batch_size: int, tta: str = "mirror") -> torch.Tensor:
    """The generator's [-1, 1] output for a preprocessed MR, with the checkpoint's tile/context/AMP."""
    from medcycle.inferers import synthesize

    return synthesize(
        generator,
        mr_norm,
        tile_size=config.data.tile_size,
        context_slices=config.data.context_slices,
        batch_size=batch_size,
        device=device,
        amp=config.train.amp,
        mask=mask,
        tta=tta,
    )


# --------------------------------------------------------------------------------------------------
# the job


def run(
    input: str | os.PathLike,
    output: str | os.PathLike,
    model: str | os.PathLike,
    mask: Optional[str | os.PathLike] = None,
    no_mask: bool = False,
    batch_size: int = 8,
    device: Optional[str] = None,
    overwrite: bool = False,
    dicom_out: Optional[str | os.PathLike] = None,
    tta: str = "mirror",
) -> list[dict[str, Any]]:
    """Convert INPUT (file, DICOM folder or folder of cases) to synthetic CT; returns one record per case.

    ``tta="mirror"`` (default) averages the generator over the four in-plane mirrorings of each slice
    (:func:`medcycle.inferers.synthesize`); ``"none"`` is four times faster.

    Each record holds ``case``, ``input``, ``output``, ``status`` (``converted``, ``skipped`` or
    ``failed``) and, as they apply, ``dicom``, ``seconds``, ``error``.
    """
    from medcycle.checkpoint import load_generator
    from medcycle.inferers import TTA_MODES

    input, output = Path(input), Path(output)
    mask_path = Path(mask) if mask is not None else None
    dicom_path = Path(dicom_out) if dicom_out is not None else None
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if no_mask and mask_path is not None:
        raise UsageError("--mask and --no-mask exclude each other")
    if tta not in TTA_MODES:
        raise UsageError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if not input.exists():
        raise InputError(f"{input}: no such file or folder")
    if mask_path is not None and not mask_path.exists():
        raise InputError(f"{mask_path}: no such mask file")
    torch_device = _resolve_device(device)

    folder_mode = input.is_dir() and not is_dicom_series(input)
    ignored: list[str] = []
    if folder_mode:
        if mask_path is not None:
            raise UsageError("--mask takes one mask for one input; in folder mode each case's mask.* is used")
        cases, ignored = _plan_folder(input, output, dicom_path)
    else:
        if input.is_file() and _volume_suffix(input) is None:
            raise InputError(f"{input}: not a volume (expected .nii, .nii.gz, .mha, .nrrd or a DICOM folder)")
        cases = [_plan_file(input, output, mask_path, dicom_path)]
        case = cases[0]
        _check_case_outputs(case, input)
        if case.output.exists() and not overwrite:
            raise InputError(f"{case.output}: already exists (use --overwrite to replace it)")
        if case.dicom_out is not None and case.dicom_out.is_dir() and any(case.dicom_out.iterdir()) and not overwrite:
            raise InputError(f"{case.dicom_out}: already exists and is not empty (use --overwrite to replace it)")
        _check_output_location(case.output)
        if case.dicom_out is not None:
            _check_output_location(case.dicom_out / "x")

    generator, config, _ = load_generator(model, torch_device)

    if not folder_mode:
        return [convert_case(cases[0], generator, config, torch_device, batch_size, no_mask, overwrite, tta)]
    return _run_folder(cases, ignored, input, output, generator, config, torch_device, batch_size, no_mask, overwrite, tta)


def _run_folder(cases: list[Case], ignored: list[str], input: Path, output: Path, generator: torch.nn.Module,
                config: Any, device: torch.device, batch_size: int, no_mask: bool, overwrite: bool,
                tta: str) -> list[dict[str, Any]]:
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    bar = tqdm(cases, desc="convert", unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.name)
        base = {"case": case.name, "input": str(case.mr), "output": str(case.output)}
        done = case.output.is_file() and (case.dicom_out is None or (case.dicom_out.is_dir() and any(case.dicom_out.iterdir())))
        if done and not overwrite:
            records.append({**base, "status": "skipped"})
            continue
        try:
            _check_case_outputs(case, input)
            _check_output_location(case.output)
            records.append(convert_case(case, generator, config, device, batch_size, no_mask, overwrite=True, tta=tta))
        except MedcycleError as exc:
            records.append({**base, "status": "failed", "error": str(exc)})
            tqdm.write(f"medcycle convert: {case.name}: failed: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop the others
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            records.append({**base, "status": "failed", "error": message})
            tqdm.write(f"medcycle convert: {case.name}: failed: {message}", file=sys.stderr)
    bar.close()

    counts = {s: sum(r["status"] == s for r in records) for s in ("converted", "skipped", "failed")}
    print(
        f"convert: {counts['converted']} converted, {counts['skipped']} skipped (output exists), "
        f"{counts['failed']} failed, of {len(records)} cases -> {output}"
        + (f"; ignored folders without mr.*: {', '.join(ignored)}" if ignored else "")
    )
    failed = [r for r in records if r["status"] == "failed"]
    for record in failed:
        print(f"  failed {record['case']}: {record['error']}")
    if failed:
        raise MedcycleError(f"{len(failed)} of {len(records)} cases failed: {', '.join(r['case'] for r in failed)}")
    return records
