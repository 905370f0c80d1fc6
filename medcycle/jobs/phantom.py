"""`medcycle phantom`: write synthetic paired MR/CT head cases in the SynthRAD2023 layout.

``OUT/phantom_000/{mr,ct,mask,labels}.nii.gz``, ``OUT/phantom_001/...``: see
:mod:`medcycle.data.phantom` for what the cases hold. With ``from_ct``, also a pair on real anatomy
per real head CT, ``OUT/pair_<name>/``: the CT and an MR rendered from its tissues
(:func:`medcycle.data.phantom.case_from_ct`). Case ``i`` of a seed is the same whatever the
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
from typing import Optional, Sequence

import numpy as np

from medcycle.errors import InputError, UsageError
from medcycle.files import inside, stem


def _check_arguments(cases: object, seed: object, size: object, least: int) -> None:
    from medcycle.data.phantom import SIZES

    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < least:
        raise UsageError(f"--cases must be an integer >= {least}, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    if size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(sorted(SIZES))}, got {size!r}")


def _existing(folder: Path, shape: tuple[int, ...], affine: np.ndarray,
              hint: str = "written with another --seed or --size?") -> list[str]:
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
            raise InputError(f"{path}: is not this phantom case ({hint}); remove the folder or choose another --out")
        present.append(name)
    return present


def _real_cts(paths: Sequence[str | os.PathLike], out: Path) -> list[Path]:
    """Each CT volume or DICOM series of `paths`; a folder that is no series stands for the CTs in it (not
    `out`, which may lie there)."""
    from medcycle.cases import modality_cases
    from medcycle.io import is_dicom_series

    cts: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"{path}: no such CT file or folder")
        if path.is_dir() and not is_dicom_series(path):
            cts += [case.volumes["ct"] for case in modality_cases(path, "ct") if not inside(out, case.volumes["ct"])]
        else:
            cts.append(path)
    return cts


def _pair_from_ct(ct_path: Path, folder: Path, seed: int) -> bool:
    """Write the pair on real anatomy of `ct_path` into `folder` unless it is there; True when written."""
    from medcycle.data.phantom import FILES, case_from_ct, write_case
    from medcycle.image import affine_of, voxels
    from medcycle.io import load_volume
    from medcycle.transforms.loading import check_modality

    image = load_volume(ct_path)
    check_modality(image, "ct")
    affine = affine_of(image)
    present = _existing(folder, voxels(image).shape, affine, f"made from another CT than {ct_path}?") \
        if folder.is_dir() else []
    missing = [name for name in FILES if name not in present]
    if missing:
        write_case(folder, case_from_ct(voxels(image), affine, seed, folder.name), names=missing)
    return bool(missing)


def run(out: str | os.PathLike, cases: Optional[int] = None, seed: int = 0, size: str = "full", quiet: bool = False,
        from_ct: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write `cases` phantom cases of `seed` under `out` (default 8, none when `from_ct` is given), and a pair
    on real anatomy per CT of `from_ct` (files, DICOM series, folders of them); returns the case folders.

    Raises :class:`~medcycle.errors.UsageError` for bad arguments and
    :class:`~medcycle.errors.InputError` when `out` cannot be used.
    """
    from medcycle.console import grid, progress, seconds, summary
    from medcycle.data.phantom import FILES, case_grid, case_name, make_case, write_case
    from medcycle.image import spacing_of

    if isinstance(from_ct, (str, os.PathLike)):
        from_ct = [from_ct]
    cases = (0 if from_ct else 8) if cases is None else cases
    _check_arguments(cases, seed, size, least=0 if from_ct else 1)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose an output folder")
    started = time.perf_counter()
    cts = _real_cts(from_ct, out)
    pairs = {}
    for ct_path in cts:
        folder = out / f"pair_{stem(ct_path)}"
        if folder in pairs and pairs[folder].resolve() == ct_path.resolve():
            continue  # the same CT given twice
        if folder in pairs:
            raise InputError(f"{ct_path}: has the name of {pairs[folder]}; two pairs would share {folder}")
        pairs[folder] = ct_path
    folders = [out / case_name(index) for index in range(int(cases))] + list(pairs)
    written = 0
    for index, folder in enumerate(progress(folders, desc="phantom", unit="case", quiet=quiet)):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; remove it or choose another --out")
        if folder in pairs:
            written += _pair_from_ct(pairs[folder], folder, int(seed))
            continue
        shape, affine = case_grid(int(seed), index, size)
        missing = [name for name in FILES if name not in _existing(folder, shape, affine)] if folder.is_dir() else list(FILES)
        if missing:
            write_case(folder, make_case(int(seed), index, size), names=missing)
            written += 1
    count = (f"{written} case{'s' * (written != 1)}" if written == len(folders) else
             f"{written} of {len(folders)} cases ({len(folders) - written} already there)")
    what = f"{grid(shape, spacing_of(affine))}, seed {seed}" if cases else ""
    if pairs:
        what = "; ".join(([f"{cases} phantom: {what}"] if cases else []) + [f"{len(pairs)} on real anatomy"])
    summary("phantom", f"wrote {count} in {out} ({what}) in {seconds(time.perf_counter() - started)}")
    return folders
