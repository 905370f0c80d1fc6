"""Case layouts: where the MR, CT and mask of each case lie in a user's folders.

Three layouts, found the same way by every job:

* **SynthRAD2023**: ``DATA/<case>/mr.*`` with optional ``ct.*`` and ``mask.*`` (``.nii``, ``.nii.gz``,
  ``.mha``, ``.mhd``, ``.nrrd``, or a DICOM-series folder named ``mr``/``ct``/``mask``; names are
  matched case-insensitively; two volumes of one role in a case are a problem reported for that case).
  ``DATA`` holding ``mr.*`` or ``ct.*`` itself is one case named after the folder.
* **Unpaired two-folder**: a flat folder of volumes (or of DICOM-series sub-folders) per modality;
  every entry is its own case, named ``<role>_<name>``.
* **Flat conversion input**: ``INPUT/<name>.nii.gz`` with an optional ``<name>_mask.*`` beside it
  (files named ``*_sct.*`` are medcycle's outputs and ``*_mask.*`` masks, not cases), and
  sub-folders holding one DICOM series.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from medcycle.errors import InputError, MedcycleError
from medcycle.files import VOLUME_SUFFIXES, inside, stem, volume_suffix

ROLES = ("mr", "ct", "mask")


@dataclass
class Case:
    """One case: its name, where it lies (folder or volume), its volumes by role, and a problem if any."""

    name: str
    origin: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    problem: Optional[str] = None  # why the case cannot be used, found while discovering it

    @property
    def paired(self) -> bool:
        return "mr" in self.volumes and "ct" in self.volumes

    def get(self, role: str) -> Optional[Path]:
        return self.volumes.get(role)

    def failure(self, exc: BaseException) -> str:
        """One line saying why this case failed, for a job that goes on with the other cases.

        A :class:`~medcycle.errors.MedcycleError` names its file already and is kept as it is; any
        other error is ``<origin>: <type>: <first line>`` of its root cause, MONAI's ``applying
        transform <...>`` wrapper removed.
        """
        cause = root_cause(exc)
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if isinstance(cause, MedcycleError):
            return text
        return f"{self.origin}: {type(cause).__name__}: {text}" if text else f"{self.origin}: {type(cause).__name__}"


def root_cause(exc: BaseException) -> BaseException:
    """The error inside MONAI's ``RuntimeError("applying transform ...")`` wrappers (one per level)."""
    while (isinstance(exc, RuntimeError) and str(exc).startswith("applying transform")
           and exc.__cause__ is not None):
        exc = exc.__cause__
    return exc


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def find_named_volume(folder: Path, name: str) -> Optional[Path]:
    """`folder/name.<volume suffix>` (``.nii.gz`` first), or `folder/name/` when it holds a DICOM series."""
    from medcycle.io import is_dicom_series

    for suffix in VOLUME_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    candidate = folder / name
    if candidate.is_dir() and is_dicom_series(candidate):
        return candidate
    return None


def find_roles(folder: Path) -> tuple[dict[str, Path], Optional[str]]:
    """{role: path} of the mr/ct/mask volumes in a SynthRAD case folder, and a problem if ambiguous."""
    found: dict[str, list[Path]] = {role: [] for role in ROLES}
    for entry in _visible(folder):
        if entry.is_dir():
            role = entry.name.lower()
        else:
            suffix = volume_suffix(entry)
            role = entry.name[: -len(suffix)].lower() if suffix else None
        if role in found:
            found[role].append(entry)
    volumes, problem = {}, None
    for role, paths in found.items():
        if len(paths) > 1 and problem is None:
            problem = f"{folder}: holds several {role} volumes ({', '.join(p.name for p in paths)}); keep one"
        if paths:
            volumes[role] = paths[0]
    return volumes, problem


def synthrad_cases(data: Path, skip: Iterable[Path] = ()) -> tuple[list[Case], list[str]]:
    """Cases of the SynthRAD layout under `data` (with an MR or a CT), and the folders ignored."""
    if not data.exists():
        raise InputError(f"{data}: no such data folder")
    if not data.is_dir():
        raise InputError(f"{data}: not a folder (expected DATA/<case>/mr.nii.gz ...)")
    skipped = {p.resolve() for p in skip}
    volumes, problem = find_roles(data)
    if "mr" in volumes or "ct" in volumes:  # DATA is itself one case
        return [Case(data.name, data, volumes, problem)], []
    cases, ignored = [], []
    for folder in _visible(data):
        if not folder.is_dir() or folder.resolve() in skipped:
            continue
        volumes, problem = find_roles(folder)
        if "mr" not in volumes and "ct" not in volumes:
            ignored.append(folder.name)
            continue
        cases.append(Case(folder.name, folder, volumes, problem))
    return cases, ignored


def modality_cases(folder: Path, role: str) -> list[Case]:
    """Unpaired cases: every volume (or DICOM-series sub-folder) of `folder`, named ``<role>_<name>``."""
    if not folder.exists():
        raise InputError(f"{folder}: no such {role.upper()} folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a folder of {role.upper()} volumes)")
    cases = [Case(f"{role}_{stem(entry)}", entry, {role: entry})
             for entry in _visible(folder) if entry.is_dir() or volume_suffix(entry)]
    if not cases:
        raise InputError(f"{folder}: no {role.upper()} volumes found (expected .nii.gz, .nii, .mha, .nrrd files "
                         "or DICOM-series folders)")
    return cases


def mr_cases(folder: Path, skip: Iterable[Path] = ()) -> tuple[list[Case], list[str]]:
    """The MRs to convert in a folder (SynthRAD cases, flat volumes, DICOM series), and the folders ignored.

    Folders in `skip` (the outputs, which may lie inside the input) or holding one of them are passed
    over; an output that is or lies in a case folder is refused (that case would be lost unsaid).
    """
    from medcycle.io import is_dicom_series

    skip = list(skip)
    cases: list[Case] = []
    ignored: list[str] = []
    for entry in _visible(folder):
        if entry.is_dir():
            volumes, problem = find_roles(entry)
            holding = [path for path in skip if inside(path, entry)]
            if holding:
                if "mr" in volumes or is_dicom_series(entry):
                    raise InputError(f"{holding[0]}: is or lies in the input case folder {entry}; "
                                     "write the outputs outside the input's cases")
                continue
            if "mr" in volumes:
                cases.append(Case(entry.name, entry, {r: volumes[r] for r in ("mr", "mask") if r in volumes}, problem))
            elif is_dicom_series(entry):
                cases.append(Case(entry.name, entry, {"mr": entry}))
            else:
                ignored.append(entry.name)
        elif volume_suffix(entry) is not None:
            name = stem(entry)
            if name.endswith(("_sct", "_mask")):  # medcycle's outputs; masks of the flat layout
                continue
            volumes = {"mr": entry}
            mask = find_named_volume(folder, f"{name}_mask")
            if mask is not None:
                volumes["mask"] = mask
            cases.append(Case(name, entry, volumes))
    return cases, ignored


def ct_cases(folder: Path) -> list[Case]:
    """The SynthRAD cases of `folder` that hold a CT (the references of an evaluation), sorted by name."""
    cases = []
    for entry in _visible(folder):
        if entry.is_dir():
            volumes, problem = find_roles(entry)
            if "ct" in volumes:
                cases.append(Case(entry.name, entry, volumes, problem))
    return cases


__all__ = ["Case", "ROLES", "ct_cases", "find_named_volume", "find_roles", "modality_cases", "mr_cases", "root_cause",
           "synthrad_cases"]
