"""File-system safety: volume file names, atomic writes, checksums and output checks.

Every output medcycle writes goes through :func:`atomic_write` (a temporary name beside the target,
renamed only on success), and every output path is checked before any heavy work
(:func:`check_output_location`, :func:`refuse_overwriting`), so a failure never leaves a partial file
and an input is never written over, whatever path (symbolic or hard link) names it. A job holds
:func:`output_lock` on each output while it decides about and writes it, so two medcycle processes
never write one output together, and the temporaries a killed writer left are removed then.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
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
LOCK_SUFFIX = ".lock"


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


def temporary_name(path: Path) -> str:
    """A fresh name for a temporary copy of `path`, beside it (what :func:`stale_temporaries` finds)."""
    return f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}"


def stale_temporaries(path: Path) -> list[Path]:
    """The temporaries of `path` beside it (files or folders ``.tmp-<8 hex>-<name>``).

    Only stale while no process holds :func:`output_lock` on `path`: a killed writer left them.
    """
    pattern = re.compile(rf"{re.escape(TEMPORARY_PREFIX)}[0-9a-f]{{8}}-{re.escape(path.name)}")
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:  # no parent folder yet: nothing left behind
        return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the folders this call created, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    for each in reversed(missing):
        try:
            each.mkdir()
        except FileExistsError:  # made by another process meanwhile: not ours to remove
            continue
        except OSError as exc:
            _remove_empty(created[::-1])
            raise InputError(f"{each}: cannot create the output folder ({exc.strerror or exc})") from None
        created.append(each)
    return created[::-1]


def _remove_empty(folders: Iterable[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # holds something now (the output)
            return


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, lock_file: Optional[str | os.PathLike] = None) -> Iterator[Path]:
    """Hold an exclusive lock on the output `target` (a file or folder) for the ``with`` block.

    The lock is ``fcntl.flock`` on `lock_file` (default ``.<name>.lock`` beside `target`), taken
    without waiting: a second medcycle process writing `target` is refused in one line. Holding it,
    the temporaries a killed writer of `target` left (:func:`stale_temporaries`) are removed. On exit
    the lock file is removed, and the folders made for it if they stayed empty. Yields the lock file.
    """
    target = Path(target)
    lock = Path(lock_file) if lock_file is not None else target.parent / f".{target.name}{LOCK_SUFFIX}"
    created = _make_folders(lock.parent)
    try:
        descriptor = _acquire(lock, target)
        try:
            for leftover in stale_temporaries(target):
                _remove(leftover)
            yield lock
        finally:
            lock.unlink(missing_ok=True)  # while still locked: the next writer creates a fresh file
            os.close(descriptor)
    finally:
        _remove_empty(created)


def _acquire(lock: Path, target: Path) -> int:
    while True:
        try:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InputError(f"{target}: cannot create the lock file {lock} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise InputError(f"{target}: another medcycle process is writing it (lock file {lock}); "
                             "wait for it to finish or choose another output") from None
        # the holder before us may have removed the file after we opened it: then our lock is on an
        # orphan inode that no later writer sees, so take the lock again on the file now there
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        opened = os.fstat(descriptor)
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())  # who holds it, for a curious user
            return descriptor
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); rename it onto `path` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot create the output folder ({exc.strerror})") from None
    tmp = path.parent / temporary_name(path)
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
    "output_lock",
    "refuse_overwriting",
    "same_file",
    "stale_temporaries",
    "stem",
    "temporary_name",
    "volume_suffix",
]
