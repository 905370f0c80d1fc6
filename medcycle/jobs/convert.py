"""`medcycle convert`: a patient MRI (or a folder of them) becomes a synthetic CT NIfTI in HU.

One case:

1. the checkpoint gives the generator and the preprocessing it was trained with (``config.data``:
   orientation, in-plane spacing, tile size, context slices, MR percentiles, CT window); nothing is
   retyped on the command line;
2. the MRI is read once (:func:`medcycle.io.load_volume`) and put on the model grid by the shared
   MONAI transforms (:func:`medcycle.transforms.volume_transforms`): oriented, resampled in-plane,
   body mask (``--mask``, or computed from the MR), MR normalised to [-1, 1]; a scan that is not a
   head is refused when the model was trained on heads (``allow_other_anatomy`` converts it anyway);
3. :func:`medcycle.inferers.synthesize` runs the generator over every axial slice (sliding windows
   on the body's region, 2.5D context, bf16 on CPUs that have it, by default the mean over the four
   in-plane mirrorings: ``tta``);
4. the output is decoded to HU (:class:`medcycle.transforms.HUCodec`), resampled back onto the
   input's voxel grid (:func:`medcycle.transforms.to_input_grid`), set to -1000 HU outside the body
   mask (unless ``no_mask``) and written as int16 NIfTI whose affine (sform and qform) and shape are
   the input's. For DICOM/MHA/NRRD inputs the geometry is the one SimpleITK reads. With ``dicom_out``
   the sCT is also written as a CT DICOM series on the same geometry.

A model is an exported model folder (``medcycle export``), a run folder or a checkpoint. Several
models make an ensemble: each member converts the case as it would alone, and the sCT is the mean of
the members' sCTs in HU. The members must share the preprocessing (:data:`PREPROCESSING_KEYS`); they
run with the first model's precision setting. ``uncertainty`` writes the voxel-wise standard deviation
in HU over every member and test-time mirroring (the population one: over all N = members x mirrorings
outputs, divided by N) as float32 NIfTI on the sCT's grid, 0 outside the body: to a file, or for a
folder of cases to a folder (``<case>_sd.nii.gz``).

INPUT is a NIfTI/MHA/NRRD file, a DICOM-series folder, or a folder of cases (folder mode, layouts of
:func:`medcycle.cases.mr_cases`):

* SynthRAD layout ``INPUT/<case>/mr.*`` -> ``OUTPUT/<case>/sct.nii.gz``, the case's ``mask.*`` as its
  body mask when present;
* flat layout ``INPUT/<name>.nii.gz`` -> ``OUTPUT/<name>_sct.nii.gz``, with ``<name>_mask.*`` as its
  mask when present; a sub-folder holding a DICOM series -> ``OUTPUT/<folder>_sct.nii.gz``;
* with ``dicom_out`` each case's series goes to ``DICOM_OUT/<case or name>/``.

In memory, :func:`convert_array` takes an array and its affine (or a MONAI ``MetaTensor``) through
the same steps 2-4 (:func:`synthesize_sct`) and returns the sCT on the same grid, writing nothing.

File mode prints one summary line (what was written, its grid, how long). Folder mode loads the
generator once, shows a progress bar (none when ``quiet``), skips cases whose output exists (unless
``overwrite``), goes on past a failed case, prints a summary line and raises :class:`MedcycleError`
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
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from medcycle import console
from medcycle.cases import Case, mr_cases
from medcycle.device import resolve_device
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import (NIFTI_SUFFIXES, check_output_location, inside, output_lock, refuse_overwriting, stem,
                            volume_suffix)
from medcycle.io import is_dicom_series

AIR_HU = -1000  # the sCT outside the body mask
#: The data config keys conversion applies: ensemble members must agree on every one.
PREPROCESSING_KEYS = ("orientation", "spacing", "tile_size", "context_slices", "mr_percentiles", "ct_window", "ct_knots")


@dataclass
class Conversion:
    """One conversion: the case (its MR and optional mask) and where its outputs go."""

    case: Case
    output: Path
    dicom_out: Optional[Path] = None
    dicom_ref: Optional[Path] = None  # patient, study and frame of reference for dicom_out (default: a DICOM input)
    uncertainty: Optional[Path] = None  # the standard deviation map (HU) over members and mirrorings

    @property
    def mr(self) -> Path:
        return self.case.volumes["mr"]

    @property
    def mask(self) -> Optional[Path]:
        return self.case.get("mask")


@dataclass
class Settings:
    """How every case is converted: the generators (one, or an ensemble's members), the first one's
    config (the preprocessing, shared by all), and the user's options."""

    generators: list[torch.nn.Module]
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
    if job.uncertainty is not None:
        if not job.uncertainty.name.lower().endswith(NIFTI_SUFFIXES):
            raise UsageError(f"--uncertainty {job.uncertainty}: must be a NIfTI file name ending in .nii.gz or .nii")
        refuse_overwriting(job.uncertainty, [(job.mr, "input"), (job.mask, "mask"), (job.output, "sCT output")])
        if job.uncertainty.is_dir():
            raise InputError(f"{job.uncertainty}: is a folder; give the uncertainty map a file name ending in .nii.gz")
        if job.dicom_out is not None and inside(job.uncertainty, job.dicom_out):
            raise UsageError(f"--uncertainty {job.uncertainty}: lies in the DICOM output folder; write it elsewhere")
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


def _plan_folder(input: Path, output: Path, dicom_out: Optional[Path],
                 uncertainty: Optional[Path] = None) -> tuple[list[Conversion], list[str]]:
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: INPUT is a folder of cases, so OUTPUT must be a folder, not a file")
    if output.resolve() == input.resolve():
        raise UsageError(f"{output}: the output folder is the input folder; choose another folder")
    if dicom_out is not None:
        _refuse_nested(output, dicom_out)
    if uncertainty is not None:
        if uncertainty.name.lower().endswith(NIFTI_SUFFIXES) or (uncertainty.exists() and not uncertainty.is_dir()):
            raise UsageError(f"--uncertainty {uncertainty}: INPUT is a folder of cases, so the uncertainty maps go "
                             "to a folder (one <case>_sd.nii.gz each), not a file")
        if uncertainty.resolve() == input.resolve():
            raise UsageError(f"--uncertainty {uncertainty}: is the input folder; choose another folder")
        if dicom_out is not None and same_or_inside(uncertainty, dicom_out):
            raise UsageError(f"--uncertainty {uncertainty}: is or lies in the DICOM output folder; write it elsewhere")
    cases, ignored = mr_cases(input, skip=[p for p in (output, dicom_out, uncertainty) if p is not None])
    if not cases:
        raise InputError(
            f"{input}: no cases found (expected <case>/mr.nii.gz folders, volume files, or a DICOM series)"
        )
    jobs = []
    for case in cases:
        nested = case.origin.is_dir() and case.origin != case.volumes["mr"]  # a SynthRAD case folder
        target = output / case.name / "sct.nii.gz" if nested else output / f"{case.name}_sct.nii.gz"
        jobs.append(Conversion(case, target, dicom_out / case.name if dicom_out else None,
                               uncertainty=uncertainty / f"{case.name}_sd.nii.gz" if uncertainty else None))
    names = [job.output for job in jobs]
    if len(set(names)) != len(names):
        dupes = sorted({str(n) for n in names if names.count(n) > 1})
        raise InputError(f"{input}: several inputs would write {dupes[0]} (e.g. case.nii and case.nii.gz)")
    return jobs, ignored


def _check_options(batch_size: int, no_mask: bool, mask: Any, tta: str) -> None:
    """Refuse options that make no sense, for files and arrays alike."""
    from medcycle.inferers import TTA_MODES

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if no_mask and mask is not None:
        raise UsageError("--mask and --no-mask exclude each other")
    if tta not in TTA_MODES:
        raise UsageError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")


# --------------------------------------------------------------------------------------------------
# one case


def _check_anatomy(source: str, model_mask: Any, settings: Settings) -> Any:
    """Refuse a scan that is not a head when the model was trained on heads only (unless the user allows
    it); warn about it otherwise, and about a field of view that cuts the body. Returns the check."""
    from tqdm import tqdm

    from medcycle.image import affine_of, spacing_of
    from medcycle.transforms.body_part import head_check

    part = head_check(model_mask[0], spacing_of(affine_of(model_mask)))
    if not part.is_head and settings.anatomy == "head" and not settings.allow_other_anatomy:
        raise InputError(f"{source}: {part.notes()[0]}, and this model was trained on heads only: its sCT would mean "
                         "nothing (--allow-other-anatomy converts it anyway)")
    for note in part.notes():
        tqdm.write(f"medcycle convert: warning: {source}: {note}", file=sys.stderr)
    return part


def _round_int16(chunk: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(chunk), -32768, 32767).astype(np.int16)


@dataclass
class Synthesis:
    """An sCT on its MR's own grid, and what came with it."""

    hu: np.ndarray  # int16 HU (the mean of the ensemble's members), -1000 outside the body unless no_mask
    body: Optional[np.ndarray]  # the body mask on that grid (None with no_mask)
    like: Any  # an image that knows that grid: what medcycle.io.save_nifti writes on
    sd: Optional[np.ndarray]  # with spread: the SD in HU over members and mirrorings, 0 outside the body
    body_part: Any  # the head check (medcycle.transforms.body_part.head_check)


def synthesize_sct(images: dict[str, Any], settings: Settings, spread: bool = False) -> Synthesis:
    """The sCT of ``images["mr"]`` (with its optional ``"mask"``), read images of :mod:`medcycle.image`.

    A scan that is not a head is refused with a head model (unless ``settings.allow_other_anatomy``).
    Empties `images`: from the model grid on the images carry the input's geometry, and the originals
    are not held through the synthesis.
    """
    from medcycle.image import affine_of, name_of, voxels
    from medcycle.inferers import Runtime
    from medcycle.transforms import to_input_grid, volume_transforms

    data = settings.config.data
    on_model_grid = volume_transforms(data, list(images))(images)  # checks the mask's grid and content
    body = voxels(images["mask"]) > 0 if "mask" in images and not settings.no_mask else None
    source = name_of(images["mr"])
    images.clear()

    mr, model_mask = on_model_grid["mr"], on_model_grid["mask"]
    body_part = _check_anatomy(source, model_mask, settings)
    runtime = Runtime(device=settings.device, amp=settings.config.train.amp, batch_size=settings.batch_size)
    sct, sd = ensemble_hu(settings.generators, mr, data, None if settings.no_mask else model_mask, settings.tta,
                              runtime, spread=spread)
    hu = to_input_grid(sct, affine_of(mr), mr, post=_round_int16, dtype=np.int16)
    del sct
    if sd is not None:
        sd = to_input_grid(sd, affine_of(mr), mr, dtype=np.float32)
    if not settings.no_mask:
        if body is None:
            body = to_input_grid(model_mask, affine_of(model_mask), mr, post=lambda c: c >= 0.5, dtype=bool)
        hu[~body] = AIR_HU
        if sd is not None:
            sd[~body] = 0.0  # air there, whatever the members say
    return Synthesis(hu, body, mr, sd, body_part)


def convert_case(job: Conversion, settings: Settings) -> dict[str, Any]:
    """Convert one case with an already loaded generator; returns its result record."""
    from medcycle.image import source_grid, spacing_of
    from medcycle.io import load_volume, save_nifti

    started = time.perf_counter()
    if job.case.problem:
        raise InputError(job.case.problem)
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
    result = synthesize_sct(images, settings, spread=job.uncertainty is not None)

    save_nifti(job.output, result.hu, like=result.like, dtype=np.int16)
    record: dict[str, Any] = {"case": job.case.name, "input": str(job.mr), "output": str(job.output)}
    try:  # a NIfTI without its other outputs would pass for a finished case
        if result.sd is not None:
            save_nifti(job.uncertainty, result.sd, like=result.like, dtype=np.float32)
            record["uncertainty"] = str(job.uncertainty)
        if job.dicom_out is not None:
            from medcycle.dicom import write_ct_series

            files = write_ct_series(job.dicom_out, result.hu, input_affine, reference=reference,
                                    overwrite=settings.overwrite, body_mask=result.body if settings.rtstruct else None)
            record["dicom"] = str(job.dicom_out)
            if settings.rtstruct:
                record["rtstruct"] = str(files[-1])
    except BaseException:
        job.output.unlink(missing_ok=True)
        if "uncertainty" in record:
            job.uncertainty.unlink(missing_ok=True)
        raise
    record.update(status="converted", seconds=round(time.perf_counter() - started, 3), shape=list(input_shape),
                  spacing=list(spacing_of(input_affine)),
                  mask="none" if settings.no_mask else ("given" if job.mask is not None else "computed"),
                  body_part=result.body_part.verdict, warnings=result.body_part.notes())
    return record


def ensemble_hu(generators: list[torch.nn.Module], mr: torch.Tensor, data: Any, mask: Optional[torch.Tensor],
                tta: str, runtime: Any, spread: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The sCT in HU on the model grid: the mean of the members' sCTs (a single model's sCT as it is);
    with `spread`, also the standard deviation in HU over every member's every mirroring (else None)."""
    from medcycle.inferers import synthesize
    from medcycle.transforms import HUCodec

    codec = HUCodec.from_config(data)
    total = mean = squares = None
    count = 0
    for generator in generators:
        hu = codec.decode_(synthesize(generator, mr, data.tile_size, data.context_slices, mask=mask, tta=tta,
                                      runtime=runtime, keep_mirrorings=spread))
        total = hu[:1] if total is None else total.add_(hu[:1])
        for sample in hu[1:]:  # Welford's update: stable where the spread is small against the HU values
            count += 1
            if mean is None:
                mean, squares = sample.clone(), torch.zeros_like(sample)
                continue
            delta = sample - mean
            mean.add_(delta / count)
            squares.add_(delta.mul_(sample - mean))
    sct = total if len(generators) == 1 else total.div_(len(generators))
    return sct, (squares.div_(count).sqrt_()[None] if spread else None)


def _model_list(model: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    models = [Path(m) for m in ([model] if isinstance(model, (str, os.PathLike)) else model)]
    if not models:
        raise UsageError("--model: give at least one model")
    return models


def _trained_anatomy(metadata: dict[str, Any]) -> str:
    """What a model was trained on (:func:`medcycle.transforms.body_part.trained_anatomy`), from a
    checkpoint or a model folder's metadata; ``unknown`` for models of older versions."""
    if "preprocessing" in metadata:  # a checkpoint
        return metadata["preprocessing"].get("anatomy", "unknown")
    return ((metadata.get("medcycle") or {}).get("training_data") or {}).get("anatomy", "unknown")


def load_members(models: list[Path], device: torch.device) -> tuple[list[torch.nn.Module], Any, str]:
    """Each model's generator, the first one's config, and what they were trained on (``head`` only when
    every member was); members whose preprocessing differs are refused."""
    from medcycle.checkpoint import load_generator

    generators, configs, anatomies = [], [], []
    for model in models:
        generator, config, metadata = load_generator(model, device)
        generators.append(generator)
        configs.append(config)
        anatomies.append(_trained_anatomy(metadata))
    first = configs[0].to_dict()["data"]
    for model, config in zip(models[1:], configs[1:]):
        data = config.to_dict()["data"]
        differing = [key for key in PREPROCESSING_KEYS if data[key] != first[key]]
        if differing:
            key = differing[0]
            raise InputError(f"{model}: its preprocessing differs from {models[0]}'s in data.{key} ({data[key]!r} vs "
                             f"{first[key]!r}); ensemble members must share it")
    anatomy = anatomies[0] if len(set(anatomies)) == 1 else ("other" if "other" in anatomies else "unknown")
    return generators, configs[0], anatomy


# --------------------------------------------------------------------------------------------------
# the job


def run(
    input: str | os.PathLike,
    output: str | os.PathLike,
    model: str | os.PathLike | Sequence[str | os.PathLike],
    mask: Optional[str | os.PathLike] = None,
    no_mask: bool = False,
    batch_size: int = 8,
    device: Optional[str] = None,
    overwrite: bool = False,
    dicom_out: Optional[str | os.PathLike] = None,
    tta: str = "mirror",
    dicom_ref: Optional[str | os.PathLike] = None,
    rtstruct: bool = False,
    quiet: bool = False,
    uncertainty: Optional[str | os.PathLike] = None,
    allow_other_anatomy: bool = False,
) -> list[dict[str, Any]]:
    """Convert INPUT (file, DICOM folder or folder of cases) to synthetic CT; returns one record per case.

    ``model``: an exported model folder, a run folder or a checkpoint, or a list of them (an ensemble:
    the mean of the members' sCTs in HU); ``uncertainty``: where to write the standard deviation in HU
    over the members and mirrorings (a ``.nii.gz`` file for one input; for a folder of cases, a folder
    receiving one ``<case>_sd.nii.gz`` per case).

    ``tta="mirror"`` (default) averages the generator over the four in-plane mirrorings of each slice
    (:func:`medcycle.inferers.synthesize`); ``"none"`` is four times faster.

    With ``dicom_out`` the sCT is also written as a CT DICOM series; ``dicom_ref`` (the patient's MR
    series, for a NIfTI input) gives it patient, study and frame of reference; ``rtstruct`` adds the
    body contour as an RT Structure Set.

    `device`: :func:`medcycle.device.resolve_device` (default ``auto``); `quiet`: no progress bar. One
    summary line is printed: what was written where, on which grid (file mode) or how many cases, how long.

    A scan that is not a head (:func:`medcycle.transforms.body_part.head_check`: a chest, an abdomen)
    is refused when the model was trained on heads only, unless ``allow_other_anatomy``; otherwise
    it is converted with a warning, as is a scan whose field of view cuts the body.

    Each record holds ``case``, ``input``, ``output``, ``status`` (``converted``, ``skipped`` or
    ``failed``) and, as they apply, ``dicom``, ``rtstruct``, ``uncertainty``, ``seconds``, ``shape``,
    ``spacing``, ``body_part`` (the head check's verdict), ``warnings``, ``error``.
    """
    started = time.perf_counter()
    models = _model_list(model)
    uncertainty_path = Path(uncertainty) if uncertainty is not None else None
    if uncertainty_path is not None and len(models) == 1 and tta == "none":
        raise UsageError("--uncertainty needs several --model members or --tta mirror: one output has no spread")
    input, output = Path(input), Path(output)
    mask_path = Path(mask) if mask is not None else None
    dicom_path = Path(dicom_out) if dicom_out is not None else None
    _check_options(batch_size, no_mask, mask_path, tta)
    torch_device = resolve_device(device)
    if (dicom_ref is not None or rtstruct) and dicom_path is None:
        raise UsageError("--dicom-ref and --rtstruct go with --dicom-out")
    if rtstruct and no_mask:
        raise UsageError("--rtstruct writes the body mask's contour: it excludes --no-mask")
    if not input.exists():
        raise InputError(f"{input}: no such file or folder")
    if mask_path is not None and not mask_path.exists():
        raise InputError(f"{mask_path}: no such mask file")

    folder_mode = input.is_dir() and not is_dicom_series(input)
    ignored: list[str] = []
    if folder_mode:
        if mask_path is not None:
            raise UsageError("--mask takes one mask for one input; in folder mode each case's mask.* is used")
        if dicom_ref is not None:
            raise UsageError("--dicom-ref gives one patient's tags: it takes one input, not a folder of cases")
        jobs, ignored = _plan_folder(input, output, dicom_path, uncertainty_path)
    else:
        if input.is_file() and volume_suffix(input) is None:
            raise InputError(f"{input}: not a volume (expected .nii, .nii.gz, .mha, .nrrd or a DICOM folder)")
        job = _plan_file(input, output, mask_path, dicom_path)
        job.dicom_ref = Path(dicom_ref) if dicom_ref is not None else None
        job.uncertainty = uncertainty_path
        _check_outputs(job, input)
        check_output_location(job.output)
        if job.dicom_out is not None:
            check_output_location(job.dicom_out / "x")
        if job.uncertainty is not None:
            check_output_location(job.uncertainty)
        jobs = [job]

    generators, config, anatomy = load_members(models, torch_device)
    settings = Settings(generators, config, torch_device, batch_size, no_mask, overwrite, tta, rtstruct, anatomy,
                        allow_other_anatomy)
    if folder_mode:
        with _locked(output, dicom_path):
            return _run_folder(jobs, ignored, input, output, settings, quiet, started)
    with _locked(job.output, job.dicom_out, job.uncertainty):  # from the existence checks to the last file written
        for written in (job.output, job.uncertainty):
            if written is not None and written.exists() and not overwrite:
                raise InputError(f"{written}: already exists (use --overwrite to replace it)")
        if job.dicom_out is not None and job.dicom_out.is_dir() and any(job.dicom_out.iterdir()) and not overwrite:
            raise InputError(f"{job.dicom_out}: already exists and is not empty (use --overwrite to replace it)")
        record = convert_case(job, settings)
    dicom = f", CT series in {record['dicom']}" if "dicom" in record else ""
    dicom += f", uncertainty in {record['uncertainty']}" if "uncertainty" in record else ""
    console.summary("convert", f"wrote {job.output} ({console.grid(record['shape'], record['spacing'])}){dicom} "
                               f"on {torch_device} in {console.seconds(time.perf_counter() - started)}")
    return [record]


def _in_memory_image(volume: Any, affine: Any, what: str) -> Any:
    """`volume` (array or MetaTensor) as a read image of :mod:`medcycle.image`, refused like a file would be."""
    from monai.data import MetaTensor

    from medcycle.image import make_image
    from medcycle.io import as_float32, check_affine, validate_array

    if isinstance(volume, MetaTensor):
        source = str(volume.meta.get("filename_or_obj") or f"<{what} array>")
        if affine is not None:
            raise UsageError(f"{source}: a MetaTensor carries its affine; give affine= only with a plain array")
        affine, volume = volume.affine, volume.as_tensor()
    else:
        source = f"<{what} array>"
        if affine is None:
            raise UsageError(f"{source}: a plain array needs affine=, its 4x4 voxel-to-RAS matrix")
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4 and array.shape[0] == 1:  # (1, X, Y, Z), the channel-first layout of MONAI
        array = array[0]
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"{source}: the affine must be a 4x4 matrix, got shape {affine.shape}")
    values = as_float32(array, source)
    validate_array(values, source, allow_constant=what == "mask")
    check_affine(affine, source)
    return make_image(values, affine, source)


def convert_array(
    mr: Any,
    affine: Any = None,
    *,
    model: str | os.PathLike | Sequence[str | os.PathLike],
    mask: Any = None,
    no_mask: bool = False,
    batch_size: int = 8,
    device: Optional[str] = None,
    tta: str = "mirror",
    allow_other_anatomy: bool = False,
) -> Any:
    """The sCT of an MR volume in memory, written nowhere: the steps of a file's conversion
    (:func:`synthesize_sct`) on an array and its affine, or on a MONAI ``MetaTensor``.

    `mr`: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` numpy array or tensor with `affine` (4x4 voxel-to-RAS, as
    nibabel's ``img.affine``), or a ``MetaTensor`` (its own affine; e.g. from
    :func:`medcycle.io.load_volume`). `mask`: an optional body mask on the same grid. Returns a
    ``MetaTensor`` of `mr`'s shape and affine holding the sCT in int16 HU, the values the file
    conversion writes. Invalid volumes are refused with the one-line errors of a file.
    """
    from monai.data import MetaTensor

    _check_options(batch_size, no_mask, mask, tta)
    torch_device = resolve_device(device)
    image = _in_memory_image(mr, affine, "mr")
    images = {"mr": image}
    if mask is not None:
        images["mask"] = _in_memory_image(mask, None if isinstance(mask, MetaTensor) else image.affine, "mask")
    generators, config, anatomy = load_members(_model_list(model), torch_device)
    out_affine = image.affine.clone()
    meta = dict(mr.meta) if isinstance(mr, MetaTensor) else {}
    settings = Settings(generators, config, torch_device, batch_size, no_mask, tta=tta, anatomy=anatomy,
                        allow_other_anatomy=allow_other_anatomy)
    values = torch.from_numpy(synthesize_sct(images, settings).hu).reshape(np.shape(mr))
    return MetaTensor(values, affine=out_affine, meta={key: v for key, v in meta.items() if key != "affine"})


def _run_folder(jobs: list[Conversion], ignored: list[str], input: Path, output: Path,
                settings: Settings, quiet: bool, started: float) -> list[dict[str, Any]]:
    from dataclasses import replace

    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    each = replace(settings, overwrite=True)  # a case that is not skipped replaces its partial outputs
    bar = console.progress(jobs, desc="convert", unit="case", quiet=quiet)
    for job in bar:
        bar.set_postfix_str(job.case.name)
        base = {"case": job.case.name, "input": str(job.mr), "output": str(job.output)}
        try:
            _check_outputs(job, input)
            check_output_location(job.output)
            if job.uncertainty is not None:
                check_output_location(job.uncertainty)
            with _locked(job.output, job.dicom_out, job.uncertainty):
                done = (job.output.is_file() and (job.uncertainty is None or job.uncertainty.is_file()) and (
                    job.dicom_out is None or (job.dicom_out.is_dir() and any(job.dicom_out.iterdir()))))
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
    maps = f" (uncertainty maps in {jobs[0].uncertainty.parent})" if jobs[0].uncertainty is not None else ""
    console.summary(
        "convert",
        f"{counts['converted']} converted, {counts['skipped']} skipped (output exists), "
        f"{counts['failed']} failed, of {len(records)} cases -> {output}{maps} on {settings.device} "
        f"in {console.seconds(time.perf_counter() - started)}"
        + (f"; ignored folders without mr.*: {', '.join(ignored)}" if ignored else "")
    )
    failed = [r for r in records if r["status"] == "failed"]
    for record in failed:
        print(f"  failed {record['case']}: {record['error']}")
    if failed:
        raise MedcycleError(f"{len(failed)} of {len(records)} cases failed: {', '.join(r['case'] for r in failed)}")
    return records


__all__ = ["Conversion", "Settings", "convert_array", "convert_case", "run", "synthesize_sct"]
