"""PNG figures: training sheets of 2D tiles and 3-view evaluation figures of a synthetic CT.

matplotlib's object API with the Agg canvas (no pyplot, so no global backend state is touched and
the functions are safe in worker processes and threads); every PNG is written atomically
(:func:`medcycle.files.atomic_write`).

Orientation: volumes are ``(X, Y, Z)`` arrays whose axes run (roughly) towards the patient's Right,
Anterior and Superior (RAS, the array convention of medcycle; reorient first otherwise, e.g. with
nibabel's ``as_closest_canonical``). Views are shown the radiological way: axial with anterior up and
the patient's right on the viewer's left; coronal with superior up and the patient's right on the
left; sagittal with superior up and anterior on the left. Pixels are drawn at their true aspect
ratio from the voxel spacing. Training tiles are axial ``(x, y)`` planes of such volumes and are
shown the same way as the axial view.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

CT_DISPLAY_WINDOW = (-1000.0, 2000.0)  # HU, grey
ERROR_DISPLAY_MAX = 500.0  # HU, top of the |sCT - CT| colour scale
ERROR_CMAP = "inferno"
MR_PERCENTILES = (1.0, 99.0)
VIEW_NAMES = ("axial", "coronal", "sagittal")

__all__ = [
    "CT_DISPLAY_WINDOW",
    "ERROR_DISPLAY_MAX",
    "build_evaluation_figure",
    "build_training_sheet",
    "evaluation_figure",
    "orthogonal_views",
    "training_sheet",
]


# --------------------------------------------------------------------------------------------------
# helpers


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: str | Path, dpi: int) -> Path:
    from medcycle.files import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


def _numpy(value: Any) -> np.ndarray:
    """A float32 numpy array from a numpy array or a (CPU or GPU) torch tensor."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _to_display(plane: np.ndarray) -> np.ndarray:
    """A plane (u, v) of axes towards R/A/S -> an image (row 0 on top): v decreasing downwards, u
    decreasing to the right (so anterior or superior up, the patient's right / anterior on the left)."""
    return plane.T[::-1, ::-1]


def _check_volume(array: Any, name: str, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    array = _numpy(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D (X, Y, Z) array, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} shape {array.shape} differs from the sCT's {shape}")
    return array


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _centre_and_crop(mask: Optional[np.ndarray], shape: tuple[int, ...],
                     margin: float = 0.08) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """The voxel through which the views pass (the mask's centre of mass, else the volume's centre)
    and the region shown (the mask's bounding box plus `margin` of its size, else everything)."""
    if mask is None or not mask.any():
        return tuple(n // 2 for n in shape), tuple(slice(0, n) for n in shape)
    centre, crop = [], []
    for axis, n in enumerate(shape):
        profile = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64)
        hit = np.flatnonzero(profile)
        centre.append(int(round(float((profile * np.arange(n)).sum() / profile.sum()))))
        pad = max(2, int(round(margin * (hit[-1] + 1 - hit[0]))))
        crop.append(slice(max(0, int(hit[0]) - pad), min(n, int(hit[-1]) + 1 + pad)))
    return tuple(centre), tuple(crop)


def orthogonal_views(volume: np.ndarray, spacing: Sequence[float],
                     centre: Optional[Sequence[int]] = None) -> list[tuple[str, np.ndarray, float]]:
    """``[(name, image, aspect)]`` for the axial, coronal and sagittal planes through `centre`.

    `volume` is ``(X, Y, Z)`` (RAS axes); each image has row 0 on top in radiological orientation
    (see the module docstring) and `aspect` is its pixel height / width in mm, as matplotlib's
    ``imshow(aspect=...)`` takes it.
    """
    volume = np.asarray(volume)
    sx, sy, sz = _check_spacing(spacing)
    cx, cy, cz = (int(c) for c in centre) if centre is not None else (n // 2 for n in volume.shape)
    return [
        ("axial", _to_display(volume[:, :, cz]), sy / sx),
        ("coronal", _to_display(volume[:, cy, :]), sz / sx),
        ("sagittal", _to_display(volume[cx, :, :]), sz / sy),
    ]


# --------------------------------------------------------------------------------------------------
# evaluation figure


def build_evaluation_figure(sct: np.ndarray, ct: np.ndarray, spacing: Sequence[float],
                            mr: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                            title: str = "", ct_window: tuple[float, float] = CT_DISPLAY_WINDOW,
                            error_max: float = ERROR_DISPLAY_MAX) -> Any:
    """The matplotlib ``Figure`` that :func:`evaluation_figure` writes (rows: axial, coronal,
    sagittal; columns: MR if given, sCT, CT, |sCT - CT|)."""
    sct = _check_volume(sct, "sct")
    ct = _check_volume(ct, "ct", sct.shape)
    mr = _check_volume(mr, "mr", sct.shape) if mr is not None else None
    mask_b = (np.asarray(mask) > 0) if mask is not None else None
    if mask_b is not None and mask_b.shape != sct.shape:
        raise ValueError(f"mask shape {mask_b.shape} differs from the sCT's {sct.shape}")
    spacing = _check_spacing(spacing)

    centre, crop = _centre_and_crop(mask_b, sct.shape)
    local = tuple(c - s.start for c, s in zip(centre, crop))
    error = np.abs(sct[crop] - ct[crop])
    if mask_b is not None:
        error = np.where(mask_b[crop], error, 0.0)

    columns: list[tuple[str, np.ndarray, dict]] = []
    if mr is not None:
        inside = mr[mask_b] if mask_b is not None and mask_b.any() else mr.ravel()
        if inside.size > 2_000_000:
            inside = inside[:: inside.size // 1_000_000]
        low, high = (float(v) for v in np.percentile(inside, MR_PERCENTILES))
        if high <= low:
            high = low + 1.0
        columns.append(("MR", mr[crop], {"cmap": "gray", "vmin": low, "vmax": high}))
    grey = {"cmap": "gray", "vmin": float(ct_window[0]), "vmax": float(ct_window[1])}
    columns.append(("sCT", sct[crop], grey))
    columns.append(("CT", ct[crop], grey))
    columns.append(("|sCT - CT|", error, {"cmap": ERROR_CMAP, "vmin": 0.0, "vmax": float(error_max)}))
    mask_views = orthogonal_views(mask_b[crop], spacing, local) if mask_b is not None else None

    ncols = len(columns)
    figure = _new_figure((2.9 * ncols + 0.9, 3 * 2.9 + (0.4 if title else 0.0)))
    axes = figure.subplots(3, ncols, squeeze=False)
    for col, (label, volume, style) in enumerate(columns):
        for row, (view, image, aspect) in enumerate(orthogonal_views(volume, spacing, local)):
            ax = axes[row][col]
            shown = ax.imshow(image, aspect=aspect, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label)
            if col == 0:
                ax.set_ylabel(view)
            if label.startswith("|") and mask_views is not None:
                outline = mask_views[row][1].astype(np.float32)
                if 0 < outline.sum() < outline.size:
                    ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6)
            if label.startswith("|"):
                figure.colorbar(shown, ax=ax, shrink=0.85, label="HU")
    if title:
        figure.suptitle(title)
    return figure


def evaluation_figure(path: str | Path, sct: np.ndarray, ct: np.ndarray, spacing: Sequence[float],
                      mr: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                      title: str = "", dpi: int = 100) -> Path:
    """Write one PNG: axial, coronal and sagittal views (rows) through the mask's centre (the
    volume's without a mask) of the MR (when given; grey, 1st-99th percentile inside the mask), the
    sCT and the CT (grey, -1000 to 2000 HU) and the absolute error |sCT - CT| (0 to 500 HU, colour
    bar, inside the mask only, mask outline in cyan), cropped to the mask, at the true aspect ratio.

    Arrays are ``(X, Y, Z)`` with RAS axes, `spacing` their voxel size in mm. Returns `path`.
    """
    figure = build_evaluation_figure(sct, ct, spacing, mr=mr, mask=mask, title=title)
    return _save_png(figure, path, dpi)


# --------------------------------------------------------------------------------------------------
# training sheet


def _tiles(value: Any, name: str) -> np.ndarray:
    array = _numpy(value)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 4:  # (N, k, H, W): the centre channel, as the sCT is the centre channel
        array = array[:, array.shape[1] // 2]
    if array.ndim != 3:
        raise ValueError(f"training_sheet: column {name!r} must be (N, H, W), got shape {array.shape}")
    return array


def build_training_sheet(columns: Mapping[str, Any], title: str = "", radiological: bool = True) -> Any:
    """The matplotlib ``Figure`` that :func:`training_sheet` writes."""
    if not columns:
        raise ValueError("training_sheet: no columns given")
    tiles = {str(name): _tiles(value, str(name)) for name, value in columns.items()}
    counts = {name: len(t) for name, t in tiles.items()}
    rows = next(iter(counts.values()))
    if rows == 0 or any(n != rows for n in counts.values()):
        raise ValueError(f"training_sheet: every column needs the same number (> 0) of samples, got {counts}")
    ncols = len(tiles)
    figure = _new_figure((1.9 * ncols, 1.9 * rows + (0.4 if title else 0.0)))
    axes = figure.subplots(rows, ncols, squeeze=False)
    for col, (name, stack) in enumerate(tiles.items()):
        for row in range(rows):
            ax = axes[row][col]
            image = _to_display(stack[row]) if radiological else stack[row]
            ax.imshow(image, cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
    if title:
        figure.suptitle(title)
    return figure


def training_sheet(path: str | Path, columns: Mapping[str, Any], title: str = "",
                   radiological: bool = True, dpi: int = 100) -> Path:
    """Write one PNG of training tiles: one column per entry of `columns` (in dict order, e.g.
    ``{"MR": .., "sCT": .., "rec MR": .., "CT": ..}``), one row per sample, one grey scale [-1, 1].

    Each value is an ``(N, H, W)`` array or tensor in [-1, 1] (``(N, k, H, W)``: the centre channel
    is shown); all have the same N. Tiles are axial ``(x, y)`` planes and are shown radiologically
    (anterior up, patient's right on the left) unless ``radiological=False`` (shown as stored).
    Returns `path`.
    """
    figure = build_training_sheet(columns, title=title, radiological=radiological)
    return _save_png(figure, path, dpi)
