"""Training data over the tile cache: tile datasets, the resumable sampler, validation and preview tiles.

* :class:`TileDataset` serves the ``train`` split of a cache (cases whose manifest split is ``val``
  are for validation only). One item per MR tile; its tiles are memory-mapped
  (:func:`medcycle.data.cache.load_case_tiles`), so a worker reads only the tiles it serves.
  ``loss.pairing`` decides the CT of an item:

  - ``unpaired``: a CT tile drawn independently of the MR tile;
  - ``paired``: the registered CT tile of the same case and slice (only paired cases' MR tiles are
    items; a cache without paired training cases is refused);
  - ``hybrid``: a CT tile drawn independently (for the adversarial and cycle terms) and, besides,
    ``ct_reg`` = the registered CT of the MR tile when its case is paired, and ``mr_reg`` = the
    registered MR of the drawn CT tile when that case is paired (``has_ct_reg`` / ``has_mr_reg``
    say which items have them; the others hold zeros).

* Sampling is a pure function of ``(seed, epoch, index)``, so it is the same in any DataLoader
  worker and after a resume: :class:`EpochSampler` yields ``(epoch, position, index)`` keys, each
  epoch a permutation of the items drawn from ``(seed, epoch)`` (in DDP each rank takes every
  ``world``-th of it); the unpaired CT of item ``i`` in epoch ``e`` is ``ct_perm(seed, e)[i mod n_ct]``,
  a CT permutation drawn from ``(seed, epoch)``, so within an epoch no MR tile repeats and no CT tile
  repeats unless there are fewer CT than MR tiles; the augmentation of an item is seeded from
  ``(seed, epoch, index)``.

* Augmentation (``train.augment``) with MONAI dictionary transforms: left-right flip (``RandFlipd``,
  p 0.5), a small affine (``RandAffined``, p 0.5: rotation +-5 degrees, scale +-5 %, bilinear, border
  padding, i.e. the background -1 continues). Tiles are never cropped: instance norm must see in
  training the statistics it sees in conversion. A registered partner is transformed together with its
  tile (one draw, the same flip and affine); the independently drawn CT gets its own draw.
  ``train.mr_gamma`` bends the contrast of each MR tile (not of its registered partner's CT, nor of
  a registered MR partner) by a gamma drawn from that range, for MRs of other scanners and sequences.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medcycle.data.cache import CaseTiles, load_case_tiles, read_record, select_cases
from medcycle.errors import InputError

#: data-config keys that do not change the tiles (``val_cases`` only chooses the split).
SPLIT_ONLY_KEYS = ("val_cases",)
ROTATION_DEG = 5.0
SCALE = 0.05

# independent random streams derived from (seed, epoch, index)
_STREAM_PERMUTATION, _STREAM_CT_PERMUTATION, _STREAM_AUGMENT_MR, _STREAM_AUGMENT_CT = 11, 12, 13, 14


def derived_seed(*values: int) -> int:
    """A 32-bit seed that is a pure function of `values` (numpy SeedSequence; order matters)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "",
                       ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (keys in `ignore` skipped)."""
    a, b = _flatten(old, prefix), _flatten(new, prefix)
    skip = {prefix + key for key in ignore}
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))


def check_data_config(manifest: Mapping[str, Any], data_config: Mapping[str, Any], cache_dir: str | os.PathLike) -> None:
    """Refuse a cache preprocessed with another data config (``val_cases`` may differ)."""
    cached = manifest.get("data_config") or {}
    differing = config_differences(cached, data_config, "data.", SPLIT_ONLY_KEYS)
    if differing:
        shown = "; ".join(f"{k}: cache {_flatten(cached, 'data.').get(k)!r}, config {_flatten(data_config, 'data.').get(k)!r}"
                          for k in differing[:4])
        raise InputError(f"{cache_dir}: preprocessed with another data config ({shown}); "
                         "re-run medcycle preprocess with this config")


def cases_fingerprint(cache_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> str:
    """A short hash of which cases a cache holds: ids, splits, modalities, tile counts and the sha256 of each
    case's sources. Stored in checkpoints, so that a run resumes only on the cases it was trained on."""
    cases = []
    for case_id, entry in sorted(manifest["cases"].items()):
        sources = (read_record(cache_dir, case_id) or {}).get("sources") or {}
        cases.append([case_id, {k: entry.get(k) for k in ("split", "mr", "ct", "paired", "n_tiles")},
                      {role: (source or {}).get("sha256") for role, source in sorted(sources.items())}])
    return hashlib.sha256(json.dumps(cases, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# augmentation


def build_augmentation(keys: Sequence[str], augment: bool,
                       mr_gamma: tuple[float, float] = (1.0, 1.0)) -> Optional[Any]:
    """MONAI Compose applied to one tile and its registered partner (same draw for every key in `keys`);
    with a `mr_gamma` range other than (1, 1), the ``mr`` key's contrast is then bent by a gamma drawn
    from it (``RandAdjustContrastd``: the tile's minimum, the background, and its maximum stay put).

    Returns None when there is nothing to apply.
    """
    from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandFlipd

    keys = list(keys)
    transforms = []
    if augment:
        transforms += [
            RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),  # tile axis 0 is x (left-right)
            RandAffined(keys, prob=0.5, rotate_range=(math.radians(ROTATION_DEG),), scale_range=(SCALE, SCALE),
                        mode="bilinear", padding_mode="border", allow_missing_keys=True),
        ]
    if "mr" in keys and tuple(mr_gamma) != (1.0, 1.0):
        transforms.append(RandAdjustContrastd(["mr"], prob=1.0, gamma=tuple(mr_gamma)))
    return Compose(transforms) if transforms else None


def _apply(transform: Optional[Any], sample: dict[str, np.ndarray], seed: int) -> dict[str, torch.Tensor]:
    if transform is None:
        return {k: torch.from_numpy(v) for k, v in sample.items()}
    transform.set_random_state(seed=seed)
    out = transform(sample)
    return {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)).contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# the training dataset


class _CaseStore:
    """Memory-mapped case arrays, opened on first use in each process, each checked against the manifest."""

    def __init__(self, cache_dir: Path, manifest: Mapping[str, Any]) -> None:
        self.cache_dir = cache_dir
        self.data_config_hash = manifest["data_config_hash"]
        self._cases: dict[str, CaseTiles] = {}

    def __call__(self, case_id: str) -> CaseTiles:
        tiles = self._cases.get(case_id)
        if tiles is None:
            tiles = self._cases[case_id] = load_case_tiles(self.cache_dir, case_id, data_config_hash=self.data_config_hash)
        return tiles

    def __getstate__(self) -> dict[str, Any]:  # workers started with spawn re-open their own maps
        return {"cache_dir": self.cache_dir, "data_config_hash": self.data_config_hash, "_cases": {}}


def _tile(array: np.ndarray, index: int) -> np.ndarray:
    return np.asarray(array[index], dtype=np.float32)


class TileDataset(Dataset):
    """Items of the `split` of a tile cache for CycleGAN training (see the module docstring).

    ``dataset[(epoch, position, index)]`` (or ``dataset[index]``, epoch 0) returns a dict of float32
    tensors ``mr``, ``ct`` (each ``(k, S, S)``, S the tile size), in ``hybrid``
    mode also ``ct_reg``, ``has_ct_reg``, ``mr_reg``, ``has_mr_reg``, and the bookkeeping ``epoch``,
    ``position``, ``index``, ``mr_case``, ``mr_tile``, ``ct_case``, ``ct_tile``.
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: Mapping[str, Any], split: str = "train",
                 pairing: str = "unpaired", augment: bool = True, seed: int = 0,
                 mr_gamma: tuple[float, float] = (1.0, 1.0)) -> None:
        if pairing not in ("unpaired", "paired", "hybrid"):
            raise ValueError(f"unknown pairing {pairing!r}")
        self.cache_dir = Path(cache_dir)
        self.pairing, self.augment, self.seed = pairing, bool(augment), int(seed)
        cases = manifest["cases"]

        def refs(ids: Sequence[str]) -> list[tuple[str, int]]:
            return [(cid, i) for cid in ids for i in range(int(cases[cid]["n_tiles"]))]

        where = f"{self.cache_dir}: the '{split}' split"
        if pairing == "paired":
            self.mr_refs = refs(select_cases(manifest, split, paired=True))
            self.ct_refs = self.mr_refs
            if not self.mr_refs:
                raise InputError(f"{where} has no paired (MR + CT) case, which loss.pairing=paired needs; "
                                 "use loss.pairing=unpaired or add paired cases")
        else:
            self.mr_refs = refs(select_cases(manifest, split, modality="mr"))
            self.ct_refs = refs(select_cases(manifest, split, modality="ct"))
            if not self.mr_refs:
                raise InputError(f"{where} has no MR tiles to train on")
            if not self.ct_refs:
                raise InputError(f"{where} has no CT tiles to train on")
        self.paired_cases = set(select_cases(manifest, split, paired=True))
        self._store = _CaseStore(self.cache_dir, manifest)
        self._mr_transform = build_augmentation(["mr", "ct", "ct_reg"], self.augment, mr_gamma)
        self._ct_transform = build_augmentation(["ct", "mr_reg"], self.augment)

    def __len__(self) -> int:
        return len(self.mr_refs)

    @functools.lru_cache(maxsize=2)
    def _ct_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(derived_seed(self.seed, epoch, _STREAM_CT_PERMUTATION)).permutation(len(self.ct_refs))

    def ct_index(self, epoch: int, index: int) -> int:
        """Index into ``ct_refs`` of the unpaired CT of item `index` in `epoch`."""
        return int(self._ct_permutation(epoch)[index % len(self.ct_refs)])

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        epoch, position, index = (0, -1, int(key)) if isinstance(key, (int, np.integer)) else map(int, key)
        mr_case, mr_tile = self.mr_refs[index]
        tiles = self._store(mr_case)
        first = {"mr": _tile(tiles.mr, mr_tile)}
        if self.pairing == "paired":
            first["ct"] = _tile(tiles.ct, mr_tile)
            ct_case, ct_tile = mr_case, mr_tile
        elif self.pairing == "hybrid" and tiles.ct is not None:
            first["ct_reg"] = _tile(tiles.ct, mr_tile)
        item = _apply(self._mr_transform, first, derived_seed(self.seed, epoch, index, _STREAM_AUGMENT_MR))
        if self.pairing != "paired":
            ct_case, ct_tile = self.ct_refs[self.ct_index(epoch, index)]
            other_tiles = self._store(ct_case)
            second = {"ct": _tile(other_tiles.ct, ct_tile)}
            if self.pairing == "hybrid" and other_tiles.mr is not None:
                second["mr_reg"] = _tile(other_tiles.mr, ct_tile)
            item.update(_apply(self._ct_transform, second, derived_seed(self.seed, epoch, index, _STREAM_AUGMENT_CT)))
        if self.pairing == "hybrid":
            for name, like in (("ct_reg", "mr"), ("mr_reg", "ct")):
                item[f"has_{name}"] = name in item
                if name not in item:
                    item[name] = torch.zeros_like(item[like])
        item.update(epoch=epoch, position=position, index=index, mr_case=mr_case, mr_tile=mr_tile,
                    ct_case=ct_case, ct_tile=ct_tile)
        return item


# --------------------------------------------------------------------------------------------------
# sampling


class EpochSampler(Sampler):
    """Endless, resumable sampler: yields ``(epoch, position, index)`` keys for :class:`TileDataset`.

    Epoch ``e`` is the permutation of ``range(n)`` drawn from ``(seed, e)``; with ``world`` ranks the
    first ``world * per_rank`` entries are used and rank ``r`` takes entries ``r, r + world, ...``
    (``per_rank`` is ``n // world`` rounded down to a multiple of ``batch_size``, so a batch never
    spans two epochs and no tile is served twice in an epoch). ``position`` counts the keys of this
    rank in its epoch; the iteration starts at ``(epoch, position)``, which is how a resumed run
    continues the same sequence. :meth:`after` gives the state following a served key.
    """

    def __init__(self, n: int, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1,
                 epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.batch_size, self.rank, self.world = int(n), int(seed), int(batch_size), int(rank), int(world)
        self.per_rank = (self.n // self.world) // self.batch_size * self.batch_size
        if self.per_rank < 1:
            raise InputError(f"{self.n} training tiles cannot fill one batch of {self.batch_size}"
                             + (f" on each of {self.world} processes" if self.world > 1 else "")
                             + "; lower train.batch_size or add cases")
        self.epoch, self.position = int(epoch), int(position)
        if not 0 <= self.position < self.per_rank:
            raise ValueError(f"sampler position {position} outside [0, {self.per_rank})")

    def permutation(self, epoch: int) -> np.ndarray:
        """This rank's indices of `epoch`, in order."""
        order = np.random.default_rng(derived_seed(self.seed, epoch, _STREAM_PERMUTATION)).permutation(self.n)
        return order[: self.per_rank * self.world][self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, position = self.epoch, self.position
        while True:
            order = self.permutation(epoch)
            for pos in range(position, self.per_rank):
                yield epoch, pos, int(order[pos])
            epoch, position = epoch + 1, 0

    def after(self, epoch: int, position: int) -> dict[str, int]:
        """The sampler state once the key at ``(epoch, position)`` has been served."""
        position += 1
        if position >= self.per_rank:
            epoch, position = epoch + 1, 0
        return {"epoch": int(epoch), "position": int(position)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world, "batch_size": self.batch_size}


def resumed_position(state: Mapping[str, Any], world: int, batch_size: int, per_rank: int) -> tuple[int, int]:
    """``(epoch, position)`` for this run from a checkpoint's sampler state (written with maybe another world size)."""
    epoch, position = int(state.get("epoch", 0)), int(state.get("position", 0))
    old_world = int(state.get("world_size", world))
    if old_world != world:  # keep the number of tiles served in the epoch, rounded down to whole batches
        position = (position * old_world // world) // batch_size * batch_size
    if position >= per_rank:
        epoch, position = epoch + 1, 0
    return epoch, position


def worker_init(worker_id: int) -> None:
    """DataLoader worker setup: one thread, Ctrl-C left to the main process (it saves the checkpoint)."""
    import random
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # derived by the DataLoader from its seeded generator
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------------------------------
# fixed tile selections: validation and image sheets


def spread(total: int, count: int) -> list[int]:
    """`count` indices evenly spread over ``range(total)`` (all when ``total <= count``)."""
    if total <= count:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def _gather(cache_dir: Path, manifest: Mapping[str, Any], refs: Sequence[tuple[str, int]],
            names: Sequence[str]) -> dict[str, np.ndarray]:
    store = _CaseStore(cache_dir, manifest)
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for case_id, i in refs:
        tiles = store(case_id)
        for name in names:
            array = tiles.mask if name == "mask" else getattr(tiles, name)
            out[name].append(np.asarray(array[i]))
    return {name: np.stack(values) for name, values in out.items()}


def validation_tiles(cache_dir: str | os.PathLike, manifest: Mapping[str, Any], max_tiles: int) -> Optional[dict[str, Any]]:
    """Up to `max_tiles` tiles of the paired ``val`` cases, evenly spread over them (a fixed selection).

    Returns None without paired val cases, else ``{"mr", "ct": (N, k, T, T) float32, "mask": (N, T, T)
    bool, "refs": [(case, tile)]}``.
    """
    ids = select_cases(manifest, "val", paired=True)
    refs = [(cid, i) for cid in ids for i in range(int(manifest["cases"][cid]["n_tiles"]))]
    if not refs:
        return None
    refs = [refs[i] for i in spread(len(refs), max_tiles)]
    arrays = _gather(Path(cache_dir), manifest, refs, ("mr", "ct", "mask"))
    return {"mr": arrays["mr"].astype(np.float32), "ct": arrays["ct"].astype(np.float32),
            "mask": arrays["mask"][:, 0] > 0, "refs": refs}


def preview_tiles(cache_dir: str | os.PathLike, manifest: Mapping[str, Any], count: int = 4) -> dict[str, Any]:
    """Fixed tiles for the training image sheets: MR tiles (of paired val cases if any, else of train
    cases) with their registered CT when their case is paired, else CT tiles of the train split.

    Returns ``{"mr", "ct": (N, k, T, T) float32, "registered": bool, "refs": [(case, tile)]}``.
    """
    cache_dir = Path(cache_dir)
    cases = manifest["cases"]

    def refs_of(ids: Sequence[str]) -> list[tuple[str, int]]:
        return [(cid, i) for cid in ids for i in range(int(cases[cid]["n_tiles"]))]

    for ids in (select_cases(manifest, "val", paired=True), select_cases(manifest, "train", paired=True)):
        refs = refs_of(ids)
        if refs:
            refs = [refs[i] for i in spread(len(refs), count)]
            arrays = _gather(cache_dir, manifest, refs, ("mr", "ct"))
            return {"mr": arrays["mr"].astype(np.float32), "ct": arrays["ct"].astype(np.float32), "registered": True, "refs": refs}
    mr_refs = refs_of(select_cases(manifest, "train", modality="mr"))
    ct_refs = refs_of(select_cases(manifest, "train", modality="ct"))
    n = min(count, len(mr_refs), len(ct_refs))
    mr_refs = [mr_refs[i] for i in spread(len(mr_refs), n)]
    ct_refs = [ct_refs[i] for i in spread(len(ct_refs), n)]
    return {"mr": _gather(cache_dir, manifest, mr_refs, ("mr",))["mr"].astype(np.float32),
            "ct": _gather(cache_dir, manifest, ct_refs, ("ct",))["ct"].astype(np.float32), "registered": False, "refs": mr_refs}


__all__ = [
    "EpochSampler",
    "TileDataset",
    "build_augmentation",
    "cases_fingerprint",
    "check_data_config",
    "config_differences",
    "derived_seed",
    "preview_tiles",
    "resumed_position",
    "spread",
    "validation_tiles",
    "worker_init",
]
