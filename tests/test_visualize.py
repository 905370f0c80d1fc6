"""Figures: valid PNGs written atomically, true aspect ratio from the spacing, radiological orientation."""
import numpy as np
import pytest

from medcycle import visualize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _volumes(shape=(30, 24, 12)):
    idx = np.indices(shape, dtype=np.float64)
    r2 = sum(((i - (n - 1) / 2) / (0.4 * n)) ** 2 for i, n in zip(idx, shape))
    mask = r2 < 1
    ct = np.where(mask, 40.0, -1000.0)
    ct[mask & (r2 > 0.6)] = 1100.0
    sct = ct + np.random.default_rng(0).normal(0, 40, shape)
    mr = np.where(mask, 400.0, 5.0) + 4 * idx[1]
    return sct.astype(np.float32), ct.astype(np.float32), mr.astype(np.float32), mask


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(str(path))


def _boxes(figure):
    """{(row label, column title): (aspect, rendered height / width)} of the image axes."""
    figure.canvas.draw()
    grid = [ax for ax in figure.axes if ax.get_images()]
    out = {}
    for ax in grid:
        box = ax.get_window_extent()
        spec = ax.get_subplotspec()
        out[(spec.rowspan.start, spec.colspan.start)] = (ax.get_aspect(), box.height / box.width,
                                                        ax.get_images()[0].get_array().shape)
    return out


def test_evaluation_figure_writes_a_png_atomically(tmp_path):
    sct, ct, mr, mask = _volumes()
    path = visualize.evaluation_figure(tmp_path / "sub" / "case.png", sct, ct, (1.0, 1.0, 2.5), mr=mr, mask=mask,
                                       title="case: MAE 40 HU")
    assert path == tmp_path / "sub" / "case.png"
    image = _read_png(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert [p.name for p in path.parent.iterdir()] == ["case.png"]  # no temporary file left


def test_evaluation_figure_columns_and_rows():
    sct, ct, mr, mask = _volumes()
    with_mr = visualize.build_evaluation_figure(sct, ct, (1, 1, 1), mr=mr, mask=mask)
    boxes = _boxes(with_mr)
    assert sorted(boxes) == [(r, c) for r in range(3) for c in range(4)]
    titles = [ax.get_title() for ax in with_mr.axes if ax.get_images() and ax.get_subplotspec().rowspan.start == 0]
    assert titles == ["MR", "sCT", "CT", "|sCT - CT|"]
    labels = [ax.get_label() for ax in with_mr.axes if not ax.get_images()]
    assert len(labels) == 3  # one colour bar per error panel
    without = visualize.build_evaluation_figure(sct, ct, (1, 1, 1))
    assert sorted(_boxes(without)) == [(r, c) for r in range(3) for c in range(3)]


def test_pixel_aspect_follows_the_spacing():
    sct, ct, _, mask = _volumes()
    iso = _boxes(visualize.build_evaluation_figure(sct, ct, (1.0, 1.0, 1.0), mask=mask))
    aniso = _boxes(visualize.build_evaluation_figure(sct, ct, (0.5, 1.0, 3.0), mask=mask))
    # axial: rows are y, columns x -> aspect sy/sx; coronal sz/sx; sagittal sz/sy
    for row, expected in ((0, 1.0 / 0.5), (1, 3.0 / 0.5), (2, 3.0 / 1.0)):
        aspect, ratio, shape = aniso[(row, 0)]
        assert aspect == pytest.approx(expected)
        # the drawn box has the physical proportions of the slice (rows * aspect / columns)
        assert ratio == pytest.approx(shape[0] * expected / shape[1], rel=0.02)
        iso_aspect, iso_ratio, iso_shape = iso[(row, 0)]
        assert iso_aspect == pytest.approx(1.0)
        assert iso_ratio == pytest.approx(iso_shape[0] / iso_shape[1], rel=0.02)
    # the MR-less figure puts the sCT first; every column of one row has the same box
    assert len({round(aniso[(1, c)][1], 3) for c in range(3)}) == 1


def test_orthogonal_views_radiological_orientation():
    volume = np.zeros((8, 6, 5))
    volume[7, 5, 4] = 1.0  # the most right, anterior, superior voxel (RAS axes)
    volume[0, 0, 0] = 2.0  # left, posterior, inferior
    views = {name: (image, aspect) for name, image, aspect in
             visualize.orthogonal_views(volume, (1.0, 2.0, 3.0), centre=(7, 5, 4))}
    axial, coronal, sagittal = views["axial"][0], views["coronal"][0], views["sagittal"][0]
    # axial (y rows, x columns): anterior up, patient's right on the viewer's left
    assert axial.shape == (6, 8) and axial[0, 0] == 1.0
    # coronal (z rows, x columns): superior up, right on the left
    assert coronal.shape == (5, 8) and coronal[0, 0] == 1.0
    # sagittal (z rows, y columns): superior up, anterior on the left
    assert sagittal.shape == (5, 6) and sagittal[0, 0] == 1.0
    low = {name: image for name, image, _ in visualize.orthogonal_views(volume, (1, 2, 3), centre=(0, 0, 0))}
    assert low["axial"][-1, -1] == 2.0 and low["coronal"][-1, -1] == 2.0 and low["sagittal"][-1, -1] == 2.0
    assert views["axial"][1] == pytest.approx(2.0) and views["coronal"][1] == pytest.approx(3.0)
    assert views["sagittal"][1] == pytest.approx(1.5)


def test_evaluation_figure_refuses_mismatched_arrays(tmp_path):
    sct, ct, _, mask = _volumes()
    with pytest.raises(ValueError, match="shape"):
        visualize.evaluation_figure(tmp_path / "x.png", sct, ct[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        visualize.evaluation_figure(tmp_path / "x.png", sct, ct, (1, 0, 1))
    assert not list(tmp_path.iterdir())


def test_training_sheet_layout_and_png(tmp_path):
    rng = np.random.default_rng(0)
    columns = {name: rng.uniform(-1, 1, (3, 16, 16)).astype(np.float16) for name in ("MR", "sCT", "rec MR", "CT")}
    figure = visualize.build_training_sheet(columns, title="iteration 100")
    grid = [ax for ax in figure.axes if ax.get_images()]
    assert len(grid) == 12
    assert [ax.get_title() for ax in grid if ax.get_subplotspec().rowspan.start == 0] == list(columns)
    for ax in grid:
        image = ax.get_images()[0]
        assert image.get_clim() == (-1.0, 1.0)
    path = visualize.training_sheet(tmp_path / "images" / "iter_000100.png", columns, title="iteration 100")
    image = _read_png(path)
    assert image.shape[0] < image.shape[1]  # 3 rows, 4 columns of square tiles
    assert [p.name for p in path.parent.iterdir()] == ["iter_000100.png"]


def test_training_sheet_shows_tiles_radiologically():
    tile = np.full((1, 8, 6), -1.0)
    tile[0, 7, 5] = 1.0  # x high (patient right), y high (anterior)
    figure = visualize.build_training_sheet({"MR": tile})
    shown = figure.axes[0].get_images()[0].get_array()
    assert shown.shape == (6, 8) and shown[0, 0] == 1.0
    raw = visualize.build_training_sheet({"MR": tile}, radiological=False).axes[0].get_images()[0].get_array()
    assert raw.shape == (8, 6) and raw[7, 5] == 1.0


def test_training_sheet_accepts_tensors_and_channels(tmp_path):
    import torch

    tiles = torch.zeros(2, 3, 8, 8, dtype=torch.float16)
    tiles[:, 1] = 0.5  # the centre channel is shown
    figure = visualize.build_training_sheet({"MR": tiles, "sCT": torch.zeros(2, 8, 8)})
    assert float(figure.axes[0].get_images()[0].get_array().mean()) == pytest.approx(0.5)


def test_training_sheet_refusals():
    with pytest.raises(ValueError):
        visualize.build_training_sheet({})
    with pytest.raises(ValueError, match="same number"):
        visualize.build_training_sheet({"MR": np.zeros((2, 8, 8)), "CT": np.zeros((3, 8, 8))})
    with pytest.raises(ValueError, match="must be"):
        visualize.build_training_sheet({"MR": np.zeros((2, 2, 8, 8, 1))})
