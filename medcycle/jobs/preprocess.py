"""`medcycle preprocess`: MR/CT volumes become a cache of normalised 2D (2.5D) tiles for training.

Inputs, either or both:

* ``data``: the SynthRAD layout ``DATA/<case>/mr.*`` with optional ``ct.*`` and ``mask.*``
  (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd`` or a DICOM-series folder named ``mr``/``ct``/
  ``mask``; names are matched case-insensitively). A case with MR and CT is paired; the CT must lie
  on the MR's grid. ``DATA`` holding ``mr.*`` itself is one case named after the folder.
* ``mr_dir`` / ``ct_dir``: the unpaired layout, each a flat folder of volumes (or of DICOM-series
  sub-folders). Every entry is its own unpaired case, MR-only (id ``mr_<name>``) or CT-only
  (id ``ct_<name>``), ``<name>`` being the file name without its volume suffix.

Cases are found by :mod:`medcycle.cases`. Per case (:func:`process_case`): the source checksums
(sha256) are compared with the case's ``record.json``; an unchanged case under the same data config
is skipped. Otherwise the shared MONAI
chain (:func:`medcycle.transforms.volume_transforms`) orients, resamples, masks and normalises the
volumes, :func:`medcycle.transforms.extract_tiles` cuts the tiles (MR and CT on the same slices and
crop), and :func:`medcycle.data.cache.write_case` writes the arrays and then the record, atomically.
The record also says how much body the tile leaves out and whether the body looks like a head
(:func:`medcycle.transforms.body_part.head_check`); every case with something to say about either
gets one warning line (:func:`case_notes`), and the manifest marks each case ``head`` or not.
Finally ``manifest.json`` lists every finished case with its split: the last ``data.val_cases``
paired cases (sorted ids) are ``val`` (at least one case is left for training), the rest ``train``.

A failing case is reported in one line, ``<path>: <reason>``, and the others go on; the job then
raises :class:`~medcycle.errors.MedcycleError` (exit 1) listing the failed cases. Inputs are only read.
The whole run holds the cache's lock (:func:`medcycle.data.cache.lock`): a second ``preprocess``
into the same cache is refused in one line. Workers die with the job (a ``kill -9`` of it included).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medcycle.cases import ROLES, Case, modality_cases, synthrad_cases
from medcycle.config import DataConfig, config_hash, resolve_config
from medcycle.data import cache
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import volume_suffix

MAX_LISTED_FAILURES = 5
MIN_CT_COVERAGE = 0.99  # a registered CT covering less of the MR's body is worth a warning


# --------------------------------------------------------------------------------------------------
# one case


def _geometry(affine: Any, shape: Sequence[int]) -> dict[str, Any]:
    affine = np.asarray(affine, dtype=np.float64)
    return {
        "affine": affine.tolist(),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
    }


REGISTRATIONS = ("none", "rigid")


def _registered_ct(case: Case, inputs: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Register a paired case's CT onto its MR when it lies on another grid; None when on the same grid.

    The CT is read, registered rigidly (:func:`medcycle.registration.register_rigid`), resampled onto the
    MR's grid (air outside its field of view) and put in `inputs` in place of its path; the returned
    record holds the transform and the verdict. A failed registration refuses the case naming the CT.
    """
    from medcycle.image import affine_of, check_same_grid, shape_of, voxels, with_values
    from medcycle.io import load_volume
    from medcycle.registration import register_rigid, resample_onto

    mr, ct = load_volume(inputs["mr"]), load_volume(inputs["ct"])
    inputs["mr"] = mr
    try:
        check_same_grid(mr, ct)
        inputs["ct"] = ct
        return None
    except InputError:
        pass
    mask = voxels(load_volume(inputs["mask"], allow_constant=True)) if "mask" in inputs else None
    if mask is not None and mask.shape != shape_of(mr):
        raise InputError(f"{case.volumes['mask']}: grid {mask.shape} differs from the MR's {shape_of(mr)}")
    result = register_rigid(voxels(mr), affine_of(mr), voxels(ct), affine_of(ct), fixed_mask=mask,
                            name=str(case.volumes["ct"]), fixed_name=str(case.volumes["mr"]), check=False)
    if not result.ok:
        raise InputError(f"{case.volumes['ct']}: rigid registration onto {case.volumes['mr']} failed "
                         f"({'; '.join(result.failures)}); the case is not used")
    on_mr_grid = resample_onto(voxels(ct), affine_of(ct), result, shape_of(mr), affine_of(mr), default_value=-1024.0)
    inputs["ct"] = with_values(mr, on_mr_grid[None], source=str(case.volumes["ct"]))
    return {**result.record(), "fixed": "mr", "moving": "ct", "ct_resampled_onto": "the MR's grid (linear; -1024 HU "
            "outside the CT's field of view)"}


def process_case(case: Case, cache_dir: Path, data_cfg: DataConfig, data_hash: str,
                 register: str = "none") -> dict[str, Any]:
    """Preprocess one case into the cache (or skip it when its record is current); returns a summary.

    With `register` ``rigid`` a paired case's CT on another grid than its MR is registered onto it
    (:func:`_registered_ct`); otherwise such a case is refused.
    """
    from medcycle.files import file_checksum
    from medcycle.image import affine_of, shape_of, source_grid, spacing_of, voxels
    from medcycle.transforms import HUCodec, extract_tiles, plan_tiles, volume_transforms
    from medcycle.transforms.body_part import head_check

    if case.problem:
        raise InputError(case.problem)
    started = time.perf_counter()
    checksums = {role: file_checksum(path) for role, path in case.volumes.items()}
    previous = cache.read_record(cache_dir, case.name)
    if cache.record_is_current(previous, cache_dir, case.name, checksums, data_hash):
        return {"case": case.name, "status": "skipped", "record": previous}

    keys = [role for role in ROLES if role in case.volumes]
    inputs: dict[str, Any] = {role: str(case.volumes[role]) for role in keys}
    registration = _registered_ct(case, inputs) if register == "rigid" and case.paired else None
    volumes = volume_transforms(data_cfg, keys)(inputs)
    del inputs
    images = {role: volumes[role] for role in ("mr", "ct") if role in volumes}
    plan = plan_tiles(volumes["mask"], data_cfg)
    tiles, mask_tiles, slices = extract_tiles(images, volumes["mask"], data_cfg, plan=plan)
    if len(slices) == 0:
        raise InputError(f"{case.origin}: no axial slice has a body fraction >= {data_cfg.min_body_fraction} in its "
                         f"{data_cfg.tile_size}x{data_cfg.tile_size} tile (empty body mask?)")
    reference = images["mr"] if "mr" in images else images["ct"]
    ct_hu = HUCodec.from_config(data_cfg).decode(voxels(images["ct"])) if "ct" in images else None
    body_part = head_check(volumes["mask"][0], spacing_of(affine_of(reference)), ct_hu)
    del ct_hu
    normalisation: dict[str, Any] = {"ct_window": [float(v) for v in data_cfg.ct_window]}
    if "mr" in images:
        normalisation.update(mr_low=float(images["mr"].meta["mr_low"]), mr_high=float(images["mr"].meta["mr_high"]),
                             mr_percentiles=[float(p) for p in data_cfg.mr_percentiles])
    record = {
        "data_config_hash": data_hash,
        "paired": case.paired,
        "modalities": [m for m in ("mr", "ct") if m in images],
        "sources": {role: {"path": str(Path(case.volumes[role]).resolve()), "sha256": checksums[role]} for role in keys},
        "mask": volumes["mask"].meta.get("mask_source", "given" if "mask" in keys else "computed"),
        "geometry": {
            "original": _geometry(*source_grid(reference)),
            "resampled": _geometry(affine_of(reference), shape_of(reference)),
            "orientation": data_cfg.orientation,
        },
        "normalisation": normalisation,
        "tile": {"start": [int(v) for v in plan.start], "size": int(data_cfg.tile_size),
                 "context_slices": int(data_cfg.context_slices), "axis": 2,
                 "body_cut_fraction": round(plan.cut_fraction, 6), "body_dropped_fraction": round(plan.dropped_fraction, 6),
                 "overhang_mm": {side: round(mm, 1) for side, mm in plan.overhang_mm.items()},
                 "cut_warning": plan.cut_warning()},
        "body_part": body_part.record(),
        **({"registration": registration} if registration is not None else {}),
        "slices": [int(s) for s in slices],
        "n_tiles": int(len(slices)),
    }
    del volumes, images, reference
    cache.write_case(cache_dir, case.name, {**tiles, "mask": mask_tiles}, record)
    written = cache.read_record(cache_dir, case.name)
    return {"case": case.name, "status": "done", "record": written, "seconds": round(time.perf_counter() - started, 3)}


def _safe_process(case: Case, cache_dir: Path, data_cfg: DataConfig, data_hash: str, register: str) -> dict[str, Any]:
    try:
        return process_case(case, cache_dir, data_cfg, data_hash, register)
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the others
        return {"case": case.name, "status": "failed", "error": case.failure(exc)}


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Have Linux kill this worker when the job that started it dies, even by SIGKILL.

    Otherwise workers orphaned by a ``kill -9`` of the job wait for work forever, each holding its
    memory and the cache's lock.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the job died before the request took effect
        os._exit(1)


def _init_worker(parent: int) -> None:
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def _pool_context() -> Any:
    # fork starts workers at once (torch and MONAI already imported); elsewhere the platform default.
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


# --------------------------------------------------------------------------------------------------
# the job


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose a cache folder")
    resolved = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents:
            raise UsageError(f"--out {out} lies inside the input folder {folder}; choose a cache folder outside the inputs")


def case_notes(record: dict[str, Any]) -> list[str]:
    """What a case's record tells the user: not a head, a cut field of view, a tile that cuts the body, a
    registered CT that does not cover the MR's body."""
    cut = record.get("tile", {}).get("cut_warning")  # these two are absent in caches of older versions
    notes = list(record.get("body_part", {}).get("notes", [])) + ([cut] if cut else [])
    coverage = record.get("registration", {}).get("coverage", 1.0)
    if coverage < MIN_CT_COVERAGE:
        notes.append(f"the registered CT covers {100 * coverage:.0f} % of the MR's body; the rest is air in its tiles")
    return notes


def _split(records: dict[str, dict[str, Any]], val_cases: int) -> dict[str, str]:
    ids = sorted(records)
    paired = [i for i in ids if records[i].get("paired")]
    n_val = max(0, min(int(val_cases), len(paired), len(ids) - 1))
    val = set(paired[len(paired) - n_val:]) if n_val else set()
    return {i: ("val" if i in val else "train") for i in ids}


def run(
    out: str | os.PathLike,
    data: Optional[str | os.PathLike] = None,
    mr_dir: Optional[str | os.PathLike] = None,
    ct_dir: Optional[str | os.PathLike] = None,
    config: Any = None,
    overrides: Sequence[str] = (),
    workers: int = 1,
    quiet: bool = False,
    register: str = "none",
) -> dict[str, Any]:
    """Preprocess every case into the tile cache `out`; returns a summary (also printed in one line).

    The summary holds ``cache``, ``manifest``, ``cases`` (found), ``done``, ``skipped``, ``failed``,
    ``tiles`` (in the manifest), ``train`` / ``val`` (case counts), ``failures`` (messages) and
    ``warnings`` (case id -> one line: not a head, a field of view or a tile that cuts the body).
    `config` is a YAML path, a :class:`~medcycle.config.Config` or None (defaults); `overrides` are
    ``KEY=VALUE`` strings. `quiet`: no progress bar. `register` ``rigid`` registers each paired case's CT
    that lies on another grid onto its MR (recorded in the case's record) instead of refusing the case.
    """
    started = time.perf_counter()
    cfg = resolve_config(config, overrides)
    if register not in REGISTRATIONS:
        raise UsageError(f"--register must be one of {', '.join(REGISTRATIONS)}, got {register!r}")
    if data is None and mr_dir is None:
        raise UsageError("preprocess needs --data DIR (SynthRAD layout) or --mr-dir DIR (with --ct-dir DIR)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
    out = Path(out)
    inputs = [Path(p) for p in (data, mr_dir, ct_dir) if p is not None]
    _check_output(out, inputs)

    cases: list[Case] = []
    ignored: list[str] = []
    if data is not None:
        found, ignored = synthrad_cases(Path(data), skip=[out])
        cases += found
    for folder, role in ((mr_dir, "mr"), (ct_dir, "ct")):
        if folder is not None:
            cases += modality_cases(Path(folder), role)
    if not cases:
        where = Path(data) if data is not None else Path(mr_dir)
        hint = "; for a flat folder of volumes use --mr-dir/--ct-dir" if data is not None and any(
            p.is_file() and volume_suffix(p) for p in Path(data).iterdir()) else ""
        raise InputError(f"{where}: no cases found (expected {where}/<case>/mr.nii.gz, optional ct.*, mask.*){hint}")
    seen: dict[str, Case] = {}
    for case in cases:
        if case.name in seen:
            raise InputError(f"{case.origin}: case id '{case.name}' is also used by {seen[case.name].origin}; "
                             "rename one of them")
        seen[case.name] = case
    cases.sort(key=lambda c: c.name)

    with cache.lock(out):
        return _run_locked(cases, ignored, out, cfg, workers, data, mr_dir, ct_dir, register, quiet, started)


def _run_locked(cases: list[Case], ignored: list[str], out: Path, cfg: Any, workers: int,
                data: Optional[str | os.PathLike], mr_dir: Optional[str | os.PathLike],
                ct_dir: Optional[str | os.PathLike], register: str, quiet: bool, started: float) -> dict[str, Any]:
    """Process `cases` into the cache `out` (whose lock the caller holds) and write its manifest."""
    from tqdm import tqdm

    from medcycle.console import progress, seconds
    from medcycle.console import summary as summary_line

    data_cfg = cfg.data
    data_hash = config_hash(data_cfg)
    try:
        (out / cache.CASES).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the cache folder ({exc.strerror or exc})") from None

    import medcycle.transforms  # noqa: F401 - torch and MONAI, imported once here so forked workers share them

    results: dict[str, dict[str, Any]] = {}
    bar = progress(total=len(cases), desc="preprocess", unit="case", quiet=quiet)

    def collect(result: dict[str, Any]) -> None:
        results[result["case"]] = result
        if result["status"] == "failed":
            tqdm.write(f"medcycle preprocess: {result['error']}", file=sys.stderr)
        bar.set_postfix_str(result["case"])
        bar.update(1)

    try:
        n_workers = min(workers, len(cases))
        if n_workers <= 1:
            for case in cases:
                collect(_safe_process(case, out, data_cfg, data_hash, register))
        else:
            pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context(), initializer=_init_worker,
                                       initargs=(os.getpid(),))
            try:
                futures = {pool.submit(_safe_process, case, out, data_cfg, data_hash, register): case for case in cases}
                for future in as_completed(futures):
                    case = futures[future]
                    try:
                        collect(future.result())
                    except BrokenProcessPool as exc:  # a worker died (e.g. killed for memory)
                        collect({"case": case.name, "status": "failed",
                                 "error": f"{case.origin}: the worker process died ({exc or 'out of memory?'})"})
            except BaseException:  # Ctrl-C: do not wait for the queued cases; finished ones are kept
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()

    finished = {cid: r["record"] for cid, r in results.items() if r["status"] in ("done", "skipped")}
    splits = _split(finished, data_cfg.val_cases)
    entries = {
        cid: {
            "split": splits[cid],
            "mr": "mr" in record["modalities"],
            "ct": "ct" in record["modalities"],
            "paired": bool(record["paired"]),
            "n_tiles": int(record["n_tiles"]),
            **({"head": bool(record["body_part"]["is_head"])} if "body_part" in record else {}),
        }
        for cid, record in finished.items()
    }
    notes = {cid: "; ".join(case_notes(record)) for cid, record in sorted(finished.items()) if case_notes(record)}
    manifest_path = out / cache.MANIFEST
    if entries:
        extra = {"inputs": {"data": str(Path(data).resolve()) if data is not None else None,
                            "mr_dir": str(Path(mr_dir).resolve()) if mr_dir is not None else None,
                            "ct_dir": str(Path(ct_dir).resolve()) if ct_dir is not None else None}}
        cache.write_manifest(out, cfg.to_dict()["data"], data_hash, entries, extra)
    else:
        manifest_path.unlink(missing_ok=True)

    failures = [r["error"] for r in results.values() if r["status"] == "failed"]
    summary = {
        "cache": str(out),
        "manifest": str(manifest_path) if entries else None,
        "cases": len(cases),
        "done": sum(r["status"] == "done" for r in results.values()),
        "skipped": sum(r["status"] == "skipped" for r in results.values()),
        "failed": len(failures),
        "tiles": sum(e["n_tiles"] for e in entries.values()),
        "train": sum(e["split"] == "train" for e in entries.values()),
        "val": sum(e["split"] == "val" for e in entries.values()),
        "failures": failures,
        "ignored": ignored,
        "warnings": notes,
    }
    for cid, note in notes.items():  # one line per case, before the summary line (also with --quiet: warnings)
        print(f"medcycle preprocess: warning: {cid}: {note}", file=sys.stderr)
    summary_line(
        "preprocess",
        f"{summary['done']} done, {summary['skipped']} skipped (unchanged), {summary['failed']} failed, "
        f"of {summary['cases']} cases; {summary['tiles']} tiles ({summary['train']} train / {summary['val']} val cases)"
        f" -> {out} in {seconds(time.perf_counter() - started)}"
        + (f"; ignored folders without mr.*/ct.*: {', '.join(ignored)}" if ignored else "")
    )
    if failures:
        failed_ids = sorted(cid for cid, r in results.items() if r["status"] == "failed")
        listed = "; ".join(failures[:MAX_LISTED_FAILURES])
        more = f"; and {len(failures) - MAX_LISTED_FAILURES} more" if len(failures) > MAX_LISTED_FAILURES else ""
        raise MedcycleError(f"{len(failures)} of {len(cases)} cases failed ({', '.join(failed_ids)}): {listed}{more}")
    return summary


__all__ = ["process_case", "run"]
