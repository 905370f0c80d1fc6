"""Reading the volumes of a case into images and checking that they share one voxel grid."""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medcycle.image import check_same_grid
from medcycle.io import load_volume
from medcycle.transforms.body_mask import MASK_KEY


class LoadVolumed(MapTransform):
    """Read each key's path once with :func:`medcycle.io.load_volume`; images already read pass through.

    Masks (``mask_keys``) may be all one value; images are refused when constant.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False,
                 mask_keys: Sequence[str] = (MASK_KEY,)) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = tuple(mask_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], MetaTensor):
                d[key] = load_volume(d[key], allow_constant=key in self.mask_keys)
        return d


class CheckSameGridd(MapTransform):
    """Refuse keys whose voxel grid (shape, affine) differs from `reference_key`'s, before any resampling.

    The refusal is an :class:`~medcycle.errors.InputError` naming the offending file (e.g. the CT).
    """

    def __init__(self, keys: KeysCollection, reference_key: Optional[str] = None, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        reference = self.reference_key if self.reference_key in d else (present[0] if present else None)
        for key in present:
            if key != reference:
                check_same_grid(d[reference], d[key])
        return d


__all__ = ["CheckSameGridd", "LoadVolumed"]
