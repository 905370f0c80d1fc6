"""File-system safety: volume file names, atomic writes, checksums and output checks.

Every output medcycle writes goes through :func:`atomic_write` (a temporary name beside the target,
renamed only on success), and every output path is checked before any heavy work
(:func:`check_output_location`, :func:`refuse_overwriting`), so a failure never leaves a partial file
and an input is never written over, whatever path (symbolic or hard link) names it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

from medcycle.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
#: every volume suffix medcycle reads, longest first (".nii.gz" before ".nii")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
TEMPORARY_PREFIX = ".tmp-"


def volume_suffix(path: str | os.PathLike) -> Optional[str]:
    """The volume suffix of a file name (lower case), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if name.endswith(suffix)), None)


def stem(path: Path) -> str:
    """A volume's name without its suffix (``case.nii.gz`` -> ``case``); a folder's name as it is."""
    suffix = volume_suffix(path) if not path.is_dir() else None
    return path.name[: -len(suffix)] if suffix else path.name


def is_volume_path(path: Path) -> bool:
    """True for a file with a volume suffix or a folder (a DICOM series)."""
    return path.is_dir() or volume_suffix(path) is not None


def inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies below it (after resolving links)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` name the same file: the same path, a symbolic link or a hard link to it."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwriting(output: Path, inputs: Iterable[tuple[Optional[Path], str]]) -> None:
    """Refuse an output that is one of the inputs; `inputs` holds ``(path, what)`` pairs (e.g. the mask)."""
    for path, what in inputs:
        if path is not None and same_file(output, path):
            raise InputError(f"{output}: the output path is the {what}; choose another output file")


def file_checksum(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of every file of a folder (a DICOM series), in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); rename it onto `path` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot create the output folder ({exc.strerror})") from None
    tmp = path.parent / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield tmp
        if tmp.is_dir():
            if path.exists():
                raise InputError(f"{path}: already exists")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def check_output_location(path: Path) -> None:
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


__all__ = [
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "atomic_write",
    "check_output_location",
    "file_checksum",
    "inside",
    "is_volume_path",
    "refuse_overwriting",
    "same_file",
    "stem",
    "volume_suffix",
]
