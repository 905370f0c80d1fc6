"""`medcycle preprocess`: MR/CT volumes become a cache of normalised 2D (2.5D) tiles for training.

Inputs, either or both:

* ``data``: the SynthRAD layout ``DATA/<case>/mr.*`` with optional ``ct.*`` and ``mask.*``
  (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd`` or a DICOM-series folder named ``mr``/``ct``/
  ``mask``; names are matched case-insensitively). A case with MR and CT is paired; the CT must lie
  on the MR's grid. ``DATA`` holding ``mr.*`` itself is one case named after the folder.
* ``mr_dir`` / ``ct_dir``: the unpaired layout, each a flat folder of volumes (or of DICOM-series
  sub-folders). Every entry is its own unpaired case, MR-only (id ``mr_<name>``) or CT-only
  (id ``ct_<name>``), ``<name>`` being the file name without its volume suffix.

Per case (:func:`process_case`): the source checksums (sha256) are compared with the case's
``record.json``; an unchanged case under the same data config is skipped. Otherwise the shared MONAI
chain (:func:`medcycle.transforms.volume_transforms`) orients, resamples, masks and normalises the
volumes, :func:`medcycle.transforms.extract_tiles` cuts the tiles (MR and CT on the same slices and
crop), and :func:`medcycle.data.cache.write_case` writes the arrays and then the record, atomically.
Finally ``manifest.json`` lists every finished case with its split: the last ``data.val_cases``
paired cases (sorted ids) are ``val`` (at least one case is left for training), the rest ``train``.

A failing case is reported as ``<path>: <reason>`` and the others go on; the job then raises
:class:`~medcycle.errors.MedcycleError` (exit 1) listing the failed cases. Inputs are only read.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from medcycle.config import Config, DataConfig, config_hash, load_config
from medcycle.data import cache
from medcycle.errors import InputError, MedcycleError, UsageError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")  # longest first
ROLES = ("mr", "ct", "mask")
MAX_LISTED_FAILURES = 5


@dataclass
class CaseSpec:
    """One case to preprocess: its id, its source per role (mr / ct / mask) and where it came from."""

    case_id: str
    origin: Path  # the case folder (SynthRAD) or the volume (unpaired); named in messages
    sources: dict[str, Path] = field(default_factory=dict)
    problem: Optional[str] = None  # a reason the case cannot be processed, found while discovering it

    @property
    def paired(self) -> bool:
        return "mr" in self.sources and "ct" in self.sources


# --------------------------------------------------------------------------------------------------
# discovering cases


def _suffix(name: str) -> Optional[str]:
    lower = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


def _stem(path: Path) -> str:
    suffix = _suffix(path.name) if path.is_file() else None
    return path.name[: -len(suffix)] if suffix else path.name


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _find_roles(folder: Path) -> tuple[dict[str, Path], Optional[str]]:
    """{role: path} of the mr/ct/mask volumes in a SynthRAD case folder, and a problem if ambiguous."""
    found: dict[str, list[Path]] = {role: [] for role in ROLES}
    for entry in _visible(folder):
        if entry.is_dir():
            role = entry.name.lower()
        else:
            suffix = _suffix(entry.name)
            role = entry.name[: -len(suffix)].lower() if suffix else None
        if role in found:
            found[role].append(entry)
    sources, problem = {}, None
    for role, paths in found.items():
        if len(paths) > 1 and problem is None:
            problem = f"{folder}: holds several {role} volumes ({', '.join(p.name for p in paths)}); keep one"
        if paths:
            sources[role] = paths[0]
    return sources, problem


def discover_synthrad(data: Path, skip: Iterable[Path] = ()) -> tuple[list[CaseSpec], list[str]]:
    """Cases of the SynthRAD layout under `data`, and the names of folders ignored (no mr/ct)."""
    if not data.exists():
        raise InputError(f"{data}: no such data folder")
    if not data.is_dir():
        raise InputError(f"{data}: not a folder (expected DATA/<case>/mr.nii.gz ...)")
    skip = {p.resolve() for p in skip}
    sources, problem = _find_roles(data)
    if "mr" in sources or "ct" in sources:  # DATA is itself one case
        return [CaseSpec(data.name, data, sources, problem)], []
    cases, ignored = [], []
    for folder in _visible(data):
        if not folder.is_dir() or folder.resolve() in skip:
            continue
        sources, problem = _find_roles(folder)
        if "mr" not in sources and "ct" not in sources:
            ignored.append(folder.name)
            continue
        cases.append(CaseSpec(folder.name, folder, sources, problem))
    return cases, ignored


def discover_flat(folder: Path, role: str) -> list[CaseSpec]:
    """Unpaired cases: every volume (or DICOM-series sub-folder) of `folder`, id ``<role>_<name>``."""
    if not folder.exists():
        raise InputError(f"{folder}: no such {role.upper()} folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a folder of {role.upper()} volumes)")
    cases = []
    for entry in _visible(folder):
        if entry.is_dir() or _suffix(entry.name):
            cases.append(CaseSpec(f"{role}_{_stem(entry)}", entry, {role: entry}))
    if not cases:
        raise InputError(f"{folder}: no {role.upper()} volumes found (expected .nii.gz, .nii, .mha, .nrrd files "
                         "or DICOM-series folders)")
    return cases


# --------------------------------------------------------------------------------------------------
# one case


def _geometry(affine: Any, shape: Sequence[int]) -> dict[str, Any]:
    affine = np.asarray(affine, dtype=np.float64)
    return {
        "affine": affine.tolist(),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
    }


def process_case(spec: CaseSpec, cache_dir: Path, data_cfg: DataConfig, data_hash: str) -> dict[str, Any]:
    """Preprocess one case into the cache (or skip it when its record is current); returns a summary."""
    from medcycle.transforms import ORIGINAL_AFFINE_KEY, ORIGINAL_SHAPE_KEY, extract_tiles, plan_tiles, volume_transforms

    from medcycle.io import file_checksum

    if spec.problem:
        raise InputError(spec.problem)
    started = time.perf_counter()
    checksums = {role: file_checksum(path) for role, path in spec.sources.items()}
    previous = cache.read_record(cache_dir, spec.case_id)
    if cache.record_is_current(previous, cache_dir, spec.case_id, checksums, data_hash):
        return {"case": spec.case_id, "status": "skipped", "record": previous}

    keys = [role for role in ROLES if role in spec.sources]
    volumes = volume_transforms(data_cfg, keys)({role: str(spec.sources[role]) for role in keys})
    images = {role: volumes[role] for role in ("mr", "ct") if role in volumes}
    plan = plan_tiles(volumes["mask"], data_cfg)
    tiles, mask_tiles, slices = extract_tiles(images, volumes["mask"], data_cfg, plan=plan)
    if len(slices) == 0:
        raise InputError(f"{spec.origin}: no axial slice has a body fraction >= {data_cfg.min_body_fraction} in its "
                         f"{data_cfg.tile_size}x{data_cfg.tile_size} tile (empty body mask?)")
    reference = images["mr"] if "mr" in images else images["ct"]
    normalisation: dict[str, Any] = {"ct_window": [float(v) for v in data_cfg.ct_window]}
    if "mr" in images:
        normalisation.update(mr_low=float(images["mr"].meta["mr_low"]), mr_high=float(images["mr"].meta["mr_high"]),
                             mr_percentiles=[float(p) for p in data_cfg.mr_percentiles])
    record = {
        "data_config_hash": data_hash,
        "paired": spec.paired,
        "modalities": [m for m in ("mr", "ct") if m in images],
        "sources": {role: {"path": str(Path(spec.sources[role]).resolve()), "sha256": checksums[role]} for role in keys},
        "mask": volumes["mask"].meta.get("mask_source", "given" if "mask" in keys else "computed"),
        "geometry": {
            "original": _geometry(reference.meta[ORIGINAL_AFFINE_KEY], reference.meta[ORIGINAL_SHAPE_KEY]),
            "resampled": _geometry(reference.affine, reference.shape[1:]),
            "orientation": data_cfg.orientation,
        },
        "normalisation": normalisation,
        "tile": {"start": [int(v) for v in plan.start], "size": int(data_cfg.tile_size),
                 "context_slices": int(data_cfg.context_slices), "axis": 2},
        "slices": [int(s) for s in slices],
        "n_tiles": int(len(slices)),
    }
    del volumes, images, reference
    cache.write_case(cache_dir, spec.case_id, {**tiles, "mask": mask_tiles}, record)
    written = cache.read_record(cache_dir, spec.case_id)
    return {"case": spec.case_id, "status": "done", "record": written, "seconds": round(time.perf_counter() - started, 3)}


def _failure_message(spec: CaseSpec, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MedcycleError):  # these name their file already
        return text
    return f"{spec.origin}: {type(exc).__name__}: {text}" if text else f"{spec.origin}: {type(exc).__name__}"


def _safe_process(spec: CaseSpec, cache_dir: Path, data_cfg: DataConfig, data_hash: str) -> dict[str, Any]:
    try:
        return process_case(spec, cache_dir, data_cfg, data_hash)
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the others
        return {"case": spec.case_id, "status": "failed", "error": _failure_message(spec, exc)}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def _pool_context() -> Any:
    # fork starts workers at once (torch and MONAI already imported); elsewhere the platform default.
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


# --------------------------------------------------------------------------------------------------
# the job


def _resolve_config(config: Any, overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        if not overrides:
            return config.validate()
        from medcycle.config import _apply_override

        tree = config.to_dict()
        for assignment in overrides:
            _apply_override(tree, assignment)
        return Config.from_dict(tree).validate()
    return load_config(config, overrides)


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose a cache folder")
    resolved = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents:
            raise UsageError(f"--out {out} lies inside the input folder {folder}; choose a cache folder outside the inputs")


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
) -> dict[str, Any]:
    """Preprocess every case into the tile cache `out`; returns a summary.

    The summary holds ``cache``, ``manifest``, ``cases`` (found), ``done``, ``skipped``, ``failed``,
    ``tiles`` (in the manifest), ``train`` / ``val`` (case counts) and ``failures`` (messages).
    `config` is a YAML path, a :class:`~medcycle.config.Config` or None (defaults); `overrides` are
    ``KEY=VALUE`` strings.
    """
    from tqdm import tqdm

    cfg = _resolve_config(config, overrides)
    if data is None and mr_dir is None:
        raise UsageError("preprocess needs --data DIR (SynthRAD layout) or --mr-dir DIR (with --ct-dir DIR)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
    out = Path(out)
    inputs = [Path(p) for p in (data, mr_dir, ct_dir) if p is not None]
    _check_output(out, inputs)

    specs: list[CaseSpec] = []
    ignored: list[str] = []
    if data is not None:
        found, ignored = discover_synthrad(Path(data), skip=[out])
        specs += found
    for folder, role in ((mr_dir, "mr"), (ct_dir, "ct")):
        if folder is not None:
            specs += discover_flat(Path(folder), role)
    if not specs:
        where = Path(data) if data is not None else Path(mr_dir)
        hint = "; for a flat folder of volumes use --mr-dir/--ct-dir" if data is not None and any(
            p.is_file() and _suffix(p.name) for p in Path(data).iterdir()) else ""
        raise InputError(f"{where}: no cases found (expected {where}/<case>/mr.nii.gz, optional ct.*, mask.*){hint}")
    seen: dict[str, CaseSpec] = {}
    for spec in specs:
        if spec.case_id in seen:
            raise InputError(f"{spec.origin}: case id '{spec.case_id}' is also used by {seen[spec.case_id].origin}; "
                             "rename one of them")
        seen[spec.case_id] = spec
    specs.sort(key=lambda s: s.case_id)

    data_cfg = cfg.data
    data_hash = config_hash(data_cfg)
    try:
        (out / cache.CASES).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the cache folder ({exc.strerror or exc})") from None

    import medcycle.transforms  # noqa: F401 - torch and MONAI, imported once here so forked workers share them

    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(specs), desc="preprocess", unit="case", file=sys.stderr, dynamic_ncols=True)

    def collect(result: dict[str, Any]) -> None:
        results[result["case"]] = result
        if result["status"] == "failed":
            tqdm.write(f"medcycle preprocess: {result['error']}", file=sys.stderr)
        bar.set_postfix_str(result["case"])
        bar.update(1)

    try:
        n_workers = min(workers, len(specs))
        if n_workers <= 1:
            for spec in specs:
                collect(_safe_process(spec, out, data_cfg, data_hash))
        else:
            pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context(), initializer=_init_worker)
            try:
                futures = {pool.submit(_safe_process, spec, out, data_cfg, data_hash): spec for spec in specs}
                for future in as_completed(futures):
                    spec = futures[future]
                    try:
                        collect(future.result())
                    except BrokenProcessPool as exc:  # a worker died (e.g. killed for memory)
                        collect({"case": spec.case_id, "status": "failed",
                                 "error": f"{spec.origin}: the worker process died ({exc or 'out of memory?'})"})
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
        }
        for cid, record in finished.items()
    }
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
        "cases": len(specs),
        "done": sum(r["status"] == "done" for r in results.values()),
        "skipped": sum(r["status"] == "skipped" for r in results.values()),
        "failed": len(failures),
        "tiles": sum(e["n_tiles"] for e in entries.values()),
        "train": sum(e["split"] == "train" for e in entries.values()),
        "val": sum(e["split"] == "val" for e in entries.values()),
        "failures": failures,
        "ignored": ignored,
    }
    print(
        f"preprocess: {summary['done']} done, {summary['skipped']} skipped (unchanged), {summary['failed']} failed, "
        f"of {summary['cases']} cases; {summary['tiles']} tiles ({summary['train']} train / {summary['val']} val cases)"
        f" -> {out}" + (f"; ignored folders without mr.*/ct.*: {', '.join(ignored)}" if ignored else "")
    )
    if failures:
        failed_ids = sorted(cid for cid, r in results.items() if r["status"] == "failed")
        listed = "; ".join(failures[:MAX_LISTED_FAILURES])
        more = f"; and {len(failures) - MAX_LISTED_FAILURES} more" if len(failures) > MAX_LISTED_FAILURES else ""
        raise MedcycleError(f"{len(failures)} of {len(specs)} cases failed ({', '.join(failed_ids)}): {listed}{more}")
    return summary


__all__ = ["CaseSpec", "discover_flat", "discover_synthrad", "process_case", "run"]
