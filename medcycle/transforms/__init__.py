"""MONAI dictionary transforms shared by ``medcycle preprocess`` and ``medcycle convert``.

:func:`volume_transforms` is the one volume-level chain both jobs run, so a model sees at conversion
exactly the preprocessing it was trained with::

    LoadVolumed -> CheckSameGridd -> Orientationd -> Spacingd -> BodyMaskd -> NormalizeMRd -> EncodeCTd

Keys are any of ``mr``, ``ct`` and ``mask`` (at least one image), each a path or an image already
read (:mod:`medcycle.image`). After the chain every present key holds a float32 ``MetaTensor``
``(1, X', Y', Z')`` on the model grid (orientation ``data.orientation``, in-plane spacing
``data.spacing``, the slice spacing kept) that still knows the grid of its file, and ``mask`` always
exists (the given mask binarised, or computed from the MR, or from the CT for a CT-only case).

One module per concept: :mod:`~medcycle.transforms.loading` (reading, grid checks),
:mod:`~medcycle.transforms.body_mask`, :mod:`~medcycle.transforms.intensity` (MR normalisation, the
HU codec), :mod:`~medcycle.transforms.tiling` (training tiles) and :mod:`~medcycle.transforms.inverse`
(back onto the input's grid).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from monai.transforms import Compose, Orientationd, Spacingd

from medcycle.config import DataConfig
from medcycle.errors import MedcycleError
from medcycle.transforms.body_mask import CT_BODY_THRESHOLD_HU, IMAGE_KEYS, MASK_KEY, BodyMaskd, compute_body_mask
from medcycle.transforms.intensity import EncodeCTd, HUCodec, NormalizeMRd
from medcycle.transforms.inverse import to_input_grid
from medcycle.transforms.loading import CheckSameGridd, LoadVolumed
from medcycle.transforms.tiling import BACKGROUND, TilePlan, extract_tiles, plan_tiles

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # affines here are always voxel-to-RAS


class VolumeCompose(Compose):
    """A MONAI ``Compose`` that lets medcycle's user errors through unwrapped.

    MONAI wraps any exception of a transform in ``RuntimeError("applying transform ...")``; an
    :class:`~medcycle.errors.MedcycleError` (e.g. an unreadable file, a CT on another grid) is
    re-raised as itself so callers and the CLI report its one line naming the file.
    """

    def __call__(self, input_, *args: Any, **kwargs: Any):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            cause: Optional[BaseException] = exc
            while cause is not None:
                if isinstance(cause, MedcycleError):
                    raise cause from None
                cause = cause.__cause__
            raise


def volume_transforms(cfg: DataConfig, keys: Sequence[str]) -> Compose:
    """The volume-level chain of preprocess and convert for `keys` (a subset of mr, ct, mask).

    Input: a dict of paths or images. Output: float32 MetaTensors (1, X', Y', Z') on the model grid
    for every key plus ``mask`` (always): MR in [-1, 1] (``meta['mr_low'/'mr_high']``), CT in [-1, 1]
    through :class:`HUCodec` (whose ``decode_`` inverts it), mask 0/1. Raises
    :class:`~medcycle.errors.InputError` naming the file for unreadable inputs and for a CT or mask
    whose grid differs from the MR's.
    """
    keys = [str(k) for k in keys]
    unknown = sorted(set(keys) - {*IMAGE_KEYS, MASK_KEY})
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected a subset of mr, ct, mask")
    images = [k for k in IMAGE_KEYS if k in keys]
    if not images:
        raise ValueError("volume_transforms needs 'mr' or 'ct' among its keys")
    spatial_keys = images + ([MASK_KEY] if MASK_KEY in keys else [])
    modes = ["nearest" if k == MASK_KEY else "bilinear" for k in spatial_keys]
    sx, sy = (float(s) for s in cfg.spacing)
    chain: list = [
        LoadVolumed(spatial_keys),
        CheckSameGridd(spatial_keys, reference_key=images[0]),
        Orientationd(spatial_keys, axcodes=cfg.orientation, labels=RAS_LABELS, allow_missing_keys=True),
        Spacingd(spatial_keys, pixdim=(sx, sy, -1.0), mode=modes, padding_mode="border", dtype=np.float32,
                 allow_missing_keys=True),
        BodyMaskd(source_keys=images, mask_key=MASK_KEY),
    ]
    if "mr" in images:
        chain.append(NormalizeMRd("mr", mask_key=MASK_KEY, percentiles=cfg.mr_percentiles))
    if "ct" in images:
        chain.append(EncodeCTd("ct", HUCodec.from_config(cfg)))
    return VolumeCompose(chain, log_stats=False)


__all__ = [
    "BACKGROUND",
    "BodyMaskd",
    "CT_BODY_THRESHOLD_HU",
    "CheckSameGridd",
    "EncodeCTd",
    "HUCodec",
    "IMAGE_KEYS",
    "LoadVolumed",
    "MASK_KEY",
    "NormalizeMRd",
    "TilePlan",
    "VolumeCompose",
    "compute_body_mask",
    "extract_tiles",
    "plan_tiles",
    "to_input_grid",
    "volume_transforms",
]
