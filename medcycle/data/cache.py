"""The tile cache written by ``medcycle preprocess`` and read by training (layout: docs/ARCHITECTURE.md).

::

    CACHE/manifest.json            format, version, data_config (+ hash), cases {id: split, mr, ct, paired, n_tiles}
    CACHE/cases/<id>/mr.npy        (N, k, T, T) float16 in [-1, 1]   (ct.npy likewise when the case has a CT)
    CACHE/cases/<id>/mask.npy      (N, 1, T, T) uint8 body mask
    CACHE/cases/<id>/record.json   sources (path, sha256), arrays (bytes, sha256), geometry, normalisation,
                                   slices kept

Every file is written to a temporary name and renamed (:func:`medcycle.files.atomic_write`); a case's
``record.json`` is written last, so a case counts as done only when its record exists, names the
current data-config hash and source checksums, and its arrays have the recorded size and sha256 (a
re-run of ``preprocess`` thus redoes a damaged case). Training checks the size (cheap) and the
case's data-config hash against the manifest's. A writer holds :func:`lock` for its whole run.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from medcycle.errors import InputError

FORMAT = "medcycle-cache"
VERSION = 1
RECORD_FORMAT = "medcycle-cache-case"
MANIFEST = "manifest.json"
RECORD = "record.json"
LOCK = ".medcycle.lock"
CASES = "cases"
MODALITIES = ("mr", "ct")


def case_dir(cache_dir: str | os.PathLike, case_id: str) -> Path:
    """The folder of one case in the cache."""
    return Path(cache_dir) / CASES / case_id


def lock(cache_dir: str | os.PathLike) -> Any:
    """The cache's writer lock (a context manager; a lock file inside the cache): one writer at a time."""
    from medcycle.files import output_lock

    return output_lock(cache_dir, lock_file=Path(cache_dir) / LOCK)


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as indented JSON, atomically."""
    from medcycle.files import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def write_array(path: str | os.PathLike, array: np.ndarray) -> dict[str, Any]:
    """Write `array` as .npy, atomically (a killed run never leaves a half-written array under `path`);
    returns what the record keeps of the file written: ``{"bytes", "sha256"}``."""
    from medcycle.files import atomic_write, file_checksum

    path = Path(path)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        written = {"bytes": os.path.getsize(tmp), "sha256": file_checksum(tmp)}
    return written


def _array_names(record: Mapping[str, Any]) -> list[str]:
    """The arrays a case holds: its modalities and the mask."""
    return [*(m for m in MODALITIES if m in (record.get("sources") or {})), "mask"]


def read_record(cache_dir: str | os.PathLike, case_id: str) -> Optional[dict[str, Any]]:
    """A case's record.json, or None when missing or unreadable (the case is then not done)."""
    path = case_dir(cache_dir, case_id) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def record_is_current(record: Optional[Mapping[str, Any]], cache_dir: str | os.PathLike, case_id: str,
                      checksums: Mapping[str, str], data_config_hash: str) -> bool:
    """True when `record` describes the same sources (sha256 per role) and data config, and every array
    is there with the recorded size and sha256 (a truncated or altered array makes the case redone)."""
    from medcycle.files import file_checksum

    if not record or record.get("data_config_hash") != data_config_hash:
        return False
    sources = record.get("sources") or {}
    if set(sources) != set(checksums) or any(sources[k].get("sha256") != v for k, v in checksums.items()):
        return False
    folder = case_dir(cache_dir, case_id)
    arrays = record.get("arrays") or {}
    for name in _array_names(record):
        path, expected = folder / f"{name}.npy", arrays.get(name) or {}
        try:
            if os.path.getsize(path) != expected.get("bytes") or file_checksum(path) != expected.get("sha256"):
                return False
        except OSError:
            return False
    return True


def write_case(cache_dir: str | os.PathLike, case_id: str, arrays: Mapping[str, np.ndarray],
               record: Mapping[str, Any]) -> Path:
    """Write one case: its record is removed first, then every array, then the new record (last) with
    each array's size and sha256. A new case folder is removed again when writing fails."""
    folder = case_dir(cache_dir, case_id)
    new = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / RECORD).unlink(missing_ok=True)  # from here on the case is not done until the end
        for leftover in folder.glob(".tmp-*"):  # temporary files of a run killed while writing
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        for stale in ("mr", "ct", "mask"):
            if stale not in arrays:
                (folder / f"{stale}.npy").unlink(missing_ok=True)
        written = {name: write_array(folder / f"{name}.npy", array) for name, array in arrays.items()}
        payload = {"format": RECORD_FORMAT, "version": VERSION, "case": case_id, **record, "arrays": written}
        return write_json(folder / RECORD, payload)
    except BaseException:
        if new:  # nothing of this case was there before: leave nothing
            shutil.rmtree(folder, ignore_errors=True)
        raise


def write_manifest(cache_dir: str | os.PathLike, data_config: Mapping[str, Any], data_config_hash: str,
                   cases: Mapping[str, Mapping[str, Any]], extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write CACHE/manifest.json for the whole dataset (atomically)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "data_config": dict(data_config),
        "data_config_hash": data_config_hash,
        "cases": {k: dict(cases[k]) for k in sorted(cases)},
    }
    if extra:
        payload.update({k: v for k, v in extra.items() if k not in payload})
    return write_json(Path(cache_dir) / MANIFEST, payload)


# --------------------------------------------------------------------------------------------------
# readers for training


def load_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a cache; refuses a missing or empty folder, no manifest, or a foreign format."""
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        raise InputError(f"{cache_dir}: no such cache folder (run 'medcycle preprocess' first)")
    if not cache_dir.is_dir():
        raise InputError(f"{cache_dir}: not a folder; expected a cache written by 'medcycle preprocess'")
    path = cache_dir / MANIFEST
    if not path.is_file():
        if not any(cache_dir.iterdir()):
            raise InputError(f"{cache_dir}: the cache folder is empty (run 'medcycle preprocess' first)")
        raise InputError(f"{path}: missing; {cache_dir} is not a medcycle cache or its preprocessing did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable medcycle cache manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a medcycle cache manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise InputError(f"{path}: cache format version {manifest.get('version')!r} is not supported (expected {VERSION}); "
                         "re-run 'medcycle preprocess'")
    if not isinstance(manifest.get("cases"), dict) or not isinstance(manifest.get("data_config"), dict):
        raise InputError(f"{path}: the manifest lacks its cases or data_config")
    if not manifest["cases"]:
        raise InputError(f"{path}: the cache holds no cases")
    return manifest


def select_cases(manifest: Mapping[str, Any], split: Optional[str] = None, modality: Optional[str] = None,
                 paired: Optional[bool] = None) -> list[str]:
    """Sorted case ids of a manifest, optionally of one split (train/val), having a modality (mr/ct), paired or not."""
    ids = []
    for case_id, entry in sorted(manifest["cases"].items()):
        if split is not None and entry.get("split") != split:
            continue
        if modality is not None and not entry.get(modality):
            continue
        if paired is not None and bool(entry.get("paired")) != paired:
            continue
        ids.append(case_id)
    return ids


@dataclass
class CaseTiles:
    """The tiles of one cached case (arrays memory-mapped unless loaded with ``mmap=False``)."""

    case_id: str
    mask: np.ndarray  # (N, 1, T, T) uint8
    record: dict[str, Any]
    mr: Optional[np.ndarray] = None  # (N, k, T, T) float16
    ct: Optional[np.ndarray] = None  # (N, k, T, T) float16

    @property
    def n_tiles(self) -> int:
        return int(self.mask.shape[0])

    @property
    def paired(self) -> bool:
        return self.mr is not None and self.ct is not None


def load_case_tiles(cache_dir: str | os.PathLike, case_id: str, mmap: bool = True,
                    data_config_hash: Optional[str] = None) -> CaseTiles:
    """One case's arrays (memory-mapped .npy by default) and record; refuses a missing or broken case.

    Each array must have the size its record says (a cheap check that catches truncation); with
    `data_config_hash` (the manifest's) the case must have been preprocessed under that data config.
    Every refusal names the file and asks for a re-run of ``medcycle preprocess``, which repairs it.
    """
    folder = case_dir(cache_dir, case_id)
    record = read_record(cache_dir, case_id)
    if record is None:
        raise InputError(f"{folder}: case '{case_id}' is not in the cache or was not finished (no record.json)")
    if data_config_hash is not None and record.get("data_config_hash") != data_config_hash:
        raise InputError(f"{folder / RECORD}: case '{case_id}' was preprocessed with another data config than the "
                         "manifest's (two preprocess runs into one cache?); re-run 'medcycle preprocess'")
    sizes = record.get("arrays") or {}
    arrays: dict[str, Optional[np.ndarray]] = {}
    for name in (*MODALITIES, "mask"):
        path = folder / f"{name}.npy"
        if name not in _array_names(record):
            arrays[name] = None
            continue
        expected = (sizes.get(name) or {}).get("bytes")
        try:
            found = os.path.getsize(path)
        except OSError:
            found = None
        if found is None or found != expected:
            state = ("missing" if found is None else "its size is not in the record (an older cache)" if expected is None
                     else f"{found} bytes, the record says {expected} (truncated or changed)")
            raise InputError(f"{path}: {state}; re-run 'medcycle preprocess' to repair the cache")
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot be read ({exc}); re-run 'medcycle preprocess'") from None
    n = record.get("n_tiles")
    for name, array in arrays.items():
        if array is not None and array.shape[0] != n:
            raise InputError(f"{folder / (name + '.npy')}: holds {array.shape[0]} tiles, the record says {n}; "
                             "re-run 'medcycle preprocess'")
    return CaseTiles(case_id=case_id, mask=arrays["mask"], record=record, mr=arrays["mr"], ct=arrays["ct"])


__all__ = [
    "CaseTiles",
    "FORMAT",
    "VERSION",
    "case_dir",
    "load_case_tiles",
    "load_manifest",
    "lock",
    "read_record",
    "record_is_current",
    "select_cases",
    "write_case",
    "write_manifest",
]
