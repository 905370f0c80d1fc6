"""Training data: the tile dataset (pairing modes, augmentation), the resumable sampler, fixed tile selections.

``make_cache`` (also used by test_train.py and test_distributed.py) writes a tiny cache directly with
:func:`medcycle.data.cache.write_case`: every tile is a distinct smooth pattern and a paired case's CT
tile is exactly ``-MR``, so a registered pair can be recognised after any (linear) augmentation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_cache, SIZE
from medcycle.config import load_config
from medcycle.data.cache import load_case_tiles, load_manifest
from medcycle.data.dataset import (
    EpochSampler,
    TileDataset,
    check_data_config,
    preview_tiles,
    resumed_position,
    spread,
    validation_tiles,
)
from medcycle.errors import InputError


def dataset(cache: Path, **kwargs) -> TileDataset:
    return TileDataset(cache, load_manifest(cache), **kwargs)


def raw(cache: Path, case: str, tile: int, name: str) -> np.ndarray:
    return np.asarray(getattr(load_case_tiles(cache, case), name)[tile], dtype=np.float32)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """c00, c01 paired (train), c02 MR only, c03 CT only, c04 paired (val)."""
    return make_cache(tmp_path_factory.mktemp("mixed"), ("paired", "paired", "mr", "ct", "paired"))


# --------------------------------------------------------------------------------------------------
# which tiles


def test_only_the_train_split_is_served(mixed):
    ds = dataset(mixed, augment=False)
    assert len(ds) == 3 * 6  # MR tiles of c00, c01, c02
    seen_mr, seen_ct = set(), set()
    for i in range(len(ds)):
        item = ds[(0, i, i)]
        seen_mr.add(item["mr_case"])
        seen_ct.add(item["ct_case"])
        np.testing.assert_array_equal(item["mr"].numpy(), raw(mixed, item["mr_case"], item["mr_tile"], "mr"))
        np.testing.assert_array_equal(item["ct"].numpy(), raw(mixed, item["ct_case"], item["ct_tile"], "ct"))
    assert seen_mr == {"c00", "c01", "c02"} and seen_ct <= {"c00", "c01", "c03"} and "c04" not in seen_mr | seen_ct


def test_unpaired_ct_is_reproducible_distinct_within_an_epoch_and_changes_with_the_epoch(mixed):
    ds = dataset(mixed, augment=True, seed=3)
    epoch0 = [(ds[(0, i, i)]["ct_case"], ds[(0, i, i)]["ct_tile"]) for i in range(len(ds))]
    assert len(set(epoch0)) == len(epoch0)  # 18 CT tiles for 18 MR tiles: none twice in an epoch
    again = dataset(mixed, augment=True, seed=3)  # e.g. in a worker or a resumed run
    assert [(again[(0, i, i)]["ct_case"], again[(0, i, i)]["ct_tile"]) for i in range(len(ds))] == epoch0
    epoch1 = [(ds[(1, i, i)]["ct_case"], ds[(1, i, i)]["ct_tile"]) for i in range(len(ds))]
    assert epoch1 != epoch0
    # not the registered partner: the pairing is random
    assert sum(ds[(0, i, i)]["ct_case"] == ds[(0, i, i)]["mr_case"] and ds[(0, i, i)]["ct_tile"] == ds[(0, i, i)]["mr_tile"]
               for i in range(len(ds))) < 6


def test_paired_returns_the_registered_ct_of_the_same_case_and_slice(mixed):
    ds = dataset(mixed, pairing="paired", augment=False)
    assert len(ds) == 2 * 6  # MR tiles of the paired train cases only
    for i in range(len(ds)):
        item = ds[(0, i, i)]
        assert (item["ct_case"], item["ct_tile"]) == (item["mr_case"], item["mr_tile"]) == ds.mr_refs[i]
        np.testing.assert_array_equal(item["mr"].numpy(), raw(mixed, *ds.mr_refs[i], "mr"))
        np.testing.assert_array_equal(item["ct"].numpy(), raw(mixed, *ds.mr_refs[i], "ct"))


def test_paired_without_paired_training_cases_is_refused(tmp_path):
    cache = make_cache(tmp_path / "c", ("mr", "ct", "paired"), val=1)  # the only paired case is val
    with pytest.raises(InputError, match="no paired .* loss.pairing=paired"):
        dataset(cache, pairing="paired")


def test_hybrid_adds_registered_partners_where_the_case_is_paired(mixed):
    ds = dataset(mixed, pairing="hybrid", augment=True, seed=1)
    flags = {True: 0, False: 0}
    for i in range(len(ds)):
        item = ds[(2, i, i)]
        assert item["has_ct_reg"] == (item["mr_case"] in ("c00", "c01"))
        assert item["has_mr_reg"] == (item["ct_case"] in ("c00", "c01"))
        flags[bool(item["has_ct_reg"])] += 1
        if item["has_ct_reg"]:  # registered CT = -MR, transformed with the MR tile
            torch.testing.assert_close(item["ct_reg"], -item["mr"], rtol=0, atol=0)
        else:
            assert not item["ct_reg"].any()
        if item["has_mr_reg"]:
            torch.testing.assert_close(item["mr_reg"], -item["ct"], rtol=0, atol=0)
    assert flags[True] == 12 and flags[False] == 6


# --------------------------------------------------------------------------------------------------
# augmentation


def test_augmentation_is_the_same_for_a_registered_pair_and_reproducible(mixed):
    ds = dataset(mixed, pairing="paired", augment=True, seed=5)
    changed = 0
    for i in range(len(ds)):
        item = ds[(0, i, i)]
        assert item["mr"].shape == item["ct"].shape == (1, SIZE, SIZE)  # whole tiles, never cropped
        torch.testing.assert_close(item["ct"], -item["mr"], rtol=0, atol=0)  # same flip and affine
        again = ds[(0, i, i)]
        torch.testing.assert_close(again["mr"], item["mr"], rtol=0, atol=0)
        changed += not torch.equal(item["mr"], torch.from_numpy(raw(mixed, *ds.mr_refs[i], "mr")))  # flipped / rotated / scaled
    assert changed >= 3
    other_seed = dataset(mixed, pairing="paired", augment=True, seed=6)
    assert any(not torch.equal(other_seed[(0, i, i)]["mr"], ds[(0, i, i)]["mr"]) for i in range(len(ds)))


def test_unpaired_ct_gets_its_own_augmentation(mixed):
    from medcycle.data import dataset as module

    ds = dataset(mixed, augment=True, seed=2)
    own = shared = 0
    for i in range(len(ds)):
        item = ds[(0, i, i)]
        ct = {"ct": raw(mixed, item["ct_case"], item["ct_tile"], "ct")}
        mine = module._apply(ds._ct_transform, dict(ct), module.derived_seed(2, 0, i, module._STREAM_AUGMENT_CT))["ct"]
        mr_draw = module._apply(ds._mr_transform, dict(ct), module.derived_seed(2, 0, i, module._STREAM_AUGMENT_MR))["ct"]
        own += torch.equal(item["ct"], mine)
        shared += torch.equal(item["ct"], mr_draw)
    assert own == len(ds) and shared < len(ds) // 2


def test_mr_gamma_bends_only_the_mr_contrast_keeping_its_range(mixed):
    ds = dataset(mixed, pairing="hybrid", augment=False, seed=3, mr_gamma=(0.5, 2.0))
    gammas = []
    for i in range(len(ds)):
        item = ds[(0, i, i)]
        original = torch.from_numpy(raw(mixed, *ds.mr_refs[i], "mr"))
        lo, hi = original.min(), original.max()
        torch.testing.assert_close(item["mr"].min(), lo)
        torch.testing.assert_close(item["mr"].max(), hi)
        unit, bent = (original - lo) / (hi - lo), (item["mr"] - lo) / (hi - lo)
        inner = (unit > 0.05) & (unit < 0.95)
        gamma = torch.log(bent[inner]) / torch.log(unit[inner])  # one gamma per tile: the same at every voxel
        assert float(gamma.std()) < 1e-3 and 0.5 - 1e-3 <= float(gamma.mean()) <= 2.0 + 1e-3
        gammas.append(float(gamma.mean()))
        np.testing.assert_array_equal(item["ct"].numpy(), raw(mixed, item["ct_case"], item["ct_tile"], "ct"))
        if item["has_ct_reg"]:  # the registered partners keep their contrast
            torch.testing.assert_close(item["ct_reg"], -original, rtol=0, atol=0)
        if item["has_mr_reg"]:
            torch.testing.assert_close(item["mr_reg"], -item["ct"], rtol=0, atol=0)
    assert max(gammas) - min(gammas) > 0.5  # drawn anew for each item
    with pytest.raises(Exception, match="train.mr_gamma"):
        load_config(None, ["train.mr_gamma=[1.5,0.8]"])


def test_without_augmentation_the_tiles_are_unchanged(mixed):
    ds = dataset(mixed, augment=False)
    item = ds[(4, 0, 7)]
    np.testing.assert_array_equal(item["mr"].numpy(), raw(mixed, *ds.mr_refs[7], "mr"))
    assert item["mr"].dtype == torch.float32 and item["mr"].shape == (1, SIZE, SIZE)


# --------------------------------------------------------------------------------------------------
# sampling


def test_each_epoch_is_a_permutation_and_resuming_continues_the_sequence():
    sampler = EpochSampler(10, seed=4, batch_size=3)
    assert sampler.per_rank == 9  # whole batches: one tile left out per epoch
    stream = iter(sampler)
    keys = [next(stream) for _ in range(9 * 3)]
    for e in range(3):
        epoch = keys[9 * e: 9 * (e + 1)]
        assert [k[0] for k in epoch] == [e] * 9 and [k[1] for k in epoch] == list(range(9))
        assert len({k[2] for k in epoch}) == 9  # no tile twice in an epoch
    assert [k[2] for k in keys[:9]] != [k[2] for k in keys[9:18]]
    state = sampler.after(*keys[13][:2])  # served up to epoch 1 position 4
    resumed = EpochSampler(10, seed=4, batch_size=3, epoch=state["epoch"], position=state["position"])
    stream = iter(resumed)
    assert [next(stream) for _ in range(13)] == keys[14:]
    assert sampler.after(1, 8) == {"epoch": 2, "position": 0}


def test_ranks_take_disjoint_shards_of_the_same_permutation():
    shards = [EpochSampler(23, seed=1, batch_size=2, rank=r, world=3) for r in range(3)]
    assert all(s.per_rank == 6 for s in shards)
    for epoch in range(3):
        parts = [set(s.permutation(epoch).tolist()) for s in shards]
        assert sum(len(p) for p in parts) == 18 and len(set.union(*parts)) == 18
    assert resumed_position({"epoch": 2, "position": 4, "world_size": 2}, world=1, batch_size=2, per_rank=22) == (2, 8)
    with pytest.raises(InputError, match="cannot fill one batch"):
        EpochSampler(3, seed=0, batch_size=2, world=2)


def test_loader_with_workers_gives_the_same_batches(mixed):
    ds = dataset(mixed, pairing="hybrid", augment=True, seed=9)

    def batches(workers: int) -> list[dict]:
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), 9, 4), num_workers=workers,
                                             generator=torch.Generator().manual_seed(0))
        stream = iter(loader)
        return [next(stream) for _ in range(6)]  # crosses an epoch (16 tiles per epoch)

    for a, b in zip(batches(0), batches(2)):
        assert a["mr_case"] == b["mr_case"] and a["ct_case"] == b["ct_case"]
        for key in ("mr", "ct", "ct_reg", "mr_reg", "epoch", "position"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# compatibility and fixed selections


def test_data_config_mismatch_names_the_keys(mixed):
    manifest = load_manifest(mixed)
    same = load_config(None, ["data.tile_size=32", "data.val_cases=3"]).to_dict()["data"]
    check_data_config(manifest, same, mixed)  # val_cases only chooses the split
    other = load_config(None, ["data.tile_size=64", "data.spacing=[2, 2]"]).to_dict()["data"]
    with pytest.raises(InputError, match=r"data.spacing.*data.tile_size.*re-run medcycle preprocess with this config"):
        check_data_config(manifest, other, mixed)


def test_validation_tiles_are_spread_over_the_paired_val_cases(tmp_path):
    cache = make_cache(tmp_path / "c", ("paired", "paired", "paired", "paired"), tiles=5, val=2)
    tiles = validation_tiles(cache, load_manifest(cache), max_tiles=4)
    assert tiles["refs"] == [("c02", 0), ("c02", 3), ("c03", 1), ("c03", 4)]
    assert tiles["mr"].shape == (4, 1, SIZE, SIZE) and tiles["mask"].shape == (4, SIZE, SIZE) and tiles["mask"].dtype == bool
    np.testing.assert_array_equal(tiles["ct"][1], raw(cache, "c02", 3, "ct"))
    assert validation_tiles(cache, load_manifest(cache), max_tiles=50)["mr"].shape[0] == 10
    assert spread(10, 3) == [0, 4, 9] and spread(2, 5) == [0, 1]
    no_val = make_cache(tmp_path / "n", ("paired", "mr"), val=0)
    assert validation_tiles(no_val, load_manifest(no_val), 8) is None
    preview = preview_tiles(no_val, load_manifest(no_val), 4)
    assert preview["registered"] and all(case == "c00" for case, _ in preview["refs"])
    np.testing.assert_array_equal(preview["ct"], -preview["mr"])
    unpaired = make_cache(tmp_path / "u", ("mr", "ct"), val=0)
    preview = preview_tiles(unpaired, load_manifest(unpaired), 4)
    assert not preview["registered"] and preview["mr"].shape == preview["ct"].shape == (4, 1, SIZE, SIZE)
