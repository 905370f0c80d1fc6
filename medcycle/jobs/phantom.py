"""`medcycle phantom`: write synthetic paired MR/CT head cases in the SynthRAD2023 layout.

``OUT/phantom_000/{mr,ct,mask,labels}.nii.gz``, ``OUT/phantom_001/...``: see
:mod:`medcycle.data.phantom` for what the cases hold. Case ``i`` of a seed is the same whatever the
number of cases, so a larger ``--cases`` extends an earlier run. A case folder that already holds all
four files is skipped (a killed run resumes where it stopped); one that lacks some gets the missing
files, regenerated from the seed (files are written atomically, so a file present is complete).
Existing files are checked (grid in the header) against the requested seed and size, so a folder
from another run is refused instead of mixed with it. A progress bar (none when ``quiet``), then one
summary line.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from medcycle.errors import InputError, UsageError


def _check_arguments(cases: object, seed: object, size: object) -> None:
    from medcycle.data.phantom import SIZES

    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise UsageError(f"--cases must be an integer >= 1, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    if size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(sorted(SIZES))}, got {size!r}")


def _existing(folder: Path, shape: tuple[int, ...], affine: np.ndarray) -> list[str]:
    """Names of the case files already in `folder`; refuses any that lies on another grid."""
    import nibabel as nib

    from medcycle.data.phantom import FILES

    present = []
    for name in FILES:
        path = folder / name
        if not path.exists():
            continue
        try:
            header = nib.load(str(path)).header
            same = tuple(header.get_data_shape()) == tuple(shape) and np.allclose(header.get_sform(), affine, atol=1e-4)
        except Exception:  # noqa: BLE001 - unreadable: certainly not one of ours
            same = False
        if not same:
            raise InputError(f"{path}: is not this phantom case (written with another --seed or --size?); "
                             "remove the folder or choose another --out")
        present.append(name)
    return present


def run(out: str | os.PathLike, cases: int = 8, seed: int = 0, size: str = "full", quiet: bool = False) -> list[Path]:
    """Write `cases` phantom cases of `seed` under `out`; returns the case folders (in order).

    Raises :class:`~medcycle.errors.UsageError` for bad arguments and
    :class:`~medcycle.errors.InputError` when `out` cannot be used.
    """
    from medcycle.console import grid, progress, seconds, summary
    from medcycle.data.phantom import FILES, case_grid, case_name, make_case, write_case
    from medcycle.image import spacing_of

    _check_arguments(cases, seed, size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose an output folder")
    started = time.perf_counter()
    folders = [out / case_name(index) for index in range(int(cases))]
    written = 0
    for index, folder in enumerate(progress(folders, desc="phantom", unit="case", quiet=quiet)):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; remove it or choose another --out")
        shape, affine = case_grid(int(seed), index, size)
        missing = [name for name in FILES if name not in _existing(folder, shape, affine)] if folder.is_dir() else list(FILES)
        if missing:
            write_case(folder, make_case(int(seed), index, size), names=missing)
            written += 1
    count = f"{written} cases" if written == len(folders) else \
        f"{written} of {len(folders)} cases ({len(folders) - written} already there)"
    summary("phantom", f"wrote {count} in {out} ({grid(shape, spacing_of(affine))}, seed {seed}) "
                       f"in {seconds(time.perf_counter() - started)}")
    return folders
