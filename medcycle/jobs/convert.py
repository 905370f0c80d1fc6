"""`medcycle convert`: a patient MRI (or a folder of them) becomes a synthetic CT NIfTI in HU.

One case:

1. the checkpoint gives the generator and the preprocessing it was trained with (``config.data``:
   orientation, in-plane spacing, tile size, context slices, MR percentiles, CT window); nothing is
   retyped on the command line;
2. the MRI is read once (:func:`medcycle.io.load_volume`) and put on the model grid by the shared
   MONAI transforms (:func:`medcycle.transforms.volume_transforms`): oriented, resampled in-plane,
   body mask (``--mask``, or computed from the MR), MR normalised to [-1, 1];
3. :func:`medcycle.inferers.synthesize` runs the generator over every axial slice (sliding windows
   on the body's region, 2.5D context, bf16 on CPUs that have it, by default the mean over the four
   in-plane mirrorings: ``tta``);
4. the output is decoded to HU (:class:`medcycle.transforms.HUCodec`), resampled back onto the
   input's voxel grid (:func:`medcycle.transforms.to_input_grid`), set to -1000 HU outside the body
   mask (unless ``no_mask``) and written as int16 NIfTI whose affine (sform and qform) and shape are
   the input's. For DICOM/MHA/NRRD inputs the geometry is the one SimpleITK reads. With ``dicom_out``
   the sCT is also written as a CT DICOM series on the same geometry.

INPUT is a NIfTI/MHA/NRRD file, a DICOM-series folder, or a folder of cases (folder mode, layouts of
:func:`medcycle.cases.mr_cases`):

* SynthRAD layout ``INPUT/<case>/mr.*`` -> ``OUTPUT/<case>/sct.nii.gz``, the case's ``mask.*`` as its
  body mask when present;
* flat layout ``INPUT/<name>.nii.gz`` -> ``OUTPUT/<name>_sct.nii.gz``, with ``<name>_mask.*`` as its
  mask when present; a sub-folder holding a DICOM series -> ``OUTPUT/<folder>_sct.nii.gz``;
* with ``dicom_out`` each case's series goes to ``DICOM_OUT/<case or name>/``.

Folder mode loads the generator once, shows a progress bar, skips cases whose output exists (unless
``overwrite``), goes on past a failed case, prints a summary and raises :class:`MedcycleError`
(exit 1) when any case failed. In file mode an existing output is refused unless ``overwrite``.
Outputs are written atomically, so a failure never leaves a partial file, and inputs are only read.
Each output (the NIfTI, the DICOM folder, in folder mode also both output folders) is locked
(:func:`medcycle.files.output_lock`) from the check that it may be written until it is: a second
``convert`` writing it is refused in one line, and temporaries a killed run left are removed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from medcycle.cases import Case, mr_cases
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import (NIFTI_SUFFIXES, check_output_location, inside, output_lock, refuse_overwriting, stem,
                            volume_suffix)
from medcycle.io import is_dicom_series

AIR_HU = -1000  # the sCT outside the body mask


@dataclass
class Conversion:
    """One conversion: the case (its MR and optional mask) and where its outputs go."""

    case: Case
    output: Path
    dicom_out: Optional[Path] = None
    dicom_ref: Optional[Path] = None  # patient, study and frame of reference for dicom_out (default: a DICOM input)

    @property
    def mr(self) -> Path:
        return self.case.volumes["mr"]

    @property
    def mask(self) -> Optional[Path]:
        return self.case.get("mask")


@dataclass
class Settings:
    """How every case is converted: the generator, its config, and the user's options."""

    generator: torch.nn.Module
    config: Any
    device: torch.device
    batch_size: int = 8
    no_mask: bool = False
    overwrite: bool = False
    tta: str = "mirror"
    rtstruct: bool = False  # also the body contour as an RT Structure Set in each DICOM output
    anatomy: str = "unknown"  # what the model was trained on (:func:`medcycle.transforms.body_part.trained_anatomy`)
    allow_other_anatomy: bool = False  # convert a scan that is not a head with a head model anyway


# --------------------------------------------------------------------------------------------------
# planning: which cases, which outputs; every refusal before any heavy work


def _check_outputs(job: Conversion, input_root: Path) -> None:
    refuse_overwriting(job.output, [(job.mr, "input"), (job.mask, "mask")])
    if job.mr.is_dir() and inside(job.output, job.mr):
        raise InputError(f"{job.output}: is inside the input DICOM folder {job.mr}; write it elsewhere")
    if job.output.exists() and job.output.is_dir():
        raise InputError(f"{job.output}: is a folder; give an output file name ending in .nii.gz")
    if job.dicom_out is not None:
        _refuse_nested(job.output, job.dicom_out)
        if (same_or_inside(job.mr, job.dicom_out) or inside(input_root, job.dicom_out)
                or (job.mr.is_dir() and inside(job.dicom_out, job.mr))):
            raise InputError(f"{job.dicom_out}: the DICOM output folder is, holds or lies in the input; choose another folder")
        if job.dicom_out.exists() and not job.dicom_out.is_dir():
            raise InputError(f"{job.dicom_out}: exists and is not a folder")


def same_or_inside(path: Path, folder: Path) -> bool:
    return inside(path, folder) or path.resolve() == folder.resolve()


def _refuse_nested(output: Path, dicom_out: Path) -> None:
    """The NIfTI output and the DICOM folder must be apart: neither is, holds or lies in the other."""
    if inside(output, dicom_out) or inside(dicom_out, output):
        raise UsageError(f"--dicom-out {dicom_out}: is, holds or lies in the output {output}; "
                         "give the DICOM series a folder of its own")


@contextlib.contextmanager
def _locked(*outputs: Optional[Path]) -> Iterator[None]:
    """Hold the lock of every output given (None ones skipped) for the ``with`` block."""
    with contextlib.ExitStack() as stack:
        for output in outputs:
            if output is not None:
                stack.enter_context(output_lock(output))
        yield


def _plan_file(input: Path, output: Path, mask: Optional[Path], dicom_out: Optional[Path]) -> Conversion:
    if output.is_dir():
        output = output / f"{stem(input)}_sct.nii.gz"
    elif not output.name.lower().endswith(NIFTI_SUFFIXES):
        raise UsageError(f"{output}: the output must be a NIfTI file name ending in .nii.gz or .nii")
    volumes = {"mr": input, **({"mask": mask} if mask is not None else {})}
    return Conversion(Case(stem(input), input, volumes), output, dicom_out)


def _plan_folder(input: Path, output: Path, dicom_out: Optional[Path]) -> tuple[list[Conversion], list[str]]:
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: INPUT is a folder of cases, so OUTPUT must be a folder, not a file")
    if output.resolve() == input.resolve():
        raise UsageError(f"{output}: the output folder is the input folder; choose another folder")
    if dicom_out is not None:
        _refuse_nested(output, dicom_out)
    cases, ignored = mr_cases(input, skip=[p for p in (output, dicom_out) if p is not None])
    if not cases:
        raise InputError(
            f"{input}: no cases found (expected <case>/mr.nii.gz folders, volume files, or a DICOM series)"
        )
    jobs = []
    for case in cases:
        nested = case.origin.is_dir() and case.origin != case.volumes["mr"]  # a SynthRAD case folder
        target = output / case.name / "sct.nii.gz" if nested else output / f"{case.name}_sct.nii.gz"
        jobs.append(Conversion(case, target, dicom_out / case.name if dicom_out else None))
    names = [job.output for job in jobs]
    if len(set(names)) != len(names):
        dupes = sorted({str(n) for n in names if names.count(n) > 1})
        raise InputError(f"{input}: several inputs would write {dupes[0]} (e.g. case.nii and case.nii.gz)")
    return jobs, ignored


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


def _check_anatomy(job: Conversion, model_mask: Any, settings: Settings) -> Any:
    """Refuse a scan that is not a head when the model was trained on heads only (unless the user allows
    it); warn about it otherwise, and about a field of view that cuts the body. Returns the check."""
    from tqdm import tqdm

    from medcycle.image import affine_of, spacing_of
    from medcycle.transforms.body_part import head_check

    part = head_check(model_mask[0], spacing_of(affine_of(model_mask)))
    if not part.is_head and settings.anatomy == "head" and not settings.allow_other_anatomy:
        raise InputError(f"{job.mr}: {part.notes()[0]}, and this model was trained on heads only: its sCT would mean "
                         "nothing (--allow-other-anatomy converts it anyway)")
    for note in part.notes():
        tqdm.write(f"medcycle convert: warning: {job.mr}: {note}", file=sys.stderr)
    return part


def _round_int16(chunk: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(chunk), -32768, 32767).astype(np.int16)


def convert_case(job: Conversion, settings: Settings) -> dict[str, Any]:
    """Convert one case with an already loaded generator; returns its result record."""
    from medcycle.image import affine_of, source_grid, voxels
    from medcycle.inferers import Runtime, synthesize
    from medcycle.io import load_volume, save_nifti
    from medcycle.transforms import HUCodec, to_input_grid, volume_transforms

    started = time.perf_counter()
    if job.case.problem:
        raise InputError(job.case.problem)
    data = settings.config.data
    images = {"mr": load_volume(job.mr)}
    if job.mask is not None:
        images["mask"] = load_volume(job.mask, allow_constant=True)
    input_affine, input_shape = source_grid(images["mr"])
    reference = None
    if job.dicom_out is not None:  # refuse before any work
        from medcycle.dicom import check_affine, read_reference

        check_affine(input_affine, job.dicom_out)
        source = job.dicom_ref or (job.mr if job.mr.is_dir() else None)
        reference = read_reference(source, input_affine, input_shape) if source is not None else None
    on_model_grid = volume_transforms(data, list(images))(images)  # checks the mask's grid and content
    body = voxels(images["mask"]) > 0 if job.mask is not None and not settings.no_mask else None
    del images  # from here on the images on the model grid carry the input's geometry

    mr, model_mask = on_model_grid["mr"], on_model_grid["mask"]
    body_part = _check_anatomy(job, model_mask, settings)
    runtime = Runtime(device=settings.device, amp=settings.config.train.amp, batch_size=settings.batch_size)
    sct = synthesize(settings.generator, mr, data.tile_size, data.context_slices,
                     mask=None if settings.no_mask else model_mask, tta=settings.tta, runtime=runtime)
    hu = to_input_grid(HUCodec.from_config(data).decode_(sct), affine_of(mr), mr, post=_round_int16, dtype=np.int16)
    del sct
    if not settings.no_mask:
        if body is None:
            body = to_input_grid(model_mask, affine_of(model_mask), mr, post=lambda c: c >= 0.5, dtype=bool)
        hu[~body] = AIR_HU

    save_nifti(job.output, hu, like=mr, dtype=np.int16)
    record: dict[str, Any] = {"case": job.case.name, "input": str(job.mr), "output": str(job.output)}
    if job.dicom_out is not None:
        from medcycle.dicom import write_ct_series

        try:
            files = write_ct_series(job.dicom_out, hu, input_affine, reference=reference, overwrite=settings.overwrite,
                                    body_mask=body if settings.rtstruct else None)
        except BaseException:  # a NIfTI without its series would pass for a finished case
            job.output.unlink(missing_ok=True)
            raise
        record["dicom"] = str(job.dicom_out)
        if settings.rtstruct:
            record["rtstruct"] = str(files[-1])
    record.update(status="converted", seconds=round(time.perf_counter() - started, 3), shape=list(input_shape),
                  mask="none" if settings.no_mask else ("given" if job.mask is not None else "computed"),
                  body_part=body_part.verdict, warnings=body_part.notes())
    return record


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
    dicom_ref: Optional[str | os.PathLike] = None,
    rtstruct: bool = False,
    allow_other_anatomy: bool = False,
) -> list[dict[str, Any]]:
    """Convert INPUT (file, DICOM folder or folder of cases) to synthetic CT; returns one record per case.

    ``tta="mirror"`` (default) averages the generator over the four in-plane mirrorings of each slice
    (:func:`medcycle.inferers.synthesize`); ``"none"`` is four times faster.

    With ``dicom_out`` the sCT is also written as a CT DICOM series; ``dicom_ref`` (the patient's MR
    series, for a NIfTI input) gives it patient, study and frame of reference; ``rtstruct`` adds the
    body contour as an RT Structure Set.

    A scan that is not a head (:func:`medcycle.transforms.body_part.head_check`: a chest, an abdomen)
    is refused when the model was trained on heads only, unless ``allow_other_anatomy``; otherwise
    it is converted with a warning, as is a scan whose field of view cuts the body.

    Each record holds ``case``, ``input``, ``output``, ``status`` (``converted``, ``skipped`` or
    ``failed``) and, as they apply, ``dicom``, ``rtstruct``, ``seconds``, ``body_part`` (the check's
    verdict), ``warnings``, ``error``.
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
    if (dicom_ref is not None or rtstruct) and dicom_path is None:
        raise UsageError("--dicom-ref and --rtstruct go with --dicom-out")
    if rtstruct and no_mask:
        raise UsageError("--rtstruct writes the body mask's contour: it excludes --no-mask")
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
        if dicom_ref is not None:
            raise UsageError("--dicom-ref gives one patient's tags: it takes one input, not a folder of cases")
        jobs, ignored = _plan_folder(input, output, dicom_path)
    else:
        if input.is_file() and volume_suffix(input) is None:
            raise InputError(f"{input}: not a volume (expected .nii, .nii.gz, .mha, .nrrd or a DICOM folder)")
        job = _plan_file(input, output, mask_path, dicom_path)
        job.dicom_ref = Path(dicom_ref) if dicom_ref is not None else None
        _check_outputs(job, input)
        check_output_location(job.output)
        if job.dicom_out is not None:
            check_output_location(job.dicom_out / "x")
        jobs = [job]

    generator, config, state = load_generator(model, torch_device)
    settings = Settings(generator, config, torch_device, batch_size, no_mask, overwrite, tta, rtstruct,
                        anatomy=state["preprocessing"].get("anatomy", "unknown"),  # absent in checkpoints of older versions
                        allow_other_anatomy=allow_other_anatomy)
    if folder_mode:
        with _locked(output, dicom_path):
            return _run_folder(jobs, ignored, input, output, settings)
    with _locked(job.output, job.dicom_out):  # from the existence checks to the last file written
        if job.output.exists() and not overwrite:
            raise InputError(f"{job.output}: already exists (use --overwrite to replace it)")
        if job.dicom_out is not None and job.dicom_out.is_dir() and any(job.dicom_out.iterdir()) and not overwrite:
            raise InputError(f"{job.dicom_out}: already exists and is not empty (use --overwrite to replace it)")
        return [convert_case(job, settings)]


def _run_folder(jobs: list[Conversion], ignored: list[str], input: Path, output: Path,
                settings: Settings) -> list[dict[str, Any]]:
    from dataclasses import replace

    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    each = replace(settings, overwrite=True)  # a case that is not skipped replaces its partial outputs
    bar = tqdm(jobs, desc="convert", unit="case", file=sys.stderr, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.case.name)
        base = {"case": job.case.name, "input": str(job.mr), "output": str(job.output)}
        try:
            _check_outputs(job, input)
            check_output_location(job.output)
            with _locked(job.output, job.dicom_out):
                done = job.output.is_file() and (
                    job.dicom_out is None or (job.dicom_out.is_dir() and any(job.dicom_out.iterdir())))
                if done and not settings.overwrite:
                    records.append({**base, "status": "skipped"})
                    continue
                records.append(convert_case(job, each))
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop the others
            message = job.case.failure(exc)
            records.append({**base, "status": "failed", "error": message})
            tqdm.write(f"medcycle convert: {job.case.name}: failed: {message}", file=sys.stderr)
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


__all__ = ["Conversion", "Settings", "convert_case", "run"]
