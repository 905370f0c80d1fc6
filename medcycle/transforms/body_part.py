"""Is this a head? The check a head model makes before it trains on or converts a scan.

:func:`head_check` measures the body's largest axial cross-section (left-right width, front-back
depth), and on a CT the air the body encloses, and gives a verdict: a head is at most
``HEAD_MAX_WIDTH_MM`` wide, not much wider than deep and holds under ``HEAD_MAX_AIR_CM3`` of air
(sinuses, mastoids, airway), while a chest is 250-400 mm wide, wider than deep and holds litres of lung.
It also warns, whatever the body part, about a field of view that cuts the body and about a "body"
that fills the image (a mask that failed). Measured on every real scan of docs/results/real-scans.md:
each criterion alone separates the two chest CTs from all ten heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from medcycle.image import ArrayLike, voxels

# Adult heads with ears and nose: 140-205 mm wide and 170-230 mm deep; chests and abdomens 250-400 mm wide.
HEAD_MAX_WIDTH_MM = 230.0
HEAD_MAX_WIDTH_TO_DEPTH = 1.1
HEAD_MAX_AIR_CM3 = 400.0
AIR_HU = -400.0  # below: air inside the body (lungs, sinuses, airway)
BORDER_SLICES_PERCENT = 50.0  # a body touching the image border on more of its slices: the field of view cuts it
FILLED_PERCENT = 95.0  # a body filling more of its largest slice: no air around it


@dataclass
class BodyPart:
    """The shape of the body's largest axial cross-section, the verdict and what to tell the user."""

    width_mm: float  # along the first in-plane axis (left-right on the RAS model grid)
    depth_mm: float  # along the second (front-back)
    area_cm2: float
    air_cm3: Optional[float]  # CT only: air (< AIR_HU) enclosed by the body
    border_slices_percent: float  # slices whose body touches the in-plane image border
    filled_percent: float  # the body's share of the image on its largest slice
    reasons: list = field(default_factory=list)  # why it is not a head (empty: a head)
    warnings: list = field(default_factory=list)

    @property
    def is_head(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        return "head" if self.is_head else "not a head: " + "; ".join(self.reasons)

    def notes(self) -> list:
        """What to tell the user: the verdict when not a head, then the warnings (empty: nothing to say)."""
        return ([f"not a head ({'; '.join(self.reasons)})"] if self.reasons else []) + list(self.warnings)

    def record(self) -> dict:
        """A JSON-serialisable summary for a case's record."""
        return {"verdict": self.verdict, "is_head": self.is_head, "width_mm": round(self.width_mm, 1),
                "depth_mm": round(self.depth_mm, 1), "area_cm2": round(self.area_cm2, 1),
                "air_cm3": None if self.air_cm3 is None else round(self.air_cm3, 1),
                "border_slices_percent": round(self.border_slices_percent, 1),
                "filled_percent": round(self.filled_percent, 1), "notes": self.notes()}


def head_check(mask: ArrayLike, spacing: Sequence[float], ct_hu: Optional[ArrayLike] = None) -> BodyPart:
    """Measure the body in boolean (X, Y, Z) `mask` (axial slices along the last axis) with voxels of
    `spacing` mm; `ct_hu`, the CT in HU on the same grid, adds the enclosed air. Costs a few ms."""
    m = voxels(mask) > 0
    sx, sy, sz = (float(s) for s in spacing)
    areas = m.sum(axis=(0, 1))
    if not areas.any():
        return BodyPart(0.0, 0.0, 0.0, None, 0.0, 0.0, reasons=["no body in the mask"])
    z = int(np.argmax(areas))
    xs, ys = np.nonzero(m[:, :, z].any(axis=1))[0], np.nonzero(m[:, :, z].any(axis=0))[0]
    width, depth = (int(xs[-1]) - int(xs[0]) + 1) * sx, (int(ys[-1]) - int(ys[0]) + 1) * sy
    air = None
    if ct_hu is not None:
        air = float((m & (voxels(ct_hu) < AIR_HU)).sum()) * sx * sy * sz / 1000.0
    on_border = m[0].any(axis=0) | m[-1].any(axis=0) | m[:, 0].any(axis=0) | m[:, -1].any(axis=0)
    border = 100.0 * float(on_border[areas > 0].mean())
    filled = 100.0 * float(areas[z]) / float(m.shape[0] * m.shape[1])
    reasons = []
    if width > HEAD_MAX_WIDTH_MM:
        reasons.append(f"{width:.0f} mm wide")
    if width / depth > HEAD_MAX_WIDTH_TO_DEPTH:
        reasons.append(f"wider than deep ({width / depth:.2f})")
    if air is not None and air > HEAD_MAX_AIR_CM3:
        reasons.append(f"{air:.0f} cm3 of air inside")
    warnings = []
    if filled > FILLED_PERCENT:
        warnings.append(f"the body fills {filled:.0f} % of the image: no air around it, the mask may be the whole image")
    elif border > BORDER_SLICES_PERCENT:
        warnings.append(f"the body touches the image border on {border:.0f} % of its slices: the field of view cuts it")
    return BodyPart(width, depth, float(areas[z]) * sx * sy / 100.0, air, border, filled, reasons, warnings)


def trained_anatomy(cases: Mapping[str, Mapping]) -> str:
    """What a model trained on the ``train`` cases of a cache manifest's `cases` knows: ``head`` when
    every one was checked a head, ``other`` when one was not, ``unknown`` when one was never checked
    (caches of older versions)."""
    heads = [entry.get("head") for entry in cases.values() if entry.get("split", "train") == "train"]
    if any(head is False for head in heads):
        return "other"
    return "head" if heads and all(head is True for head in heads) else "unknown"


__all__ = ["BodyPart", "HEAD_MAX_AIR_CM3", "HEAD_MAX_WIDTH_MM", "HEAD_MAX_WIDTH_TO_DEPTH", "head_check", "trained_anatomy"]
