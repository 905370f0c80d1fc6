"""Intensities the networks see: the MR normalisation and the HU codec of the CT.

* MR: linearly from its (low, high) percentiles inside the body mask onto [-1, 1], clipped
  (:class:`NormalizeMRd`);
* CT: :class:`HUCodec` is the one owner of the mapping between Hounsfield units and [-1, 1]: the
  window ``data.ct_window`` maps linearly onto [-1, 1] (clipped; exactly -1 and 1 at its ends), then
  the contrast curve of ``data.ct_knots`` moves each knot's HU onto its value, linearly in between
  (e.g. (-200, -0.85) and (200, -0.3) give the soft-tissue range 2.8x the share of [-1, 1] it has
  linearly). :meth:`HUCodec.encode` goes from HU (preprocessing, :class:`EncodeCTd`),
  :meth:`HUCodec.decode_` back to HU (conversion, validation).
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medcycle.config import DataConfig
from medcycle.image import voxels, with_values
from medcycle.transforms.body_mask import MASK_KEY


def percentile_range(values: np.ndarray, mask: Optional[np.ndarray], percentiles: Sequence[float]) -> tuple[float, float]:
    """(low, high) percentiles of `values` inside `mask` (everywhere when the mask is empty or flat there)."""
    inside = values[mask] if mask is not None and mask.any() else values.ravel()
    low, high = (float(v) for v in np.percentile(inside, list(percentiles)))
    if high <= low:
        low, high = (float(v) for v in np.percentile(values, list(percentiles)))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return low, high


def _affine_map(values: np.ndarray, a_min: float, a_max: float, b_min: float, b_max: float, clip: bool) -> np.ndarray:
    """``(values - a_min) / (a_max - a_min) * (b_max - b_min) + b_min`` (clipped), float32, a new array.

    The operations run in MONAI ``ScaleIntensityRange``'s order, so that ``a_min`` and ``a_max`` map
    exactly onto ``b_min`` and ``b_max``; numpy in place, without the tensor version's temporaries.
    """
    out = np.subtract(values, np.float32(a_min), dtype=np.float32)
    out /= np.float32(a_max - a_min)
    out *= np.float32(b_max - b_min)
    out += np.float32(b_min)
    if clip:
        np.clip(out, b_min, b_max, out=out)
    return out


class NormalizeMRd(MapTransform):
    """Map the MR linearly from its (low, high) percentiles inside the body mask to [-1, 1], clipped.

    ``mr_low`` and ``mr_high`` (input units) are stored in the MR's meta so the mapping is recorded.
    """

    def __init__(self, keys: KeysCollection = ("mr",), mask_key: str = MASK_KEY,
                 percentiles: Sequence[float] = (0.5, 99.5), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.percentiles = tuple(float(p) for p in percentiles)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = voxels(d[self.mask_key]) > 0 if self.mask_key in d else None
        for key in self.key_iterator(d):
            image = d[key]
            values = voxels(image)
            low, high = percentile_range(values, mask, self.percentiles)
            out = _affine_map(values, low, high, -1.0, 1.0, clip=True)
            if isinstance(image, MetaTensor):
                d[key] = with_values(image, out[None])
                d[key].meta["mr_low"], d[key].meta["mr_high"] = low, high
            else:
                d[key] = torch.from_numpy(out[None])
        return d


def _piecewise_(values: torch.Tensor, xs: Sequence[float], ys: Sequence[float]) -> torch.Tensor:
    """Map `values` (inside [xs[0], xs[-1]]) through the rising piecewise-linear curve xs -> ys, in place."""
    original = values.clone()
    values.fill_(ys[0])
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        values.add_((original - x0).clamp_(0.0, x1 - x0), alpha=(y1 - y0) / (x1 - x0))
    return values


class HUCodec:
    """CT numbers in HU <-> the networks' [-1, 1]: ``data.ct_window`` linearly, then the ``data.ct_knots`` curve."""

    def __init__(self, window: Sequence[float], knots: Sequence[Sequence[float]] = ()) -> None:
        self.low, self.high = (float(v) for v in window)
        self._linear = [-1.0, *(2 * (float(h) - self.low) / (self.high - self.low) - 1 for h, _ in knots), 1.0]
        self._curved = [-1.0, *(float(v) for _, v in knots), 1.0]

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "HUCodec":
        return cls(cfg.ct_window, cfg.ct_knots)

    @property
    def is_linear(self) -> bool:
        return len(self._linear) == 2

    def encode(self, hu: np.ndarray) -> np.ndarray:
        """[-1, 1] float32 values (a new array) of CT numbers `hu`, clipped to the window."""
        out = _affine_map(hu, self.low, self.high, -1.0, 1.0, clip=True)
        if not self.is_linear:
            _piecewise_(torch.from_numpy(out).clamp_(-1.0, 1.0), self._linear, self._curved)
        return out

    def decode_(self, values: torch.Tensor) -> torch.Tensor:
        """HU of the networks' values, in place on a float tensor (values outside [-1, 1] are clipped)."""
        values.clamp_(-1.0, 1.0)
        if not self.is_linear:
            _piecewise_(values.clamp_(-1.0, 1.0), self._curved, self._linear)
        return values.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5 * (self.high - self.low)).add_(self.low)

    def decode(self, values: np.ndarray) -> np.ndarray:
        """HU (float32, a new array) of the networks' values."""
        return self.decode_(torch.from_numpy(np.array(values, dtype=np.float32))).numpy()


class EncodeCTd(MapTransform):
    """The CT in HU onto the networks' [-1, 1] with :meth:`HUCodec.encode`."""

    def __init__(self, keys: KeysCollection, codec: HUCodec, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.codec = codec

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.as_tensor().detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            out = self.codec.encode(values)
            d[key] = with_values(image, out) if isinstance(image, MetaTensor) else torch.from_numpy(out)
        return d


__all__ = ["EncodeCTd", "HUCodec", "NormalizeMRd", "percentile_range"]
