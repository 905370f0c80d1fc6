"""Reading the volumes of a case into images, checking that each looks like its modality (a CT in
Hounsfield units, an MR that is not one) and that they share one voxel grid."""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medcycle.errors import InputError
from medcycle.image import check_same_grid, name_of, voxels
from medcycle.io import load_volume
from medcycle.transforms.body_mask import MASK_KEY

#: Air is near -1000 HU and no tissue lies below -500 HU. A head CT has air around the head: well
#: over 1 % of its voxels, so its 1st percentile is below this; an MR's intensities are never that
#: negative. A percentile, not the minimum, so that a few extreme voxels decide nothing.
AIR_LIMIT_HU = -500.0
AIR_PERCENTILE = 1.0


def low_percentile(image: Any) -> float:
    """The ``AIR_PERCENTILE`` of an image's values (on every 2nd voxel of a large volume)."""
    values = voxels(image)
    sample = values[::2, ::2, ::2] if values.size > 2_000_000 else values
    return float(np.percentile(sample, AIR_PERCENTILE))


def check_modality(image: Any, role: str) -> None:
    """Refuse a ``ct`` that is not in Hounsfield units (no air below -500 HU, e.g. stored 0..4095
    without its -1024 intercept, or an MR) and an ``mr`` with CT-like air values (MR and CT swapped)."""
    if role not in ("mr", "ct"):
        return
    low = low_percentile(image)
    if role == "ct" and low > AIR_LIMIT_HU:
        raise InputError(f"{name_of(image)}: not a CT in Hounsfield units: its percentile {AIR_PERCENTILE:g} is "
                         f"{low:g}, where the air around the head is near -1000 HU (stored without its -1024 rescale "
                         "intercept? an MR given as the CT?)")
    if role == "mr" and low <= AIR_LIMIT_HU:
        raise InputError(f"{name_of(image)}: not an MR: its percentile {AIR_PERCENTILE:g} is {low:g}, like the air "
                         "of a CT in Hounsfield units (MR and CT swapped?)")


class LoadVolumed(MapTransform):
    """Read each key's path once with :func:`medcycle.io.load_volume`; images already read pass through.

    Masks (``mask_keys``) may be all one value; images are refused when constant, and an ``mr`` or
    ``ct`` that does not look like its modality is refused (:func:`check_modality`).
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
            check_modality(d[key], str(key))
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


__all__ = ["AIR_LIMIT_HU", "CheckSameGridd", "LoadVolumed", "check_modality", "low_percentile"]
