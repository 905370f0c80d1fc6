"""`medcycle preprocess` and the tile cache: layouts, records, skipping, resuming, failures, workers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import medcycle.jobs.preprocess as preprocess
from helpers import AFFINE, make_case, OVERRIDES, SHAPE
from medcycle.config import DataConfig, config_hash, load_config
from medcycle.data.cache import CaseTiles, load_case_tiles, load_manifest, select_cases
from medcycle.errors import InputError, MedcycleError, UsageError
from medcycle.files import file_checksum
from medcycle.image import affine_of, shape_of
from medcycle.io import load_volume
from helpers import oblique_affine, synthetic_head, write_dicom_series, write_mha, write_nifti


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """c01 NIfTI + mask, c02 MHA (oblique), c03 DICOM series, c04 MR only."""
    root = tmp_path_factory.mktemp("synthrad")
    make_case(root / "c01", 1, "nifti", mask=True)
    make_case(root / "c02", 2, "mha", affine=oblique_affine(spacing=(0.9, 0.9, 2.5)))
    make_case(root / "c03", 3, "dicom")
    make_case(root / "c04", 4, "nifti", ct=False)
    (root / "notes").mkdir()  # a folder without mr.*: ignored
    return root


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_checksum(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def npy_mtimes(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in sorted(cache.rglob("*.npy"))}


def run(out: Path, data: Path, *extra: str, **kwargs) -> dict:
    return preprocess.run(out=out, data=data, overrides=[*OVERRIDES, *extra], **kwargs)


# --------------------------------------------------------------------------------------------------
# a full run


def test_synthrad_layout_nifti_mha_dicom_and_mr_only(tmp_path, dataset, capsys):
    before = fingerprint(dataset)
    cache = tmp_path / "cache"
    summary = run(cache, dataset)
    assert summary["cases"] == 4 and summary["done"] == 4 and summary["failed"] == 0 and summary["skipped"] == 0
    assert summary["ignored"] == ["notes"]
    assert fingerprint(dataset) == before  # inputs are only read

    manifest = load_manifest(cache)
    cfg = load_config(None, OVERRIDES).data
    assert manifest["format"] == "medcycle-cache" and manifest["version"] == 1
    assert manifest["data_config"]["tile_size"] == 32
    assert manifest["data_config_hash"] == config_hash(cfg)
    cases = manifest["cases"]
    assert sorted(cases) == ["c01", "c02", "c03", "c04"]
    assert cases["c03"]["split"] == "val"  # the last paired case (val_cases = 1)
    assert all(cases[c]["split"] == "train" for c in ("c01", "c02", "c04"))
    assert cases["c04"] == {"split": "train", "mr": True, "ct": False, "paired": False, "n_tiles": cases["c04"]["n_tiles"],
                            "head": False}  # this tiny synthetic head is wider than deep
    assert all(cases[c]["paired"] and cases[c]["ct"] for c in ("c01", "c02", "c03"))
    assert summary["tiles"] == sum(c["n_tiles"] for c in cases.values()) > 0
    assert select_cases(manifest, split="train") == ["c01", "c02", "c04"]
    assert select_cases(manifest, split="val", paired=True) == ["c03"]
    assert select_cases(manifest, modality="ct") == ["c01", "c02", "c03"]

    for case_id, entry in cases.items():
        tiles = load_case_tiles(cache, case_id)
        n = entry["n_tiles"]
        assert isinstance(tiles, CaseTiles) and tiles.n_tiles == n
        assert isinstance(tiles.mr, np.memmap) and tiles.mr.dtype == np.float16 and tiles.mr.shape == (n, 1, 32, 32)
        assert tiles.mask.dtype == np.uint8 and tiles.mask.shape == (n, 1, 32, 32)
        assert float(tiles.mr.min()) >= -1.0 and float(tiles.mr.max()) <= 1.0
        if entry["ct"]:
            assert tiles.ct.shape == tiles.mr.shape and tiles.ct.dtype == np.float16 and tiles.paired
        else:
            assert tiles.ct is None and not (cache / "cases" / case_id / "ct.npy").exists()
        record = tiles.record
        assert record["slices"] == sorted(record["slices"]) and len(record["slices"]) == n
        assert record["data_config_hash"] == config_hash(cfg)
        for role, source in record["sources"].items():
            assert source["sha256"] == file_checksum(source["path"])
        first = next(iter(record["sources"].values()))["path"]
        volume = load_volume(first)
        np.testing.assert_allclose(record["geometry"]["original"]["affine"], affine_of(volume), atol=1e-4)
        assert record["geometry"]["original"]["shape"] == list(shape_of(volume))
        np.testing.assert_allclose(record["geometry"]["resampled"]["spacing"][:2], (1.0, 1.0), atol=1e-5)
        assert record["geometry"]["resampled"]["shape"][2] == shape_of(volume)[2]
        norm = record["normalisation"]
        assert norm["mr_low"] < norm["mr_high"] and norm["ct_window"] == [-1024.0, 3000.0]

    assert set(load_case_tiles(cache, "c01").record["sources"]) == {"mr", "ct", "mask"}
    assert load_case_tiles(cache, "c01").record["mask"] == "given"
    out = capsys.readouterr().out
    assert "4 done" in out


def test_unpaired_two_folder_layout(tmp_path):
    mr_dir, ct_dir = tmp_path / "mr", tmp_path / "ct"
    mr_a, _, _, _, _ = synthetic_head(SHAPE, seed=5)
    _, ct_b, _, _, _ = synthetic_head(SHAPE, seed=6)
    write_nifti(mr_dir / "p001.nii.gz", mr_a, AFFINE, dtype=np.int16)
    write_dicom_series(mr_dir / "p002", mr_a[::-1].copy(), AFFINE)
    write_mha(ct_dir / "p001.mha", ct_b, AFFINE)
    write_nifti(ct_dir / "p003.nii", ct_b, AFFINE, dtype=np.int16)
    (mr_dir / "README.txt").write_text("not a volume")
    summary = preprocess.run(out=tmp_path / "cache", mr_dir=mr_dir, ct_dir=ct_dir, overrides=OVERRIDES)
    assert summary["done"] == 4 and summary["val"] == 0
    cases = load_manifest(tmp_path / "cache")["cases"]
    assert sorted(cases) == ["ct_p001", "ct_p003", "mr_p001", "mr_p002"]
    assert all(not c["paired"] and c["split"] == "train" for c in cases.values())
    assert cases["mr_p002"]["mr"] and not cases["mr_p002"]["ct"]
    assert cases["ct_p001"]["ct"] and not cases["ct_p001"]["mr"]
    ct_tiles = load_case_tiles(tmp_path / "cache", "ct_p001")
    assert ct_tiles.mr is None and ct_tiles.ct.shape[1:] == (1, 32, 32)
    assert "mr_low" not in ct_tiles.record["normalisation"]


def test_paired_cases_and_unpaired_folders_make_one_cache_for_hybrid_training(tmp_path):
    """The real-heads recipe: registered pairs (--data) and unpaired real scans (--mr-dir, --ct-dir) in
    one call; validation comes from the pairs only, and hybrid items carry a partner only for them."""
    from medcycle.data.dataset import TileDataset

    make_case(tmp_path / "pairs" / "p1", 1)
    make_case(tmp_path / "pairs" / "p2", 2)
    mr, _, _, _, _ = synthetic_head(SHAPE, seed=5)
    _, ct, _, _, _ = synthetic_head(SHAPE, seed=6)
    write_nifti(tmp_path / "mr" / "real.nii.gz", mr, AFFINE, dtype=np.int16)
    write_nifti(tmp_path / "ct" / "real.nii.gz", ct, AFFINE, dtype=np.int16)
    cache = tmp_path / "cache"
    summary = preprocess.run(out=cache, data=tmp_path / "pairs", mr_dir=tmp_path / "mr", ct_dir=tmp_path / "ct",
                             overrides=[*OVERRIDES, "data.val_cases=1"])
    assert summary["done"] == 4 and (summary["train"], summary["val"]) == (3, 1)
    manifest = load_manifest(cache)
    assert {k: (c["split"], c["paired"]) for k, c in manifest["cases"].items()} == {
        "p1": ("train", True), "p2": ("val", True), "mr_real": ("train", False), "ct_real": ("train", False)}
    ds = TileDataset(cache, manifest, pairing="hybrid", augment=False)
    has_partner = {}
    for index in range(len(ds)):
        case = ds.mr_refs[index][0]
        has_partner.setdefault(case, set()).add(bool(ds[index]["has_ct_reg"]))
    assert has_partner == {"p1": {True}, "mr_real": {False}}


def test_25d_tiles_have_context_channels(tmp_path, dataset):
    cache = tmp_path / "cache"
    run(cache, dataset, "data.context_slices=3")
    tiles = load_case_tiles(cache, "c01", mmap=False)
    assert tiles.mr.shape[1:] == (3, 32, 32) and tiles.ct.shape[1:] == (3, 32, 32)
    assert tiles.mask.shape[1:] == (1, 32, 32) and not isinstance(tiles.mr, np.memmap)
    slices = tiles.record["slices"]
    for n in range(len(slices) - 1):
        if slices[n + 1] == slices[n] + 1:  # neighbours: the next tile's first channel is this slice
            np.testing.assert_array_equal(tiles.mr[n + 1, 0], tiles.mr[n, 1])
            np.testing.assert_array_equal(tiles.ct[n, 2], tiles.ct[n + 1, 1])


# --------------------------------------------------------------------------------------------------
# re-runs, resuming


def test_rerun_skips_unchanged_cases_and_redoes_changed_ones(tmp_path, dataset):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    cache = tmp_path / "cache"
    run(cache, data)
    mtimes = npy_mtimes(cache)

    again = run(cache, data)
    assert again["skipped"] == 4 and again["done"] == 0
    assert npy_mtimes(cache) == mtimes

    # a changed source: only that case again
    mr, _, _, _, _ = synthetic_head(SHAPE, seed=99)
    write_nifti(data / "c04" / "mr.nii.gz", mr, AFFINE, dtype=np.int16)
    changed = run(cache, data)
    assert changed["done"] == 1 and changed["skipped"] == 3
    now = npy_mtimes(cache)
    assert now["cases/c04/mr.npy"] != mtimes["cases/c04/mr.npy"]
    assert all(now[k] == v for k, v in mtimes.items() if not k.startswith("cases/c04/"))
    assert load_case_tiles(cache, "c04").record["sources"]["mr"]["sha256"] == file_checksum(data / "c04" / "mr.nii.gz")

    # a changed data config: every case again, the manifest follows
    redone = run(cache, data, "data.mr_percentiles=[1.0, 99.0]")
    assert redone["done"] == 4 and redone["skipped"] == 0
    manifest = load_manifest(cache)
    assert manifest["data_config"]["mr_percentiles"] == [1.0, 99.0]
    assert all(load_case_tiles(cache, c).record["data_config_hash"] == manifest["data_config_hash"] for c in manifest["cases"])


def test_half_written_case_is_redone(tmp_path, dataset):
    cache = tmp_path / "cache"
    run(cache, dataset)
    folder = cache / "cases" / "c02"
    (folder / "record.json").unlink()  # killed after the arrays, before the record
    (folder / ".tmp-1234abcd-ct.npy").write_bytes(b"half")  # and a half-written temporary file
    (cache / "cases" / "c03" / "mask.npy").unlink()  # a record whose arrays are gone
    mtimes = npy_mtimes(cache)
    summary = run(cache, dataset)
    assert summary["done"] == 2 and summary["skipped"] == 2
    assert (folder / "record.json").is_file() and not list(folder.glob(".tmp-*"))
    after = npy_mtimes(cache)
    assert after["cases/c01/mr.npy"] == mtimes["cases/c01/mr.npy"]
    assert after["cases/c02/mr.npy"] != mtimes["cases/c02/mr.npy"]
    assert load_case_tiles(cache, "c03").n_tiles == load_manifest(cache)["cases"]["c03"]["n_tiles"]


def test_killed_run_resumes(tmp_path, dataset, monkeypatch):
    cache = tmp_path / "cache"
    real = preprocess.process_case
    calls = []

    def dies_on_third(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(preprocess, "process_case", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(cache, dataset)
    monkeypatch.setattr(preprocess, "process_case", real)
    summary = run(cache, dataset)
    assert summary["skipped"] == 2 and summary["done"] == 2


# --------------------------------------------------------------------------------------------------
# failures


def test_failing_case_is_reported_and_the_others_done(tmp_path, dataset, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    bad = make_case(data / "c05", 5, "nifti", ct=False)
    _, ct, _, _, _ = synthetic_head((SHAPE[0] + 2, SHAPE[1], SHAPE[2]), seed=5)
    write_nifti(bad / "ct.nii.gz", ct, AFFINE, dtype=np.int16)  # CT on another grid
    cache = tmp_path / "cache"
    with pytest.raises(MedcycleError) as info:
        run(cache, data)
    assert info.value.exit_code == 1
    message = str(info.value)
    assert "1 of 5 cases failed" in message and "c05" in message and str(bad / "ct.nii.gz") in message
    err = capsys.readouterr().err
    assert f"{bad / 'ct.nii.gz'}: grid" in err
    cases = load_manifest(cache)["cases"]
    assert sorted(cases) == ["c01", "c02", "c03", "c04"]

    from medcycle.cli import main

    assert main(["preprocess", "--data", str(data), "--out", str(cache), *sum((["--set", o] for o in OVERRIDES), [])]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("medcycle preprocess: error: 1 of 5 cases failed")


def test_two_series_in_a_case_folder_fail_that_case(tmp_path):
    data = tmp_path / "data"
    make_case(data / "c01", 1)
    folder = data / "c02" / "mr"
    mr, _, _, _, _ = synthetic_head(SHAPE, seed=2)
    write_dicom_series(folder, mr, AFFINE)
    write_dicom_series(tmp_path / "other", mr, AFFINE)
    for file in (tmp_path / "other").iterdir():
        file.rename(folder / f"other_{file.name}")
    with pytest.raises(MedcycleError, match="2 DICOM series"):
        run(tmp_path / "cache", data)
    assert list(load_manifest(tmp_path / "cache")["cases"]) == ["c01"]


def test_ambiguous_case_folder_fails_that_case(tmp_path):
    data = tmp_path / "data"
    make_case(data / "c01", 1)
    make_case(data / "c02", 2)
    write_mha(data / "c02" / "mr.mha", synthetic_head(SHAPE, seed=2)[0], AFFINE)
    with pytest.raises(MedcycleError, match="several mr volumes"):
        run(tmp_path / "cache", data)


def test_no_cases_and_missing_arguments_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no cases found"):
        preprocess.run(out=tmp_path / "cache", data=empty)
    with pytest.raises(InputError, match="no such"):
        preprocess.run(out=tmp_path / "cache", data=tmp_path / "absent")
    with pytest.raises(UsageError):
        preprocess.run(out=tmp_path / "cache")
    with pytest.raises(UsageError):
        preprocess.run(out=tmp_path / "cache", ct_dir=empty)
    with pytest.raises(UsageError):
        preprocess.run(out=empty / "cache", data=empty)  # the cache inside the inputs
    with pytest.raises(UsageError):
        preprocess.run(out=tmp_path / "cache", data=empty, workers=0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(InputError, match="no MR volumes"):
        preprocess.run(out=tmp_path / "cache", mr_dir=tmp_path / "flat")


def test_config_error_comes_first_with_exit_2(tmp_path):
    with pytest.raises(UsageError, match="data.tile_size"):
        preprocess.run(out=tmp_path / "cache", data=tmp_path, overrides=["data.tile_size=30"])


# --------------------------------------------------------------------------------------------------
# workers


def test_two_workers_give_the_same_tiles_as_one(tmp_path, dataset):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, dataset, workers=1)
    summary = run(two, dataset, workers=2)
    assert summary["done"] == 4
    m1, m2 = load_manifest(one), load_manifest(two)
    assert m1["cases"] == m2["cases"]
    for case_id in m1["cases"]:
        a, b = load_case_tiles(one, case_id), load_case_tiles(two, case_id)
        for name in ("mr", "ct", "mask"):
            left, right = getattr(a, name), getattr(b, name)
            assert (left is None) == (right is None)
            if left is not None:
                np.testing.assert_array_equal(left, right)
        assert a.record["slices"] == b.record["slices"]


def test_failing_case_with_workers(tmp_path):
    data = tmp_path / "data"
    make_case(data / "c01", 1)
    make_case(data / "c02", 2)
    (data / "c03").mkdir()
    (data / "c03" / "mr.nii.gz").write_bytes(b"garbage")
    with pytest.raises(MedcycleError) as info:
        run(tmp_path / "cache", data, workers=2)
    assert str(data / "c03" / "mr.nii.gz") in str(info.value)
    assert sorted(load_manifest(tmp_path / "cache")["cases"]) == ["c01", "c02"]


# --------------------------------------------------------------------------------------------------
# readers


def test_cache_readers_refuse_what_is_not_a_cache(tmp_path, dataset):
    with pytest.raises(InputError, match="no such cache"):
        load_manifest(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        load_manifest(empty)
    no_manifest = tmp_path / "partial"
    (no_manifest / "cases").mkdir(parents=True)
    with pytest.raises(InputError, match="manifest.json"):
        load_manifest(no_manifest)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 3}))
    with pytest.raises(InputError, match=str(foreign / "manifest.json")):
        load_manifest(foreign)
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=str(foreign / "manifest.json")):
        load_manifest(foreign)

    cache = tmp_path / "cache"
    run(cache, dataset)
    with pytest.raises(InputError, match="c99"):
        load_case_tiles(cache, "c99")
    np.save(cache / "cases" / "c01" / "mr.npy", np.zeros((1, 1, 32, 32), dtype=np.float16))
    with pytest.raises(InputError, match="re-run"):
        load_case_tiles(cache, "c01")


def test_data_config_defaults_hash_is_stable():
    assert config_hash(DataConfig()) == config_hash(DataConfig())
    assert config_hash(DataConfig(tile_size=128)) != config_hash(DataConfig())
