"""Hostile runs against outputs and caches (issue 24, findings 4, 5, 6, 7, 10, 11, 12).

Two writers of one output or cache, partial and stale outputs, outputs inside the input's cases or
hard-linked to it, a damaged cache, and a killed job's workers: each is refused in one line or made
impossible, with nothing left behind and the inputs unchanged.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import medcycle.jobs.preprocess as preprocess
from medcycle.data import cache
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import file_checksum
from helpers import oblique_affine, phantom_mr, write_nifti
from helpers import make_checkpoint
from helpers import OVERRIDES, make_case

ROOT = Path(__file__).resolve().parents[1]


def convert(*args, **kwargs):
    from medcycle.jobs.convert import run

    return run(*args, **kwargs)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def mr_and_model(tmp_path):
    mr = write_nifti(tmp_path / "mr.nii.gz", phantom_mr((30, 26, 5)), oblique_affine(spacing=(1.0, 1.1, 2.0)))
    return mr, make_checkpoint(tmp_path / "model.pt", tile=16)


def _hold_lock(target: str, lock_file, ready, release) -> None:
    from medcycle.files import output_lock

    with output_lock(target, lock_file):
        ready.set()
        release.wait(60)


class LockHeldElsewhere:
    """Another process holds the lock of `target` while the ``with`` block runs."""

    def __init__(self, target: Path, lock_file: Path | None = None) -> None:
        context = multiprocessing.get_context("fork")
        self.ready, self.release = context.Event(), context.Event()
        self.process = context.Process(target=_hold_lock, args=(str(target), lock_file, self.ready, self.release))

    def __enter__(self) -> "LockHeldElsewhere":
        self.process.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.process.join(30)
        assert self.process.exitcode == 0


# --------------------------------------------------------------------------------------------------
# finding 4: two converts to one output


def test_convert_is_refused_while_another_process_writes_its_outputs(tmp_path, mr_and_model):
    mr, model = mr_and_model
    out, dicom = tmp_path / "sct.nii.gz", tmp_path / "sct_dicom"
    before = listing(tmp_path)
    with LockHeldElsewhere(out):
        with pytest.raises(InputError, match="another medcycle process is writing it") as info:
            convert(mr, out, model, dicom_out=dicom)
        assert str(out) in str(info.value) and "\n" not in str(info.value)
        assert not out.exists() and not dicom.exists()
    with LockHeldElsewhere(dicom):  # the DICOM folder alone is locked: the NIfTI is not written either
        with pytest.raises(InputError, match=f"{dicom}: another medcycle process"):
            convert(mr, out, model, dicom_out=dicom)
        assert not out.exists()
    assert listing(tmp_path) == before

    convert(mr, out, model, dicom_out=dicom)  # released: it runs, and leaves no lock file
    assert out.is_file() and len(list(dicom.glob("*.dcm"))) == 5
    assert not list(tmp_path.glob(".*.lock"))


def test_a_folder_convert_is_refused_while_another_writes_the_output_folder(tmp_path, mr_and_model):
    _, model = mr_and_model
    data = tmp_path / "data"
    write_nifti(data / "a" / "mr.nii.gz", phantom_mr((30, 26, 5)), np.diag([1.0, 1.0, 2.0, 1.0]))
    with LockHeldElsewhere(tmp_path / "out"):
        with pytest.raises(InputError, match="another medcycle process"):
            convert(data, tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


def test_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """The unlink race: B opens the lock file, A removes it and lets go, B's flock then succeeds on
    an orphan inode that nobody else sees; B must notice and lock the file now on disk."""
    import fcntl

    import medcycle.files as files
    from medcycle.files import output_lock

    target = tmp_path / "sct.nii.gz"
    lock = tmp_path / ".sct.nii.gz.lock"
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_left(descriptor, operation):
        calls.append(os.fstat(descriptor).st_ino)
        if len(calls) == 1:  # the holder removes the file and a third writer creates it anew
            lock.unlink()
            lock.write_text("")
        return real_flock(descriptor, operation)

    monkeypatch.setattr(files.fcntl, "flock", flock_after_the_holder_left)
    with output_lock(target):
        assert len(calls) == 2 and calls[1] == lock.stat().st_ino != calls[0]
    assert not lock.exists()


# --------------------------------------------------------------------------------------------------
# finding 7: partial and stale outputs


@pytest.mark.parametrize("dicom_name", ["sct.nii.gz", "parent", "sct.nii.gz/dicom"])
def test_dicom_out_equal_to_holding_or_inside_the_output_is_refused_before_writing(tmp_path, mr_and_model, dicom_name):
    mr, model = mr_and_model
    out = tmp_path / "parent" / "sct.nii.gz"
    before = listing(tmp_path)
    dicom = tmp_path / "parent" / dicom_name if dicom_name != "parent" else tmp_path / "parent"
    with pytest.raises(UsageError, match="--dicom-out"):
        convert(mr, out, model, dicom_out=dicom)
    assert listing(tmp_path) == before


def test_folder_mode_dicom_out_inside_the_output_folder_is_refused(tmp_path, mr_and_model):
    _, model = mr_and_model
    data = tmp_path / "data"
    write_nifti(data / "a" / "mr.nii.gz", phantom_mr((30, 26, 5)), np.diag([1.0, 1.0, 2.0, 1.0]))
    before = listing(tmp_path)
    with pytest.raises(UsageError, match="--dicom-out"):
        convert(data, tmp_path / "out", model, dicom_out=tmp_path / "out" / "dicom")
    assert listing(tmp_path) == before


def test_stale_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, mr_and_model):
    mr, model = mr_and_model
    out = tmp_path / "sct.nii.gz"
    stale = tmp_path / ".tmp-0badc0de-sct.nii.gz"  # what a kill -9 during the write leaves
    stale.write_bytes(b"half a volume")
    other = tmp_path / ".tmp-0badc0de-other.nii.gz"  # another output's: not ours to remove
    other.write_bytes(b"x")
    stale_series = tmp_path / ".tmp-0badc0de-dicom"  # a series half written
    stale_series.mkdir()
    (stale_series / "CT_0001.dcm").write_bytes(b"one slice of many")
    convert(mr, out, model, dicom_out=tmp_path / "dicom")
    assert out.is_file() and not stale.exists() and not stale_series.exists() and other.exists()
    stale.write_bytes(b"half a volume")
    convert(mr, out, model, overwrite=True)
    assert not stale.exists()
    stale.write_bytes(b"half a volume")  # refused (already exists), and cleaned all the same
    with pytest.raises(InputError, match="already exists"):
        convert(mr, out, model)
    assert not stale.exists()


def test_a_failed_dicom_write_takes_its_nifti_with_it(tmp_path, mr_and_model, monkeypatch):
    import medcycle.dicom

    def full_disk(folder, *args, **kwargs):
        raise InputError(f"{folder}: cannot write the DICOM series (No space left on device)")

    monkeypatch.setattr(medcycle.dicom, "write_ct_series", full_disk)
    mr, model = mr_and_model
    before = listing(tmp_path)
    with pytest.raises(InputError, match="No space"):
        convert(mr, tmp_path / "sct.nii.gz", model, dicom_out=tmp_path / "dicom")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# finding 10: outputs inside an input case, hard links


@pytest.mark.parametrize("where", ["dicom_out", "output"])
def test_folder_mode_output_inside_an_input_case_is_refused(tmp_path, mr_and_model, where):
    _, model = mr_and_model
    data = tmp_path / "data"
    for name in ("a", "b"):
        write_nifti(data / name / "mr.nii.gz", phantom_mr((30, 26, 5)), np.diag([1.0, 1.0, 2.0, 1.0]))
    inside_case = data / "a" / "results"
    before, sums = listing(tmp_path), file_checksum(data)
    kwargs = {"dicom_out": inside_case} if where == "dicom_out" else {}
    output = inside_case if where == "output" else tmp_path / "out"
    with pytest.raises(InputError, match=f"{inside_case}: is or lies in the input case folder {data / 'a'}"):
        convert(data, output, model, **kwargs)
    assert listing(tmp_path) == before and file_checksum(data) == sums


def test_hard_linked_copy_of_the_input_is_refused_even_with_overwrite(tmp_path, mr_and_model):
    mr, model = mr_and_model
    link = tmp_path / "link.nii.gz"
    os.link(mr, link)
    before = file_checksum(mr)
    with pytest.raises(InputError, match="is the input"):
        convert(mr, link, model, overwrite=True)
    assert file_checksum(mr) == before

    data = tmp_path / "data"
    write_nifti(data / "a" / "mr.nii.gz", phantom_mr((30, 26, 5)), np.diag([1.0, 1.0, 2.0, 1.0]))
    (tmp_path / "out" / "a").mkdir(parents=True)
    os.link(data / "a" / "mr.nii.gz", tmp_path / "out" / "a" / "sct.nii.gz")
    sums = file_checksum(data)
    with pytest.raises(MedcycleError, match="1 of 1 cases failed"):
        convert(data, tmp_path / "out", model, overwrite=True)
    assert file_checksum(data) == sums


# --------------------------------------------------------------------------------------------------
# findings 5 and 6: one writer per cache; cases checked against the manifest; damage repaired


@pytest.fixture
def data(tmp_path):
    make_case(tmp_path / "data" / "c01", seed=1)
    make_case(tmp_path / "data" / "c02", seed=2)
    return tmp_path / "data"


def test_preprocess_is_refused_while_another_writes_the_cache(tmp_path, data):
    out = tmp_path / "cache"
    with LockHeldElsewhere(out, out / cache.LOCK):
        with pytest.raises(InputError, match=f"{out}: another medcycle process is writing it"):
            preprocess.run(out=out, data=data, overrides=OVERRIDES)
        assert not (out / "cases").exists()
    out.mkdir()
    (out / cache.LOCK).write_text("4242\n")  # left by a kill -9: a file nobody holds a lock on
    preprocess.run(out=out, data=data, overrides=OVERRIDES)
    assert not (out / cache.LOCK).exists()


def test_training_refuses_a_case_preprocessed_with_another_data_config(tmp_path, data):
    out, other = tmp_path / "cache", tmp_path / "other"
    preprocess.run(out=out, data=data, overrides=OVERRIDES)
    preprocess.run(out=other, data=data, overrides=[*OVERRIDES, "data.mr_percentiles=[1.0, 99.0]"])
    expected = cache.load_manifest(out)["data_config_hash"]
    cache.load_case_tiles(out, "c01", data_config_hash=expected)
    for name in ("mr.npy", "ct.npy", "mask.npy", "record.json"):  # c01 written by the other run's config
        os.replace(other / "cases" / "c01" / name, out / "cases" / "c01" / name)
    with pytest.raises(InputError, match="another data config") as info:
        cache.load_case_tiles(out, "c01", data_config_hash=expected)
    assert str(out / "cases" / "c01" / "record.json") in str(info.value)


def test_a_truncated_array_is_refused_for_training_and_repaired_by_preprocess(tmp_path, data):
    out = tmp_path / "cache"
    preprocess.run(out=out, data=data, overrides=OVERRIDES)
    array = out / "cases" / "c01" / "mr.npy"
    original = np.load(array)
    record = json.loads((out / "cases" / "c01" / "record.json").read_text())
    assert record["arrays"]["mr"] == {"bytes": array.stat().st_size, "sha256": file_checksum(array)}
    with open(array, "r+b") as handle:
        handle.truncate(array.stat().st_size - 100)
    with pytest.raises(InputError, match="re-run 'medcycle preprocess'") as info:
        cache.load_case_tiles(out, "c01")
    assert str(array) in str(info.value) and "truncated" in str(info.value)

    summary = preprocess.run(out=out, data=data, overrides=OVERRIDES)
    assert summary["done"] == 1 and summary["skipped"] == 1  # c01 redone, not "skipped (unchanged)"
    np.testing.assert_array_equal(cache.load_case_tiles(out, "c01").mr, original)


def test_an_altered_array_of_the_same_size_is_redone(tmp_path, data):
    out = tmp_path / "cache"
    preprocess.run(out=out, data=data, overrides=OVERRIDES)
    array = out / "cases" / "c02" / "mask.npy"
    original = np.load(array)
    damaged = original.copy()
    damaged.flat[0] ^= 1
    np.save(array, damaged)
    assert preprocess.run(out=out, data=data, overrides=OVERRIDES)["done"] == 1
    np.testing.assert_array_equal(np.load(array), original)


# --------------------------------------------------------------------------------------------------
# findings 11 and 12: workers die with their job; a failed case leaves no folder


def _children(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.update(int(c) for c in text)
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_their_preprocess_is_killed(tmp_path, data):
    make_case(data / "c03", seed=3)
    script = (
        "import time, sys\n"
        "import medcycle.jobs.preprocess as p\n"
        "def slow(*args, **kwargs):\n"
        "    time.sleep(120)\n"
        "p.process_case = slow\n"
        f"p.run(out={str(tmp_path / 'cache')!r}, data={str(data)!r}, overrides={OVERRIDES!r}, workers=2)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    job = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
            workers = _children(job.pid)
        assert len(workers) == 2, "the job did not start its two workers"
        os.kill(job.pid, signal.SIGKILL)
        job.wait(30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:  # whatever happened, leave no process of this test behind
        if job.poll() is None:
            job.kill()
            job.wait(30)
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_a_case_that_fails_while_written_leaves_no_folder(tmp_path, data, capsys, monkeypatch):
    real = cache.write_array

    def full_disk(path, array):
        if "c02" in str(path) and Path(path).name == "ct.npy":
            raise InputError(f"{path}: cannot write (No space left on device)")
        return real(path, array)

    monkeypatch.setattr(cache, "write_array", full_disk)
    with pytest.raises(MedcycleError, match="1 of 2 cases failed"):
        preprocess.run(out=tmp_path / "cache", data=data, overrides=OVERRIDES)
    assert sorted(p.name for p in (tmp_path / "cache" / "cases").iterdir()) == ["c01"]
    lines = [x for x in capsys.readouterr().err.splitlines()
             if x.startswith("medcycle preprocess:") and not x.startswith("medcycle preprocess: warning:")]
    assert len(lines) == 1 and "No space left" in lines[0]
