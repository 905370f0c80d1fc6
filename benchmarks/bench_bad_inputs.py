"""The catalogue of hostile inputs of issue 24, each run through the real command line and classified.

    python benchmarks/bench_bad_inputs.py            # about 2-3 minutes on 2 CPU cores
    python benchmarks/bench_bad_inputs.py --fresh    # each command in a fresh `python -m medcycle`
    python benchmarks/bench_bad_inputs.py --keep DIR # keep the inputs and outputs in DIR

Every case builds tiny synthetic data (heads of 32 x 28 x 8 voxels, DICOM series written with
pydicom, a generator 4 filters wide) in a temporary folder and runs one ``medcycle`` command with
``medcycle.cli.main``, the entry point of ``python -m medcycle``. By default each command runs in a
process forked from this one after torch, MONAI and medcycle were imported (a fresh interpreter
costs ~6 s of CPU for the imports alone, 50 of them far more than the whole catalogue);
``--fresh`` runs each as ``python -m medcycle ...`` with ``PYTHONPATH`` set to this repository.
Every command runs with ``--quiet`` (no progress bars), and warnings (``medcycle CMD: warning: ...``,
e.g. that a tiny test head is not head-shaped) are not counted as lines of a refusal.

Each case is classified:

* **refused in one line**: exit != 0, no traceback, stderr at most the lines the case allows
  (one; a folder run: one per failed case plus the final error) and naming the file, nothing left
  behind (the outputs it names, ``.tmp-*`` temporaries, ``.lock`` files);
* **refused unclearly**: refused, but in more lines, without the file, or leaving files;
* **handled correctly**: exit 0 and the output checked right (geometry, values, consistency); the
  two races between writers (two converts, two preprocess runs) run three trials each;
* **refused wrongly**: a valid input refused;
* **traceback**: stderr holds ``Traceback`` (target 0);
* **accepted wrongly**: exit 0 where it must be refused, or an output that is wrong (target 0);
* **inputs changed**: the sha256 of an input differs after the run (target 0).

Cases whose fix belongs to another branch are marked by finding number ("needs" column): F1 DICOM
series reading, F2 body mask robustness, F3 training divergence, F8c/F9c config validation, F5w/F6w
the dataset passing the manifest's hash (``load_case_tiles(..., data_config_hash=...)``); F10t the
train job. Re-run after merging them.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import resource
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

SHAPE = (32, 28, 8)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
AFFINE[:3, 3] = (-24.0, -20.0, -12.0)
TINY_TRAIN = ["data.tile_size=16", "data.spacing=[1.0, 1.0]", "data.val_cases=1", "model.gen_width=4",
              "model.gen_blocks=1", "model.disc_width=4", "model.disc_layers=1", "train.workers=0",
              "train.pool_size=2", "train.amp=none", "train.log_every=1", "train.val_every=1000",
              "train.image_every=1000", "train.checkpoint_every=1000"]
PRE = ["data.tile_size=16", "data.spacing=[1.0, 1.0]", "data.min_body_fraction=0.05"]
TRIALS = 3  # of each race between two writers
MEMORY_LIMIT = 6 << 30  # bytes of address space a forked command may add: a huge allocation fails at once

OUTCOMES = ("refused in one line", "refused unclearly", "handled correctly", "refused wrongly", "traceback",
            "accepted wrongly", "inputs changed")


# --------------------------------------------------------------------------------------------------
# tiny data


def head(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mr, ct, body) of a head-like ellipsoid: MR in scanner units, CT in HU (air -1000, skull 1400)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (grid[0] / 0.8) ** 2 + (grid[1] / 0.75) ** 2 + (grid[2] / 1.6) ** 2
    body, skull, brain = r <= 1.0, (r > 0.55) & (r <= 0.78), r <= 0.55
    mr = np.zeros(shape)
    mr[body], mr[skull] = 700.0, 40.0
    mr[brain] = 420.0 + 60.0 * grid[0][brain] + 30.0 * seed
    mr = np.abs(mr + rng.normal(0.0, 12.0, shape))
    ct = np.full(shape, -1000.0)
    ct[body], ct[skull], ct[brain] = 30.0, 1400.0, 35.0
    return mr.astype(np.float32), ct.astype(np.float32), body


def nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE, dtype=np.int16) -> Path:
    image = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def shifted(by_mm: float = 7.5) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += by_mm
    return affine


def synthrad_case(folder: Path, seed: int, ct_values: Optional[np.ndarray] = None, mask: bool = False) -> Path:
    mr, ct, body = head(seed)
    nifti(folder / "mr.nii.gz", mr)
    nifti(folder / "ct.nii.gz", ct if ct_values is None else ct_values)
    if mask:
        nifti(folder / "mask.nii.gz", body, dtype=np.uint8)
    return folder


def make_checkpoint(path: Path) -> None:
    """A tiny generator checkpoint (as tests/test_convert.py's make_checkpoint)."""
    from medcycle.checkpoint import save_checkpoint
    from medcycle.config import Config, config_hash
    from medcycle.networks import build_generator

    config = Config.from_dict({"data": {"tile_size": 16, "spacing": [1.0, 1.0]},
                               "model": {"gen_width": 4, "gen_blocks": 1, "disc_width": 4, "disc_layers": 1},
                               "train": {"amp": "none"}}).validate()
    generator = build_generator(1, 4, 1)
    save_checkpoint(path, {"config": config.to_dict(), "iteration": 1, "nets": {"G_mr2ct": generator.state_dict()},
                           "preprocessing": {"data_config": config.to_dict()["data"],
                                             "data_config_hash": config_hash(config.data)}})


def dicom_series(folder: Path, seed: int) -> list[Path]:
    from medcycle.dicom import write_ct_series

    mr, _, _ = head(seed)
    return sorted(write_ct_series(folder, mr, AFFINE))


def edit_dicom(files: list[Path], edit: Callable) -> None:
    import pydicom

    for index, path in enumerate(files):
        ds = pydicom.dcmread(str(path))
        if edit(index, ds) is not False:
            ds.save_as(str(path))


def pixdim_zero(path: Path) -> Path:
    raw = bytearray(nifti(path.with_suffix(""), head(1)[0]).read_bytes())  # .nii
    raw[88:92] = struct.pack("<f", 0.0)  # pixdim[3]: nibabel would write 1 instead
    path.with_suffix("").unlink()
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def singular_sform(path: Path, qform_code: int) -> Path:
    image = nib.Nifti1Image(head(1)[0], AFFINE)
    header = image.header
    header.set_qform(AFFINE, code=qform_code)
    header.set_sform(AFFINE, code=1)
    header["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # every slice in one plane, written as it lies on disk
    nib.save(nib.Nifti1Image(image.dataobj, None, header=header), str(path))
    return path


# --------------------------------------------------------------------------------------------------
# running the command line


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float


def _limit_memory() -> None:
    """Cap a fresh interpreter's address space: a huge allocation then fails at once."""
    resource.setrlimit(resource.RLIMIT_AS, (4 * MEMORY_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1]))


class Runner:
    """Runs ``medcycle ARGV`` in a forked warm process (default) or a fresh interpreter."""

    def __init__(self, fresh: bool, logs: Path) -> None:
        self.fresh, self.logs, self.count = fresh, logs, 0

    def start(self, argv: list[str]) -> dict:
        argv = [argv[0], "--quiet", *argv[1:]]  # no progress bars: stderr holds only what the command says
        self.count += 1
        out, err = self.logs / f"{self.count:03d}.out", self.logs / f"{self.count:03d}.err"
        started = time.perf_counter()
        if self.fresh:
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            with open(out, "wb") as o, open(err, "wb") as e:
                process = subprocess.Popen([sys.executable, "-m", "medcycle", *argv], stdout=o, stderr=e, env=env,
                                           preexec_fn=_limit_memory)
            return {"pid": process.pid, "popen": process, "out": out, "err": err, "started": started}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: `python -m medcycle ARGV`, its output to the two files
            code = 1
            try:
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                soft, hard = resource.getrlimit(resource.RLIMIT_AS)
                used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
                resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_LIMIT, hard))
                sys.argv = ["medcycle", *argv]
                try:
                    runpy.run_module("medcycle", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exc:
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:  # noqa: BLE001 - what the interpreter would print
                    traceback.print_exc()
                    code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return {"pid": pid, "popen": None, "out": out, "err": err, "started": started}

    @staticmethod
    def finish(handle: dict, timeout: float = 300.0) -> Result:
        deadline = time.monotonic() + timeout
        if handle["popen"] is not None:
            try:
                code = handle["popen"].wait(timeout)
            except subprocess.TimeoutExpired:
                handle["popen"].kill()
                code = handle["popen"].wait()
        else:
            while True:
                pid, status = os.waitpid(handle["pid"], os.WNOHANG)
                if pid:
                    code = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    os.kill(handle["pid"], signal.SIGKILL)
                time.sleep(0.02)
        return Result(code, handle["out"].read_text(errors="replace"), handle["err"].read_text(errors="replace"),
                      time.perf_counter() - handle["started"])

    def run(self, argv: list[str]) -> Result:
        return self.finish(self.start(argv))


# --------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    name: str
    finding: str  # issue 24's finding number, or "classic"
    expect: str  # "refuse" or "handle"
    argv: Optional[list[str]] = None
    names: str = ""  # what the one-line refusal must contain (the file)
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # must not exist after a refusal
    check: Optional[Callable[[Result], Optional[str]]] = None  # None when the output is right, else why not
    lines: int = 1  # stderr lines a refusal may take
    custom: Optional[Callable[["Runner"], tuple[str, str]]] = None  # runs itself: (outcome, detail)
    needs: str = ""  # the other branch's finding this case waits for
    setup: Optional[Callable[["Runner"], None]] = None  # commands to run first (not classified)
    area: Optional[Path] = None  # the folder its outputs go to: nothing temporary may stay there


def digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            sha.update(str(file).encode())
            sha.update(file.read_bytes() if file.exists() else b"<missing>")
    return sha.hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".tmp-") or p.name.endswith(".lock") or p.name.startswith(".old-"))


def message_lines(stderr: str) -> list[str]:
    """What a command says on stderr, without its warnings (one line per case, e.g. that a tiny test head
    is not head-shaped): a refusal is judged by the lines that refuse."""
    return [line for line in stderr.splitlines() if line.strip() and ": warning: " not in line]


def classify(case: Case, result: Result, changed: bool, left: list[str]) -> tuple[str, str]:
    lines = message_lines(result.stderr)
    first = lines[-1] if lines else ""
    if "Traceback" in result.stderr:
        return "traceback", next((l for l in reversed(lines) if l and not l.startswith(" ")), "")
    if changed:
        return "inputs changed", first
    if result.code != 0:
        if case.expect == "handle":
            return "refused wrongly", first
        problems = []
        if len(lines) > case.lines:
            problems.append(f"{len(lines)} lines")
        if case.names and not any(case.names in line for line in lines):
            problems.append(f"does not name {Path(case.names).name}")
        existing = [str(p.name) for p in case.outputs if p.exists()]
        if existing or left:
            problems.append(f"left {', '.join(existing + left)}")
        return ("refused unclearly", "; ".join(problems) + f": {first}") if problems else ("refused in one line", first)
    if case.expect == "refuse":
        return "accepted wrongly", "exit 0"
    why = case.check(result) if case.check else None
    return ("accepted wrongly", why) if why else ("handled correctly", (result.stdout.strip().splitlines() or [""])[-1])


def sct_check(output: Path, like: Path, body: Optional[np.ndarray] = None,
              dicom: Optional[Path] = None) -> Callable[[Result], Optional[str]]:
    """The sCT is int16 HU on the input's grid; its body (not -1000) matches `body`; the series matches."""

    def check(_: Result) -> Optional[str]:
        if not output.is_file():
            return f"no {output.name}"
        sct, reference = nib.load(str(output)), nib.load(str(like))
        if sct.shape != reference.shape or not np.allclose(sct.affine, reference.affine, atol=1e-4):
            return "grid differs from the input's"
        values = np.asanyarray(sct.dataobj)
        if values.dtype != np.int16 or values.min() < -1024 or values.max() > 3071:
            return f"values {values.dtype} {values.min()}..{values.max()}"
        if body is not None:
            found = values != -1000
            dice = 2 * (found & body).sum() / max(1, found.sum() + body.sum())
            if dice < 0.8:
                return f"body mask wrong (Dice {dice:.2f} with the true body; {100 * found.mean():.1f} % body)"
        if dicom is not None:
            series = read_series(dicom)
            if series is None or series.shape != values.shape or not np.array_equal(series, values):
                return "the DICOM series is not the NIfTI's sCT"
        return None

    return check


def read_series(folder: Path) -> Optional[np.ndarray]:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
        return np.transpose(sitk.GetArrayFromImage(reader.Execute()), (2, 1, 0)).astype(np.int16)
    except RuntimeError:
        return None


def cache_check(cache_dir: Path, done: Optional[int] = None) -> Callable[[Result], Optional[str]]:
    """Every case of the manifest loads, with the manifest's data-config hash and the recorded sizes."""

    def check(result: Result) -> Optional[str]:
        from medcycle.data.cache import load_case_tiles, load_manifest
        from medcycle.errors import MedcycleError

        if done is not None and f"preprocess: {done} done" not in result.stdout:
            return f"expected {done} case(s) redone: {result.stdout.strip()[:80]}"
        try:
            manifest = load_manifest(cache_dir)
            for case_id in manifest["cases"]:
                load_case_tiles(cache_dir, case_id)
                record = json.loads((cache_dir / "cases" / case_id / "record.json").read_text())
                if record["data_config_hash"] != manifest["data_config_hash"]:
                    return f"case {case_id} holds tiles of another data config than the manifest's"
        except MedcycleError as exc:
            return str(exc)
        return None

    return check


def build(t: Path, fresh_model: Path) -> list[Case]:
    """Every case of the catalogue, its inputs written under `t/in`, its outputs under `t/out`."""
    i, o = t / "in", t / "out"
    model = fresh_model
    mr_a, mr_b = nifti(i / "mr_a.nii.gz", head(1)[0]), nifti(i / "mr_b.nii.gz", head(2)[0])
    body = head(1)[2]
    cases: list[Case] = []

    def convert(name: str, finding: str, source: Path, expect: str = "refuse", names: Optional[str] = None,
                extra: tuple = (), output: Optional[Path] = None, inputs: tuple = (), **kwargs) -> Case:
        output = output or o / name / "sct.nii.gz"
        argv = ["convert", "-i", str(source), "-o", str(output), "-m", str(model), "--tta", "none", *extra]
        case = Case(name, finding, expect, argv, names=str(source) if names is None else names,
                    inputs=[source, model, *inputs], outputs=[] if output.exists() else [output],
                    area=output.parent, **kwargs)
        cases.append(case)
        return case

    # ---- convert, file mode: controls
    convert("convert: a good MR (control)", "control", mr_a, "handle",
            check=sct_check(o / "convert: a good MR (control)" / "sct.nii.gz", mr_a, body))
    good_dicom = o / "good_dicom" / "dcm"
    convert("convert: good MR with --dicom-out (control)", "control", mr_b, "handle", output=o / "good_dicom" / "sct.nii.gz",
            extra=("--dicom-out", str(good_dicom)),
            check=sct_check(o / "good_dicom" / "sct.nii.gz", mr_b, dicom=good_dicom))

    # ---- classic bad volumes
    constant = nifti(i / "constant.nii.gz", np.full(SHAPE, 100.0))
    convert("all-constant MR", "classic", constant)
    nan = head(1)[0]
    nan[3, 3, 3] = np.nan
    convert("a NaN voxel", "classic", nifti(i / "nan.nii.gz", nan, dtype=np.float32))
    convert("2D image", "classic", nifti(i / "flat.nii.gz", head(1)[0][:, :, :1]))
    four = i / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4, 3)).astype(np.float32), AFFINE), str(four))
    convert("4D series", "classic", four)
    truncated = i / "truncated.nii.gz"
    truncated.write_bytes(mr_a.read_bytes()[: mr_a.stat().st_size // 2])
    convert("truncated .nii.gz", "classic", truncated)
    text = i / "notes.nii.gz"
    text.write_text("this is not a volume\n")
    convert("text file named .nii.gz", "classic", text)
    empty = i / "empty_folder"
    empty.mkdir()
    convert("empty folder as input", "classic", empty)
    convert("missing input", "classic", i / "absent.nii.gz")
    convert("output == input (--overwrite)", "classic", mr_a, output=mr_a, extra=("--overwrite",))
    link = i / "hardlink.nii.gz"
    os.link(mr_a, link)
    convert("hard link of the input as output (--overwrite)", "10", mr_a, names=str(link), output=link,
            extra=("--overwrite",), inputs=(link,))
    convert("mask on a shifted grid", "classic", mr_a, names=str(i / "mask_shifted.nii.gz"),
            extra=("--mask", str(nifti(i / "mask_shifted.nii.gz", body, shifted(), np.uint8))),
            inputs=(i / "mask_shifted.nii.gz",))
    convert("empty mask", "classic", mr_a, names=str(i / "mask_empty.nii.gz"),
            extra=("--mask", str(nifti(i / "mask_empty.nii.gz", np.zeros(SHAPE), dtype=np.uint8))),
            inputs=(i / "mask_empty.nii.gz",))
    convert("bad --tta", "classic", mr_a, names="--tta", extra=("--tta", "sideways"))
    convert("--batch-size 0", "classic", mr_a, names="--batch-size", extra=("--batch-size", "0"))
    convert("output named .mha", "classic", mr_a, names="sct.mha", output=o / "mha" / "sct.mha")
    blocker = o / "blocker"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where a folder should be")
    convert("output folder is a file", "classic", mr_a, names=str(blocker), output=blocker / "sub" / "sct.nii.gz")
    junk = i / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    case = convert("garbage checkpoint", "classic", mr_a, names=str(junk), inputs=(junk,))
    case.argv[case.argv.index("-m") + 1] = str(junk)

    # ---- finding 8: overflow, broken affines
    big = i / "huge_float64.nii.gz"
    nib.save(nib.Nifti1Image(head(1)[0].astype(np.float64) * 1e300, AFFINE), str(big))
    convert("float64 volume of 1e300", "8", big)
    slope = nib.Nifti1Image(head(1)[0].astype(np.int16), AFFINE)
    slope.header.set_slope_inter(1e38, 0.0)
    nib.save(slope, str(i / "huge_slope.nii.gz"))
    convert("huge scl_slope", "8", i / "huge_slope.nii.gz")
    convert("singular sform, qform valid", "8", singular_sform(i / "singular_q1.nii.gz", 1))
    convert("singular sform, qform code 0", "9", singular_sform(i / "singular_q0.nii.gz", 0))
    nan_affine = AFFINE.copy()
    nan_affine[0, 3] = np.nan
    image = nib.Nifti1Image(head(1)[0], AFFINE)
    image.header.set_sform(AFFINE, code=1)
    image.header["srow_x"] = nan_affine[0]
    nib.save(nib.Nifti1Image(image.dataobj, None, header=image.header), str(i / "nan_affine.nii.gz"))
    convert("NaN in the affine", "8", i / "nan_affine.nii.gz")

    # ---- finding 9: silently wrong
    convert("pixdim 0 (zero voxel size)", "9", pixdim_zero(i / "pixdim0.nii.gz"))
    convert("a CT given as the MR", "9", nifti(i / "ct_as_mr.nii.gz", head(1)[1]))

    # ---- finding 2 (body mask, another branch): one extreme voxel
    for value, label in ((1e6, "1e6"), (1e30, "1e30"), (-1e6, "-1e6")):
        mr = head(1)[0]
        mr[0, 0, 0] = value
        source = nifti(i / f"extreme_{label}.nii.gz", mr, dtype=np.float32)
        name = f"one voxel of {label} in the MR"
        convert(name, "2", source, "handle", check=sct_check(o / name / "sct.nii.gz", source, body), needs="F2")

    # ---- finding 1 (DICOM series reading, another branch)
    def dicom_case(name: str, edit: Callable[[list[Path]], None]) -> None:
        folder = i / name.replace(" ", "_")
        edit(dicom_series(folder, 1))
        convert(f"DICOM series: {name}", "1", folder, needs="F1")

    dicom_case("one slice missing", lambda files: files[4].unlink())

    def duplicate(files: list[Path]) -> None:
        import pydicom
        from pydicom.uid import generate_uid

        ds = pydicom.dcmread(str(files[3]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(str(files[3].with_name("CT_dup.dcm")))

    dicom_case("one slice duplicated", duplicate)

    def uneven(index, ds):
        if index >= 4:
            position = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [position[0], position[1], position[2] + 2.0]

    dicom_case("uneven spacing", lambda files: edit_dicom(files, uneven))

    def tilted(index, ds):
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1] + 3.0 * np.tan(np.radians(20)) * index, position[2]]
        ds.GantryDetectorTilt = 20

    dicom_case("gantry tilt (positions stepping sideways)", lambda files: edit_dicom(files, tilted))

    def turned(index, ds):
        if index >= 4:
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, -1.0, 0.0, 0.0]

    dicom_case("orientation changes half way", lambda files: edit_dicom(files, turned))

    def half_written(files: list[Path]) -> None:
        files[5].write_bytes(files[5].read_bytes()[:600])

    dicom_case("a half-written slice file", half_written)

    # ---- finding 7: partial outputs
    convert("--dicom-out equal to -o", "7", mr_a, names="--dicom-out", output=o / "same" / "sct.nii.gz",
            extra=("--dicom-out", str(o / "same" / "sct.nii.gz")))
    convert("--dicom-out holding -o", "7", mr_a, names="--dicom-out", output=o / "holding" / "sct.nii.gz",
            extra=("--dicom-out", str(o / "holding")))
    stale_out = o / "stale" / "sct.nii.gz"
    stale = stale_out.parent / ".tmp-0badc0de-sct.nii.gz"

    def stale_check(result: Result) -> Optional[str]:
        return "the killed run's .tmp- file is still there" if stale.exists() else sct_check(stale_out, mr_a)(result)

    case = convert("stale .tmp- NIfTI of a killed run", "7", mr_a, "handle", output=stale_out, check=stale_check)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a volume")

    # ---- folder mode
    folder = i / "patients"
    for index, name in enumerate(("p1", "p2")):
        nifti(folder / name / "mr.nii.gz", head(index + 1)[0])
    def folder_convert(name: str, finding: str, output: Path, extra: tuple = (), expect: str = "refuse",
                       names: str = "", source: Path = folder, **kwargs) -> None:
        argv = ["convert", "-i", str(source), "-o", str(output), "-m", str(model), "--tta", "none", *extra]
        cases.append(Case(name, finding, expect, argv, names=names, inputs=[source, model], area=output, **kwargs))

    def folder_check(out: Path, dicom: Path) -> Callable[[Result], Optional[str]]:
        def check(result: Result) -> Optional[str]:
            for name in ("p1", "p2"):
                why = sct_check(out / name / "sct.nii.gz", folder / name / "mr.nii.gz", dicom=dicom / name)(result)
                if why:
                    return f"{name}: {why}"
            return None
        return check

    folder_convert("folder mode with --dicom-out (control)", "control", o / "folder_ok",
                   ("--dicom-out", str(o / "folder_ok_dicom")), "handle",
                   check=folder_check(o / "folder_ok", o / "folder_ok_dicom"))
    folder_convert("folder mode: --dicom-out inside an input case", "10", o / "f10a",
                   ("--dicom-out", str(folder / "p1" / "dicom")), names=str(folder / "p1" / "dicom"))
    folder_convert("folder mode: -o inside an input case", "10", folder / "p2" / "sct", names=str(folder / "p2" / "sct"))
    folder_convert("folder mode: -o is the input folder", "classic", folder, names=str(folder))
    mixed = i / "mixed"
    nifti(mixed / "good" / "mr.nii.gz", head(1)[0])
    nifti(mixed / "bad" / "mr.nii.gz", head(1)[0][:, :, :1])
    folder_convert("folder mode: one 2D case among good ones", "12", o / "mixed", names=str(mixed / "bad" / "mr.nii.gz"),
                   source=mixed, lines=2)
    empty_cases = i / "no_cases"
    (empty_cases / "notes").mkdir(parents=True)
    folder_convert("folder mode: no cases", "classic", o / "none", names=str(empty_cases), source=empty_cases)

    # ---- finding 4: two converts to one output at once
    shared, shared_dicom = o / "shared" / "sct.nii.gz", o / "shared" / "dcm"

    def concurrent_converts(runner: Runner) -> tuple[str, str]:
        outcome = ("", "")
        for _ in range(TRIALS):  # a race: on unlocked code each trial mixes the patients or not, by chance
            outcome = convert_race(runner)
            if outcome[0] != "handled correctly":
                break
        return outcome

    def convert_race(runner: Runner) -> tuple[str, str]:
        before = digest([mr_a, mr_b])
        handles = [runner.start(["convert", "-i", str(mr), "-o", str(shared), "-m", str(model), "--tta", "none",
                                 "--dicom-out", str(shared_dicom), "--overwrite"]) for mr in (mr_a, mr_b)]
        results = [runner.finish(h) for h in handles]
        if any("Traceback" in r.stderr for r in results):
            return "traceback", "a traceback"
        if digest([mr_a, mr_b]) != before:
            return "inputs changed", ""
        refused = [r for r in results if r.code != 0]
        if any(len(message_lines(r.stderr)) > 1 or "another medcycle process" not in r.stderr for r in refused):
            return "refused unclearly", message_lines(refused[0].stderr)[-1][:120]
        if len(refused) == 2:
            return "refused wrongly", "both refused"
        winner = [mr for mr, r in zip((mr_a, mr_b), results) if r.code == 0][-1]
        why = sct_check(shared, winner, dicom=shared_dicom)(results[0])
        if why:
            return "accepted wrongly", why
        if leftovers(shared.parent):
            return "refused unclearly", f"left {leftovers(shared.parent)}"
        return "handled correctly", (f"one refused: {message_lines(refused[0].stderr)[-1][:110]}" if refused
                                     else "both ran; the outputs are one patient's")

    cases.append(Case("two converts to one output at once", "4", "handle", custom=concurrent_converts))

    # ---- evaluate
    ref, sct = nifti(i / "eval" / "ct.nii.gz", head(1)[1]), nifti(i / "eval" / "sct.nii.gz", head(1)[1] + 20.0)
    cases.append(Case("evaluate (control)", "control", "handle", ["evaluate", "--pred", str(sct), "--ref", str(ref)],
                      inputs=[ref, sct], check=lambda r: None if "MAE" in r.stdout else "no table"))
    moved = nifti(i / "eval" / "sct_shifted.nii.gz", head(1)[1], shifted())
    cases.append(Case("evaluate: prediction on a shifted grid", "classic", "refuse",
                      ["evaluate", "--pred", str(moved), "--ref", str(ref)], names=str(moved), inputs=[moved, ref]))
    raw = nifti(i / "eval" / "ct_raw.nii.gz", head(1)[1] + 1024.0)
    cases.append(Case("evaluate: reference CT stored 0..4095", "9", "refuse",
                      ["evaluate", "--pred", str(sct), "--ref", str(raw)], names=str(raw), inputs=[raw, sct]))

    # ---- preprocess
    def preprocess(name: str, finding: str, data: Path, expect: str = "refuse", names: str = "", extra: tuple = (),
                   out: Optional[Path] = None, lines: int = 1, **kwargs) -> Case:
        out = out or o / name.replace(" ", "_").replace(":", "")
        argv = ["preprocess", "--data", str(data), "--out", str(out), *[a for s in PRE for a in ("--set", s)], *extra]
        case = Case(name, finding, expect, argv, names=names, inputs=[data], lines=lines, area=out, **kwargs)
        cases.append(case)
        return case

    good = i / "synthrad"
    synthrad_case(good / "c01", 1, mask=True)
    synthrad_case(good / "c02", 2)
    preprocess("preprocess (control)", "control", good, "handle", out=o / "cache_ok",
               check=cache_check(o / "cache_ok"))
    (i / "empty_data").mkdir()
    preprocess("preprocess: empty folder", "classic", i / "empty_data", names=str(i / "empty_data"))
    preprocess("preprocess: --out inside --data", "classic", good, names=str(good), out=good / "cache")

    def one_bad_case(name: str, finding: str, build_case: Callable[[Path], Path], **kwargs) -> None:
        data = i / name.replace(" ", "_").replace(":", "")
        synthrad_case(data / "c01", 1)
        bad = build_case(data / "bad")
        out = o / data.name
        case = preprocess(name, finding, data, names=str(bad), out=out, lines=2, **kwargs)
        case.outputs = [out / "cases" / "bad"]  # a failed case leaves no folder (finding 12)

    mr1, ct1, _ = head(1)
    one_bad_case("preprocess: CT stored 0..4095 (no -1024 intercept)", "9",
                 lambda f: (nifti(f / "mr.nii.gz", mr1), nifti(f / "ct.nii.gz", ct1 + 1024.0))[1])
    one_bad_case("preprocess: MR and CT swapped", "9",
                 lambda f: (nifti(f / "ct.nii.gz", mr1), nifti(f / "mr.nii.gz", ct1))[1])
    one_bad_case("preprocess: CT on a shifted grid", "classic",
                 lambda f: (nifti(f / "mr.nii.gz", mr1), nifti(f / "ct.nii.gz", ct1, shifted()))[1])
    one_bad_case("preprocess: a text file as ct.nii.gz", "12",
                 lambda f: (nifti(f / "mr.nii.gz", mr1), (f / "ct.nii.gz").write_text("no"), f / "ct.nii.gz")[2])

    # ---- finding 6: a truncated array; preprocess must repair it, train must refuse it
    damaged = o / "cache_damaged"

    def damage(runner: Runner) -> None:
        runner.run(["preprocess", "--data", str(good), "--out", str(damaged), *[a for s in PRE for a in ("--set", s)]])
        array = damaged / "cases" / "c01" / "mr.npy"
        with open(array, "r+b") as handle:
            handle.truncate(array.stat().st_size - 64)

    train_damaged = Case("train on a cache with a truncated mr.npy", "6", "refuse",
                         ["train", "--data", str(damaged), "--out", str(o / "run_damaged"), "--max-iters", "1",
                          *[a for s in TINY_TRAIN for a in ("--set", s)]],
                         names=str(damaged / "cases" / "c01" / "mr.npy"), inputs=[], setup=damage)
    cases.append(train_damaged)
    preprocess("preprocess repairs the truncated mr.npy", "6", good, "handle", out=damaged,
               check=cache_check(damaged, done=1))

    # ---- finding 5: two preprocess runs into one cache at once (two configs)
    contested = o / "cache_contested"

    def concurrent_preprocess(runner: Runner) -> tuple[str, str]:
        outcome = ("", "")
        for _ in range(TRIALS):
            outcome = preprocess_race(runner)
            if outcome[0] != "handled correctly":
                break
        return outcome

    def preprocess_race(runner: Runner) -> tuple[str, str]:
        argv = ["preprocess", "--data", str(good), "--out", str(contested), *[a for s in PRE for a in ("--set", s)]]
        handles = [runner.start(argv), runner.start([*argv, "--set", "data.mr_percentiles=[1.0, 99.0]"])]
        results = [runner.finish(h) for h in handles]
        if any("Traceback" in r.stderr for r in results):
            return "traceback", ""
        refused = [r for r in results if r.code != 0]
        if any(len(message_lines(r.stderr)) > 1 or "another medcycle process" not in r.stderr for r in refused):
            return "refused unclearly", message_lines(refused[0].stderr)[-1][:120]
        why = cache_check(contested)(results[0])
        if why:
            return "accepted wrongly", why
        return "handled correctly", (f"one refused: {message_lines(refused[0].stderr)[-1][:110]}" if refused
                                     else "both ran; every case matches the manifest's config")

    cases.append(Case("two preprocess runs into one cache at once", "5", "handle", custom=concurrent_preprocess))

    # a case of another data config copied into the cache: train must refuse it (dataset wiring: F5w)
    mixed_cache, other_cache = o / "cache_mixed", o / "cache_other"

    def mix(runner: Runner) -> None:
        base = ["preprocess", "--data", str(good), *[a for s in PRE for a in ("--set", s)]]
        runner.run([*base, "--out", str(mixed_cache)])
        runner.run([*base, "--out", str(other_cache), "--set", "data.mr_percentiles=[1.0, 99.0]"])
        for name in ("mr.npy", "ct.npy", "mask.npy", "record.json"):
            os.replace(other_cache / "cases" / "c01" / name, mixed_cache / "cases" / "c01" / name)

    cases.append(Case("train on a cache holding a case of another data config", "5", "refuse",
                      ["train", "--data", str(mixed_cache), "--out", str(o / "run_mixed"), "--max-iters", "1",
                       *[a for s in TINY_TRAIN for a in ("--set", s)]],
                      names=str(mixed_cache / "cases" / "c01"), setup=mix, needs="F5w"))

    # ---- finding 11: kill -9 of preprocess --workers 2
    many, killed = i / "many", o / "cache_killed"
    for index in range(4):
        synthrad_case(many / f"c{index:02d}", index + 1)

    def kill_parent(runner: Runner) -> tuple[str, str]:
        argv = ["preprocess", "--data", str(many), "--out", str(killed), "--workers", "2",
                *[a for s in PRE for a in ("--set", s)]]
        handle = runner.start(argv)
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = children(handle["pid"])
            if not alive(handle["pid"]):
                break
            time.sleep(0.02)
        if len(workers) < 2:
            runner.finish(handle)
            return "refused wrongly", "the run ended before its two workers were seen"
        os.kill(handle["pid"], signal.SIGKILL)
        runner.finish(handle)
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [w for w in workers if alive(w)]
        for worker in survivors:  # ours: do not leave them running
            os.kill(worker, signal.SIGKILL)
        if survivors:
            return "accepted wrongly", f"{len(survivors)} worker(s) still alive 5 s after the kill"
        again = runner.run(argv)  # the killed run's lock file is no lock: the next run takes it
        why = cache_check(killed)(again) if again.code == 0 else " ".join(message_lines(again.stderr)[-1:])
        if why or leftovers(killed):
            return "accepted wrongly", f"the re-run after the kill: {why or leftovers(killed)}"
        return "handled correctly", "both workers gone within 5 s; a re-run then completes the cache"

    cases.append(Case("kill -9 of preprocess --workers 2", "11", "handle", custom=kill_parent))

    # ---- config validation and training (other branches)
    binary = i / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    duplicate = i / "duplicate.yaml"
    duplicate.write_text("data:\n  tile_size: 32\n  tile_size: 64\n")
    preprocess("config: a binary file as --config", "8", good, names=str(binary), extra=("--config", str(binary)),
               needs="F8c")
    preprocess("config: --set with broken YAML", "8", good, names="data.spacing", extra=("--set", "data.spacing=[1.0,"),
               needs="F8c")
    preprocess("config: duplicate YAML keys", "9", good, names=str(duplicate), extra=("--config", str(duplicate)),
               needs="F9c")
    preprocess("config: data.orientation=XYZ", "9", good, names="data.orientation",
               extra=("--set", "data.orientation=XYZ"), needs="F9c")
    preprocess("config: data.tile_size=1000000", "9", good, names="data.tile_size",
               extra=("--set", "data.tile_size=1000000"), needs="F9c")
    for name, setting in (("train.lr=inf", "train.lr=inf"), ("train.lr=1e30", "train.lr=1e30")):
        cases.append(Case(f"train: {name} (diverges)", "3", "refuse",
                          ["train", "--data", str(o / "cache_ok"), "--out", str(o / f"run_{name}"), "--max-iters", "1",
                           *[a for s in TINY_TRAIN for a in ("--set", s)], "--set", setting],
                          names="train.lr", needs="F3"))
    cases.append(Case("train: --out inside the cache", "10", "refuse",
                      ["train", "--data", str(o / "cache_ok"), "--out", str(o / "cache_ok" / "run"), "--max-iters", "1",
                       *[a for s in TINY_TRAIN for a in ("--set", s)]],
                      names=str(o / "cache_ok" / "run"), needs="F10t"))
    return cases


def children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
    except OSError:
        pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# the run


def run_case(case: Case, runner: Runner) -> tuple[str, str, float]:
    started = time.perf_counter()
    if case.setup is not None:
        case.setup(runner)
    if case.custom is not None:
        outcome, detail = case.custom(runner)
        return outcome, detail, time.perf_counter() - started
    before = digest(case.inputs)
    result = runner.run(case.argv)
    changed = digest(case.inputs) != before
    left = leftovers(case.area) if case.area is not None and case.area.is_dir() else []
    outcome, detail = classify(case, result, changed, left)
    return outcome, detail, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="each command in a fresh `python -m medcycle`")
    parser.add_argument("--keep", metavar="DIR", help="write the inputs and outputs here and keep them")
    parser.add_argument("--only", metavar="TEXT", help="run only the cases whose name holds TEXT")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medcycle-bad-inputs-"))
    if args.keep and root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    started = time.perf_counter()
    if not args.fresh:  # warm: every forked command finds these imported (never run: no torch threads yet)
        import medcycle.checkpoint  # noqa: F401
        import medcycle.dicom  # noqa: F401
        import medcycle.engine.loop  # noqa: F401
        import medcycle.jobs.convert  # noqa: F401
        import medcycle.jobs.evaluate  # noqa: F401
        import medcycle.jobs.preprocess  # noqa: F401
        import medcycle.jobs.train  # noqa: F401
        import medcycle.transforms  # noqa: F401
        import medcycle.visualize  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - the figures of evaluate, train
        from matplotlib.figure import Figure  # noqa: F401
    runner = Runner(args.fresh, root / "logs")
    model = root / "in" / "model.pt"
    model.parent.mkdir(parents=True)
    pid = os.fork()  # torch runs in a child, so no thread pool exists in this process before the forks
    if pid == 0:
        try:
            make_checkpoint(model)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    try:
        cases = build(root, model)
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        all_inputs = [root / "in"]
        before_all = digest(all_inputs)
        rows = []
        for number, case in enumerate(cases, 1):
            outcome, detail, seconds = run_case(case, runner)
            detail = detail.replace(str(root), "$T")
            rows.append((number, case, outcome, detail, seconds))
            print(f"{number:3d}  {case.name[:52]:52s}  {outcome:20s}  {seconds:5.1f} s", file=sys.stderr, flush=True)
        inputs_changed_at_end = digest(all_inputs) != before_all
        report(rows, args, time.perf_counter() - started, inputs_changed_at_end)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report(rows: list, args: argparse.Namespace, seconds: float, inputs_changed_at_end: bool) -> None:
    print(f"bench_bad_inputs: {len(rows)} cases, {'fresh interpreters' if args.fresh else 'forked warm processes'}, "
          f"{seconds:.0f} s\n")
    print("| # | case | finding | expected | outcome | needs | detail |")
    print("|---|---|---|---|---|---|---|")
    for number, case, outcome, detail, _ in rows:
        detail = re.sub(r"\s+", " ", detail).replace("|", "/")
        detail = detail if len(detail) <= 150 else detail[:147] + "..."
        flag = "" if outcome in ("refused in one line", "handled correctly") else "**"
        print(f"| {number} | {case.name} | {case.finding} | {case.expect} | {flag}{outcome}{flag} | {case.needs} | {detail} |")
    counts = {outcome: sum(r[2] == outcome for r in rows) for outcome in OUTCOMES}
    print("\n| count | cases |\n|---|---|")
    print(f"| tried | {len(rows)} |")
    for outcome in OUTCOMES:
        target = " (target 0)" if outcome in ("traceback", "accepted wrongly", "inputs changed",
                                              "refused wrongly", "refused unclearly") else ""
        print(f"| {outcome}{target} | {counts[outcome]} |")
    print(f"| any input changed over the whole run (target no) | {'yes' if inputs_changed_at_end else 'no'} |")
    pending = [(n, c, o) for n, c, o, _, _ in rows if c.needs and o not in ("refused in one line", "handled correctly")]
    if pending:
        print(f"\nNot right yet and awaiting another branch ({len(pending)}): "
              + "; ".join(f"#{n} {c.needs}" for n, c, _ in pending))
    own = [(n, c, o) for n, c, o, _, _ in rows if not c.needs and o not in ("refused in one line", "handled correctly")]
    print(f"Not right and not awaiting another branch: {len(own)}"
          + (": " + "; ".join(f"#{n} {c.name} ({o})" for n, c, o in own) if own else ""))


if __name__ == "__main__":
    sys.exit(main())
