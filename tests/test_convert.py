"""`medcycle convert`: an MRI becomes an int16 sCT NIfTI on the input's exact grid.

Tiny volumes and a tiny generator (width 4, 1 block) so the whole file runs in seconds on 2 cores.
"""
from __future__ import annotations

import copy

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from helpers import Constant, make_checkpoint
from medcycle.errors import InputError, MedcycleError, UsageError
from helpers import oblique_affine as _oblique
from helpers import permuted_affine as flipped_affine
from helpers import phantom_mr, write_mha
from helpers import write_nifti as _write_nifti
from medcycle.files import file_checksum
from medcycle.io import sitk_to_ras_affine

# --------------------------------------------------------------------------------------------------
# helpers


def oblique_affine(spacing=(0.8, 1.3, 2.5), **kwargs) -> np.ndarray:
    """Oblique, anisotropic in all three axes."""
    return _oblique(spacing=spacing, **kwargs)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 2) -> Path:
    """Different sform and qform codes, so keeping both shows."""
    return _write_nifti(path, array, affine, sform_code=sform_code, qform_code=qform_code)


def sitk_geometry(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return sitk_to_ras_affine(image), tuple(image.GetSize())


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def use_generator(monkeypatch, module: torch.nn.Module) -> None:
    """Keep the checkpoint's config but replace its generator."""
    import medcycle.checkpoint

    real = medcycle.checkpoint.load_generator

    def fake(path, device="cpu"):
        _, config, state = real(path, device)
        return module, config, state

    monkeypatch.setattr(medcycle.checkpoint, "load_generator", fake)


def convert(*args, **kwargs):
    from medcycle.jobs.convert import run

    return run(*args, **kwargs)


def interior(mask: np.ndarray, margin: int = 2) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(mask, iterations=margin)


# --------------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("affine_kind", ["oblique", "flipped"])
def test_nifti_output_has_the_input_grid(tmp_path, affine_kind):
    affine = oblique_affine() if affine_kind == "oblique" else flipped_affine()
    shape = (40, 30, 8) if affine_kind == "oblique" else (8, 40, 30)
    mr = write_nifti(tmp_path / "mr.nii.gz", phantom_mr(shape), affine)
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    records = convert(mr, tmp_path / "sct.nii.gz", model)
    assert records[0]["status"] == "converted"
    src, out = nib.load(str(mr)), nib.load(str(tmp_path / "sct.nii.gz"))
    assert out.shape == src.shape
    assert out.get_data_dtype() == np.int16
    for name in ("get_sform", "get_qform"):
        (a, code_a), (b, code_b) = getattr(src.header, name)(coded=True), getattr(out.header, name)(coded=True)
        assert int(code_a) == int(code_b)
        np.testing.assert_allclose(a, b, atol=1e-5)
    hu = np.asanyarray(out.dataobj)
    assert hu.min() >= -1024 and hu.max() <= 3000


@pytest.mark.parametrize("kind", ["mha", "dicom"])
def test_mha_and_dicom_inputs_keep_simpleitk_geometry(tmp_path, kind):
    from medcycle.dicom import write_ct_series

    affine = oblique_affine(spacing=(0.9, 1.2, 2.0))
    array = phantom_mr((36, 28, 6))
    if kind == "mha":
        source = write_mha(tmp_path / "mr.mha", array, affine)
    else:
        source = tmp_path / "mr_dicom"
        write_ct_series(source, array, affine)
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    before = file_checksum(source)
    convert(source, tmp_path / "sct.nii.gz", model)
    assert file_checksum(source) == before
    out = nib.load(str(tmp_path / "sct.nii.gz"))
    expected_affine, size = sitk_geometry(source)
    assert out.shape == size
    np.testing.assert_allclose(out.affine, expected_affine, atol=1e-4)
    np.testing.assert_allclose(out.header.get_qform(), expected_affine, atol=1e-4)
    assert out.get_data_dtype() == np.int16


# --------------------------------------------------------------------------------------------------
# values: HU mapping, resampling back, masks


def test_identity_generator_maps_known_values_to_hu_on_the_original_grid(tmp_path, monkeypatch):
    """The bright box normalises to +1, so an identity generator must give ct_window[1] exactly there."""
    use_generator(monkeypatch, Identity())
    affine = flipped_affine()
    shape = (10, 44, 36)
    array = np.transpose(phantom_mr((44, 36, 10)), (2, 0, 1)).copy()  # any voxel order: it is a NIfTI
    mr = write_nifti(tmp_path / "mr.nii.gz", array, affine)
    model = make_checkpoint(tmp_path / "model.pt", tile=16, context=3)
    convert(mr, tmp_path / "sct.nii.gz", model, no_mask=True)
    hu = np.asanyarray(nib.load(str(tmp_path / "sct.nii.gz")).dataobj)
    assert hu.shape == shape
    bright, body = array == 1000.0, array > 0
    np.testing.assert_array_equal(hu[interior(bright, 1)], 3000)
    assert (hu[interior(body & ~bright, 2)] < 2900).all()  # darker tissue stays darker, in the right place
    assert (hu[interior(~body, 2)] == -1024).all()  # air: normalised -1 -> ct_window[0]


@pytest.mark.parametrize("value,knots,expected", [
    (0.5, (), 1994.0), (-0.25, (), 485.0),  # ct_window (-1024, 3000): hu = (v + 1) / 2 * 4024 - 1024
    # the checkpoint's data.ct_knots undone: -0.575 is halfway from -0.85 (-200 HU) to -0.3 (200 HU); 0.35
    # halfway from -0.3 (200 HU) to 1 (3000 HU)
    (-0.575, ((-200.0, -0.85), (200.0, -0.3)), 0.0), (0.35, ((-200.0, -0.85), (200.0, -0.3)), 1600.0),
])
def test_constant_output_hu_and_minus_1000_outside_the_body(tmp_path, monkeypatch, value, knots, expected):
    use_generator(monkeypatch, Constant(value))
    array = phantom_mr((40, 30, 8))
    mr = write_nifti(tmp_path / "mr.nii.gz", array, oblique_affine())
    model = make_checkpoint(tmp_path / "model.pt", tile=16, ct_knots=knots)

    convert(mr, tmp_path / "computed.nii.gz", model)
    hu = np.asanyarray(nib.load(str(tmp_path / "computed.nii.gz")).dataobj)
    body = array > 0
    assert (hu[interior(body)] == expected).all()
    assert (hu[interior(~body)] == -1000).all()
    assert set(np.unique(hu)) <= {-1000, int(expected)}

    mask = np.zeros_like(array)
    mask[5:20, 5:25, 2:6] = 1
    mask_path = write_nifti(tmp_path / "mask.nii.gz", mask, oblique_affine())
    convert(mr, tmp_path / "given.nii.gz", model, mask=mask_path)
    hu = np.asanyarray(nib.load(str(tmp_path / "given.nii.gz")).dataobj)
    np.testing.assert_array_equal(hu, np.where(mask > 0, expected, -1000))

    convert(mr, tmp_path / "nomask.nii.gz", model, no_mask=True)
    hu = np.asanyarray(nib.load(str(tmp_path / "nomask.nii.gz")).dataobj)
    assert (hu == expected).all()


@pytest.mark.parametrize("tile,shape,context", [(16, (40, 34, 6), 1), (32, (18, 14, 5), 1), (16, (40, 34, 6), 3), (32, (18, 14, 5), 3)])
def test_sliding_window_padding_and_25d(tmp_path, monkeypatch, tile, shape, context):
    """Slices larger than the tile (sliding window) and smaller (padding), 2D and 2.5D, real tiny nets."""
    array = phantom_mr(shape)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    mr = write_nifti(tmp_path / "mr.nii.gz", array, affine)
    model = make_checkpoint(tmp_path / "model.pt", tile=tile, context=context)
    convert(mr, tmp_path / "sct.nii.gz", model)
    hu = np.asanyarray(nib.load(str(tmp_path / "sct.nii.gz")).dataobj)
    assert hu.shape == shape and hu.dtype == np.int16
    assert (hu[interior(array == 0)] == -1000).all()
    assert np.unique(hu[interior(array > 0)]).size > 3  # the network's output, not a constant

    use_generator(monkeypatch, Identity())
    convert(mr, tmp_path / "identity.nii.gz", model, no_mask=True, overwrite=True)
    hu = np.asanyarray(nib.load(str(tmp_path / "identity.nii.gz")).dataobj)
    np.testing.assert_array_equal(hu[array == 1000.0], 3000)


def test_synthesize_25d_takes_the_centre_channel_with_edge_replication():
    from medcycle.inferers import Runtime, context_stack, synthesize

    volume = torch.linspace(-1, 1, 7).view(1, 1, 1, 7).expand(1, 20, 12, 7).contiguous()
    stack = context_stack(volume, 3)
    assert stack.shape == (1, 3, 20, 12, 7)
    np.testing.assert_allclose(stack[0, :, 0, 0, 0], [-1.0, -1.0, -2 / 3], atol=1e-6)  # edge replicated
    np.testing.assert_allclose(stack[0, :, 0, 0, 6], [2 / 3, 1.0, 1.0], atol=1e-6)

    class ShiftedChannels(torch.nn.Module):  # output channel c = input channel c, so the centre is the slice
        def forward(self, x):
            return x

    for tile in (8, 16, 32):
        out = synthesize(ShiftedChannels(), volume, tile_size=tile, context_slices=3, runtime=Runtime(batch_size=3))
        torch.testing.assert_close(out, volume, atol=1e-6, rtol=0)


def test_synthesize_skips_windows_without_body_and_runs_bf16(monkeypatch):
    from medcycle import inferers
    from medcycle.engine import amp
    from medcycle.inferers import Runtime

    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append((x.shape[0], x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return x * 0.5

    volume = torch.rand(1, 48, 48, 4) * 2 - 1
    mask = torch.zeros_like(volume)
    mask[:, :10, :10, 1] = 1
    out = inferers.synthesize(Counting(), volume, tile_size=16, mask=mask, runtime=Runtime(batch_size=64, channels_last=True))
    assert sum(n for n, _, _ in calls) < 16  # only windows touching the body of slice 1
    assert calls[0][2]
    torch.testing.assert_close(out[0, :8, :8, 1], volume[0, :8, :8, 1] * 0.5)
    assert (out[..., 0] == -1).all()

    monkeypatch.setattr(amp, "cpu_supports_bf16", lambda: True)
    assert amp.autocast_dtype("auto", "cpu") == torch.bfloat16
    assert amp.autocast_dtype("none", "cpu") is None
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    out = inferers.synthesize(model, volume, tile_size=16, runtime=Runtime(amp="bf16"))
    assert out.dtype == torch.float32 and out.shape == volume.shape
    assert model.weight.dtype == torch.float32  # the bf16 copy is the inferer's own
    with torch.no_grad():
        fp32 = inferers.synthesize(model, volume, tile_size=16, runtime=Runtime(amp="none"))
    assert 0 < (out - fp32).abs().max() < 0.05  # bf16 rounding, no more


def test_synthesize_runs_the_body_region_in_the_window_training_tiles_are_cut_from():
    from types import SimpleNamespace

    from medcycle import inferers
    from medcycle.inferers import Runtime
    from medcycle.transforms.tiling import plan_tiles, window

    windows = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            windows.append(x.clone())
            return x * 0.5

    torch.manual_seed(0)
    volume = torch.rand(1, 48, 48, 3) * 2 - 1
    mask = torch.zeros_like(volume)
    mask[:, 5:25, 10:30, :] = 1  # fits a 32-px tile even grown by MASK_MARGIN
    inferers.synthesize(Recording(), volume, tile_size=32, runtime=Runtime(batch_size=1))
    assert len(windows) == 3 * 4  # whole slices: 2 x 2 overlapping windows each
    windows.clear()
    out = inferers.synthesize(Recording(), volume, tile_size=32, mask=mask, runtime=Runtime(batch_size=1))
    assert len(windows) == 3  # one window per slice
    plan = plan_tiles(mask[0].numpy(), SimpleNamespace(tile_size=32, min_body_fraction=0.0))
    tiles = window(volume[0].numpy(), plan.start, plan.size, pad_value=-1.0)
    for z, seen in enumerate(windows):
        np.testing.assert_array_equal(seen[0, 0].numpy(), tiles[:, :, z])
    x0, y0 = plan.start
    region = torch.zeros(48, 48, dtype=torch.bool)
    region[max(x0, 0):x0 + 32, max(y0, 0):y0 + 32] = True
    torch.testing.assert_close(out[0][region], volume[0][region] * 0.5)
    assert (out[0][~region] == -1).all()

    windows.clear()
    mask[:, 5:25, 10:46, 1] = 1  # a body wider than the tile in y: more windows, all of the body covered
    out = inferers.synthesize(Recording(), volume, tile_size=32, mask=mask, runtime=Runtime(batch_size=1))
    assert 3 < len(windows) < 3 * 4
    torch.testing.assert_close(out[mask > 0], volume[mask > 0] * 0.5)


def test_mirror_tta_is_the_mean_over_the_four_in_plane_mirrorings(tmp_path):
    from medcycle import inferers
    from medcycle.cli import main
    from medcycle.inferers import Runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Tanh())  # not mirror-symmetric
    volume = torch.rand(1, 20, 16, 3) * 2 - 1
    expected = torch.zeros_like(volume)
    for dims in ((), (1,), (2,), (1, 2)):
        flip = (lambda t: t.flip(dims)) if dims else (lambda t: t)
        expected += flip(inferers.synthesize(model, flip(volume), tile_size=16, runtime=Runtime(amp="none")))
    mirrored = inferers.synthesize(model, volume, tile_size=16, tta="mirror", runtime=Runtime(amp="none"))
    torch.testing.assert_close(mirrored, expected / 4, atol=1e-5, rtol=0)
    plain = inferers.synthesize(model, volume, tile_size=16, runtime=Runtime(amp="none"))
    assert (mirrored - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="tta"):
        inferers.synthesize(model, volume, tile_size=16, tta="flip")

    mr = write_nifti(tmp_path / "mr.nii.gz", phantom_mr((30, 26, 5)), oblique_affine())
    checkpoint = make_checkpoint(tmp_path / "model.pt", tile=16)
    assert main(["convert", "-i", str(mr), "-o", str(tmp_path / "mirror.nii.gz"), "-m", str(checkpoint)]) == 0
    assert main(["convert", "-i", str(mr), "-o", str(tmp_path / "none.nii.gz"), "-m", str(checkpoint), "--tta", "none"]) == 0
    mirror_hu, none_hu = (np.asanyarray(nib.load(str(tmp_path / f"{n}.nii.gz")).dataobj) for n in ("mirror", "none"))
    assert mirror_hu.shape == none_hu.shape and (mirror_hu != none_hu).any()
    with pytest.raises(UsageError, match="--tta"):
        convert(mr, tmp_path / "x.nii.gz", checkpoint, tta="flip")


def test_cpu_inference_copy_is_the_same_network_and_goes_channels_last_only_where_it_pays(monkeypatch):
    from medcycle import inferers
    from medcycle.inferers import Runtime, runtime
    from medcycle.networks.generators import ResnetGenerator

    torch.manual_seed(0)
    affine_norm = torch.nn.InstanceNorm2d(2, affine=True)
    torch.nn.init.uniform_(affine_norm.weight, 0.5, 2.0)
    torch.nn.init.uniform_(affine_norm.bias, -1.0, 1.0)
    for network in (ResnetGenerator(1, 1, width=4, n_blocks=1).eval(),
                    torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), affine_norm)):
        original = copy.deepcopy(network)
        tuned = runtime.cpu_copy(network, torch.float32)
        assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in tuned.modules())
        assert any(isinstance(m, torch.nn.GroupNorm) for m in tuned.modules())
        assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in network.modules())  # the caller's is untouched
        x = torch.rand(2, 1, 16, 16) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(tuned(x), original(x), atol=1e-5, rtol=0)

    formats = []

    class Recording(ResnetGenerator):
        def forward(self, x):
            formats.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return super().forward(x)

    generator = Recording(3, 3, width=4, n_blocks=1).eval()
    volume = torch.rand(1, 16, 16, 4) * 2 - 1
    expected = inferers.synthesize(generator, volume, tile_size=16, context_slices=3,
                                   runtime=Runtime(amp="none", channels_last=False))
    assert formats and not any(formats)
    formats.clear()
    for smallest_pixels, channels_last in ((16, True), (17, False)):  # tile 16 / downsampling 4: 4 x 4 maps
        monkeypatch.setattr(runtime, "CPU_CHANNELS_LAST_MIN_PIXELS", smallest_pixels)
        out = inferers.synthesize(generator, volume, tile_size=16, context_slices=3, runtime=Runtime(amp="none"))
        assert formats and set(formats) == {channels_last}
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        formats.clear()


# --------------------------------------------------------------------------------------------------
# folder mode


def _synthrad(root: Path, names, bad: str | None = None) -> Path:
    for name in names:
        case = root / name
        case.mkdir(parents=True)
        if name == bad:
            write_nifti(case / "mr.nii.gz", np.random.rand(12, 10, 1).astype(np.float32), np.eye(4))  # 2D
        else:
            array = phantom_mr((30, 26, 5))
            write_nifti(case / "mr.nii.gz", array, oblique_affine(spacing=(1.0, 1.1, 2.0)))
            write_nifti(case / "mask.nii.gz", (array > 0).astype(np.float32), oblique_affine(spacing=(1.0, 1.1, 2.0)))
    return root


def test_folder_mode_goes_on_past_a_bad_case_then_fails_and_skips_on_rerun(tmp_path, capsys):
    data = _synthrad(tmp_path / "data", ["case_a", "case_b", "case_c"], bad="case_b")
    before = file_checksum(data)
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    out = tmp_path / "sct"
    with pytest.raises(MedcycleError) as info:
        convert(data, out, model)
    assert info.value.exit_code == 1 and "case_b" in str(info.value)
    assert (out / "case_a" / "sct.nii.gz").is_file() and (out / "case_c" / "sct.nii.gz").is_file()
    assert not (out / "case_b").exists() or not any((out / "case_b").iterdir())
    assert "2 converted" in capsys.readouterr().out
    assert file_checksum(data) == before

    (data / "case_b" / "mr.nii.gz").unlink()
    _synthrad(tmp_path / "fix", ["case_b"])
    os.replace(tmp_path / "fix" / "case_b" / "mr.nii.gz", data / "case_b" / "mr.nii.gz")
    os.replace(tmp_path / "fix" / "case_b" / "mask.nii.gz", data / "case_b" / "mask.nii.gz")
    mtime = (out / "case_a" / "sct.nii.gz").stat().st_mtime_ns
    records = convert(data, out, model)
    assert [r["status"] for r in records] == ["skipped", "converted", "skipped"]
    assert (out / "case_a" / "sct.nii.gz").stat().st_mtime_ns == mtime
    records = convert(data, out, model, overwrite=True)
    assert [r["status"] for r in records] == ["converted"] * 3


def test_flat_folder_of_volumes(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    write_nifti(flat / "p1.nii.gz", phantom_mr((30, 26, 5)), np.diag([1.0, 1.0, 2.0, 1.0]))
    write_mha(flat / "p2.mha", phantom_mr((26, 30, 5)), oblique_affine(spacing=(1.0, 1.0, 2.0)))
    p1_mask = np.zeros((30, 26, 5), dtype=np.float32)
    p1_mask[10:20, 10:20, 1:4] = 1
    write_nifti(flat / "p1_mask.nii.gz", p1_mask, np.diag([1.0, 1.0, 2.0, 1.0]))
    (flat / "notes.txt").write_text("not a volume")
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    records = convert(flat, tmp_path / "out", model, dicom_out=tmp_path / "dicom")
    assert sorted(Path(r["output"]).name for r in records) == ["p1_sct.nii.gz", "p2_sct.nii.gz"]
    assert (tmp_path / "dicom" / "p2").is_dir()
    p1 = np.asanyarray(nib.load(str(tmp_path / "out" / "p1_sct.nii.gz")).dataobj)
    assert (p1[p1_mask == 0] == -1000).all() and (p1[p1_mask > 0] > -1000).any()  # p1_mask.nii.gz used
    affine, size = sitk_geometry(flat / "p2.mha")
    out = nib.load(str(tmp_path / "out" / "p2_sct.nii.gz"))
    assert out.shape == size
    np.testing.assert_allclose(out.affine, affine, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# DICOM output


def test_dicom_out_reads_back_in_simpleitk_and_pydicom(tmp_path):
    array = phantom_mr((30, 24, 6))
    affine = oblique_affine(spacing=(0.7, 1.3, 2.5))
    mr = write_nifti(tmp_path / "mr.nii.gz", array, affine)
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    convert(mr, tmp_path / "sct.nii.gz", model, dicom_out=tmp_path / "sct_dicom")
    hu = np.asanyarray(nib.load(str(tmp_path / "sct.nii.gz")).dataobj).astype(np.int32)

    folder = tmp_path / "sct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    np.testing.assert_allclose(sitk_to_ras_affine(image), affine, atol=1e-4)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), hu)

    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 6
    ds = pydicom.dcmread(str(files[3]))
    assert ds.Modality == "CT" and ds.SeriesDescription == "medcycle synthetic CT"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    np.testing.assert_array_equal(ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hu[:, :, 3])

    with pytest.raises(InputError, match="already exists"):  # the NIfTI exists: refused before any work
        convert(mr, tmp_path / "sct.nii.gz", model, dicom_out=folder)
    convert(mr, tmp_path / "sct.nii.gz", model, dicom_out=folder, overwrite=True)
    assert len(list(folder.glob("*.dcm"))) == 6


def test_dicom_input_gives_reference_tags_to_dicom_output(tmp_path):
    from medcycle.dicom import write_ct_series

    source = tmp_path / "mr_dicom"
    ref = pydicom.Dataset()
    ref.PatientName, ref.PatientID, ref.StudyDescription = "Doe^Jane", "P001", "head MR"
    write_ct_series(source, phantom_mr((24, 20, 5)), oblique_affine(spacing=(1.0, 1.0, 2.0)), reference=ref)
    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    convert(source, tmp_path / "sct.nii.gz", model, dicom_out=tmp_path / "sct_dicom")
    src = pydicom.dcmread(str(sorted(source.glob("*.dcm"))[0]))
    out = pydicom.dcmread(str(sorted((tmp_path / "sct_dicom").glob("*.dcm"))[0]))
    assert out.PatientID == "P001" and str(out.PatientName) == "Doe^Jane"
    assert out.StudyInstanceUID == src.StudyInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert out.FrameOfReferenceUID == src.FrameOfReferenceUID


# --------------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing partial written, input untouched


@pytest.fixture
def case(tmp_path):
    mr = write_nifti(tmp_path / "mr.nii.gz", phantom_mr((30, 26, 5)), oblique_affine())
    return mr, make_checkpoint(tmp_path / "model.pt", tile=16)


def _assert_refused(tmp_path, mr, call, error=MedcycleError, match=None, leftover_ok=()):
    before = file_checksum(mr)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    assert file_checksum(mr) == before
    after = sorted(p.name for p in tmp_path.rglob("*"))
    assert [n for n in after if n not in listing and n not in leftover_ok] == []  # no partial output, no temp
    return info.value


def test_refuses_data_that_is_not_3d(tmp_path, case):
    _, model = case
    flat = write_nifti(tmp_path / "flat.nii.gz", np.random.rand(20, 20, 1).astype(np.float32), np.eye(4))
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 4, 3).astype(np.float32), np.eye(4)), str(four))
    for bad in (flat, four):
        _assert_refused(tmp_path, bad, lambda: convert(bad, tmp_path / "out.nii.gz", model), InputError, "3D")


def test_refuses_foreign_and_incomplete_checkpoints(tmp_path, case):
    mr, _ = case
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    incomplete = make_checkpoint(tmp_path / "old.pt")
    state = torch.load(incomplete, weights_only=False)
    del state["preprocessing"]
    torch.save(state, incomplete)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    _assert_refused(tmp_path, mr, lambda: convert(mr, tmp_path / "o.nii.gz", tmp_path / "foreign.pt"), InputError, "not a medcycle checkpoint")
    _assert_refused(tmp_path, mr, lambda: convert(mr, tmp_path / "o.nii.gz", incomplete), InputError, "preprocessing")
    _assert_refused(tmp_path, mr, lambda: convert(mr, tmp_path / "o.nii.gz", tmp_path / "junk.pt"), InputError)


def test_refuses_output_equal_to_input_and_existing_output(tmp_path, case):
    mr, model = case
    _assert_refused(tmp_path, mr, lambda: convert(mr, mr, model, overwrite=True), InputError, "is the input")
    existing = tmp_path / "sct.nii.gz"
    existing.write_bytes(b"keep me")
    _assert_refused(tmp_path, mr, lambda: convert(mr, existing, model), InputError, "already exists")
    assert existing.read_bytes() == b"keep me"
    _assert_refused(tmp_path, mr, lambda: convert(mr, tmp_path / "sct.mha", model), UsageError)


def test_refuses_unwritable_output_folder(tmp_path, case):
    mr, model = case
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            _assert_refused(tmp_path, mr, lambda: convert(mr, locked / "sct.nii.gz", model), InputError, "writable")
        finally:
            locked.chmod(0o755)
    # root ignores permissions: an output whose parent is a file cannot be created either
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    _assert_refused(tmp_path, mr, lambda: convert(mr, blocker / "sub" / "sct.nii.gz", model), InputError)


def test_full_disk_leaves_no_partial_file(tmp_path, case, monkeypatch):
    mr, model = case
    real_save = nib.save

    def full(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", full)
    _assert_refused(tmp_path, mr, lambda: convert(mr, tmp_path / "out" / "sct.nii.gz", model), InputError,
                    "No space left", leftover_ok=("out",))
    assert not (tmp_path / "out" / "sct.nii.gz").exists()
    monkeypatch.setattr(nib, "save", real_save)


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, case, capsys):
    from medcycle.cli import main

    mr, model = case
    code = main(["convert", "-i", str(mr), "-o", str(mr), "-m", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "is the input" in err[0]
    code = main(["convert", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "-m", str(model)])
    assert code == 1
    code = main(["convert", "-i", str(mr), "-o", str(tmp_path / "o.nii.gz"), "-m", str(model), "--batch-size", "2"])
    assert code == 0 and (tmp_path / "o.nii.gz").is_file()


# --------------------------------------------------------------------------------------------------
# in memory: the same conversion on an array and its affine, or a MetaTensor


def test_in_memory_conversion_equals_the_file_conversion_bit_for_bit(tmp_path, case):
    from monai.data import MetaTensor

    from medcycle import convert_array
    from medcycle.io import load_volume

    mr, model = case
    mask = write_nifti(tmp_path / "mask.nii.gz", (phantom_mr((30, 26, 5)) > 0).astype(np.uint8), oblique_affine())
    convert(mr, tmp_path / "sct.nii.gz", model)
    convert(mr, tmp_path / "masked.nii.gz", model, mask=mask)
    written = nib.load(str(tmp_path / "sct.nii.gz"))
    source = nib.load(str(mr))
    array, affine = source.get_fdata(dtype=np.float32), source.affine  # oblique, anisotropic

    sct = convert_array(array, affine=affine, model=model)
    assert isinstance(sct, MetaTensor) and sct.dtype == torch.int16 and tuple(sct.shape) == array.shape
    np.testing.assert_array_equal(sct.affine.numpy(), affine)  # exactly the input's grid
    np.testing.assert_array_equal(sct.numpy(), np.asanyarray(written.dataobj))

    image = load_volume(mr)  # a MetaTensor (1, X, Y, Z): its own affine and shape
    from_image = convert_array(image, model=model)
    assert tuple(from_image.shape) == tuple(image.shape)
    np.testing.assert_array_equal(from_image.affine.numpy(), image.affine.numpy())
    np.testing.assert_array_equal(from_image.numpy()[0], np.asanyarray(written.dataobj))

    masked = convert_array(array, affine=affine, model=model, mask=np.asanyarray(nib.load(str(mask)).dataobj))
    np.testing.assert_array_equal(masked.numpy(), np.asanyarray(nib.load(str(tmp_path / "masked.nii.gz")).dataobj))


def test_in_memory_conversion_refuses_invalid_volumes_with_the_errors_of_a_file(tmp_path, case):
    from medcycle import convert_array

    _, model = case
    affine = oblique_affine()
    nan = phantom_mr((30, 26, 5))
    nan[3, 4, 2] = np.nan
    for array in (nan, phantom_mr((30, 26, 5))[..., 0], np.full((30, 26, 5), 7.0, np.float32)):
        path = write_nifti(tmp_path / "bad.nii.gz", array, affine)
        with pytest.raises(InputError) as from_file:
            convert(path, tmp_path / "out.nii.gz", model)
        with pytest.raises(InputError) as from_memory:
            convert_array(array, affine=affine, model=model)
        message = str(from_memory.value)
        assert "\n" not in message and message.startswith("<mr array>: ")
        assert message.split(": ", 1)[1] == str(from_file.value).split(": ", 1)[1]
    assert not (tmp_path / "out.nii.gz").exists()
    good = phantom_mr((30, 26, 5))
    with pytest.raises(UsageError, match="a plain array needs affine="):
        convert_array(good, model=model)
    with pytest.raises(InputError, match="the affine must be a 4x4 matrix"):
        convert_array(good, affine=np.eye(3), model=model)
    with pytest.raises(InputError, match="the affine is singular"):
        convert_array(good, affine=np.diag([1.0, 0.0, 1.0, 1.0]), model=model)
    with pytest.raises(UsageError, match="--mask and --no-mask exclude each other"):
        convert_array(good, affine=affine, model=model, mask=good > 0, no_mask=True)
