"""Hostile volumes (issue 24, findings 8, 9 and 12): each is refused in one line naming the file.

Values that overflow float32, broken geometry (zero voxel size, singular or NaN affine), a CT not in
Hounsfield units, MR and CT swapped, and an error deep inside a MONAI transform: none may pass
silently, none may end in a traceback or a ``RuntimeError: applying transform <... object at 0x..>``.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medcycle.jobs.preprocess as preprocess
from medcycle.errors import InputError, MedcycleError
from medcycle.files import file_checksum
from medcycle.image import make_image
from medcycle.io import load_volume
from helpers import phantom_mr, synthetic_head, write_nifti
from helpers import make_checkpoint
from helpers import AFFINE, OVERRIDES, SHAPE, make_case

PIXDIM_Z_OFFSET = 76 + 3 * 4  # NIfTI-1 header: float32 pixdim[8] at byte 76


def one_line_refusal(call, *words: str) -> InputError:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    for word in words:
        assert word in message
    return info.value


# --------------------------------------------------------------------------------------------------
# finding 8: values that overflow float32; singular or non-finite affines


def test_values_that_overflow_float32_are_refused(tmp_path):
    array = phantom_mr((12, 10, 6)).astype(np.float64)
    huge = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(array * 1e300, np.eye(4)), str(huge))  # finite in float64, inf in float32
    one_line_refusal(lambda: load_volume(huge), str(huge), "float32")

    slope = tmp_path / "slope.nii.gz"
    image = nib.Nifti1Image(array.astype(np.int16), np.eye(4))
    image.header.set_slope_inter(1e38, 0.0)
    nib.save(image, str(slope))
    one_line_refusal(lambda: load_volume(slope), str(slope), "scl_slope")


GRID = np.diag([1.5, 1.5, 3.0, 1.0])


def _nifti_with_sform(path: Path, sform: np.ndarray, qform_code: int) -> Path:
    """A NIfTI whose qform (with pixdim) is GRID and whose sform (code 1) is `sform`, as it lies on disk."""
    image = nib.Nifti1Image(phantom_mr((12, 10, 6)), GRID)
    header = image.header
    header.set_qform(GRID, code=qform_code)
    header.set_sform(GRID, code=1)
    header["srow_x"], header["srow_y"], header["srow_z"] = sform[0], sform[1], sform[2]  # unchecked
    nib.save(nib.Nifti1Image(image.dataobj, None, header=header), str(path))
    return path


@pytest.mark.parametrize("qform_code", [0, 1])
def test_singular_sform_is_refused_not_replaced_by_the_qform(tmp_path, qform_code):
    singular = GRID.copy()
    singular[2, 2] = 0.0  # the slices all in one plane
    path = _nifti_with_sform(tmp_path / "singular.nii.gz", singular, qform_code)
    one_line_refusal(lambda: load_volume(path), str(path), "singular")

    parallel = GRID.copy()
    parallel[:3, 2] = parallel[:3, 1]  # two voxel axes along one direction
    path = _nifti_with_sform(tmp_path / "parallel.nii.gz", parallel, qform_code)
    one_line_refusal(lambda: load_volume(path), str(path), "singular")


def test_an_sform_that_disagrees_with_pixdim_is_the_geometry_used(tmp_path):
    sform = np.diag([0.9, 0.9, 2.5, 1.0])  # what FSL, ITK-SNAP and nibabel show: not the qform
    sform[:3, 3] = (10.0, -4.0, 7.0)
    path = _nifti_with_sform(tmp_path / "sform.nii.gz", sform, qform_code=1)
    np.testing.assert_allclose(np.asarray(load_volume(path).affine), sform)


def test_nan_in_the_affine_is_refused(tmp_path):
    affine = GRID.copy()
    affine[0, 3] = np.nan
    path = _nifti_with_sform(tmp_path / "nan.nii.gz", affine, qform_code=0)
    one_line_refusal(lambda: load_volume(path), str(path), "NaN")


# --------------------------------------------------------------------------------------------------
# finding 9: wrong input accepted silently


@pytest.mark.parametrize("sform_code,qform_code", [(0, 1), (0, 0), (1, 1)])
def test_zero_voxel_size_is_refused_not_taken_as_1mm(tmp_path, capfd, sform_code, qform_code):
    base = write_nifti(tmp_path / "base.nii", phantom_mr((12, 10, 6)), np.diag([1.0, 1.0, 2.0, 1.0]),
                       sform_code=sform_code, qform_code=qform_code)
    raw = bytearray(base.read_bytes())
    raw[PIXDIM_Z_OFFSET:PIXDIM_Z_OFFSET + 4] = struct.pack("<f", 0.0)  # nibabel would write 1 instead
    path = tmp_path / "pixdim0.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    capfd.readouterr()
    one_line_refusal(lambda: load_volume(path), str(path), "pixdim")
    assert capfd.readouterr().err == ""  # nibabel's own note about repairing it is not a second line


def _case(folder: Path, mr: np.ndarray, ct: np.ndarray) -> Path:
    write_nifti(folder / "mr.nii.gz", mr, AFFINE, dtype=np.int16)
    write_nifti(folder / "ct.nii.gz", ct, AFFINE, dtype=np.int16)
    return folder


def test_ct_not_in_hounsfield_units_is_refused_in_preprocess(tmp_path, capsys):
    mr, ct, _, _, _ = synthetic_head(SHAPE, seed=1)
    data = tmp_path / "data"
    make_case(data / "good", seed=2)
    bad = _case(data / "raw", mr, ct + 1024.0)  # stored 0..4095 without the -1024 intercept
    before = file_checksum(data)
    with pytest.raises(MedcycleError) as info:
        preprocess.run(out=tmp_path / "cache", data=data, overrides=OVERRIDES)
    assert "1 of 2 cases failed" in str(info.value)
    line = [x for x in capsys.readouterr().err.splitlines()
            if x.startswith("medcycle preprocess:") and not x.startswith("medcycle preprocess: warning:")]
    assert len(line) == 1 and f"{bad / 'ct.nii.gz'}: not a CT in Hounsfield units" in line[0]
    assert file_checksum(data) == before
    assert not (tmp_path / "cache" / "cases" / "raw").exists()


def test_mr_and_ct_swapped_are_refused(tmp_path):
    mr, ct, _, _, _ = synthetic_head(SHAPE, seed=1)
    case = _case(tmp_path / "data" / "swapped", ct, mr)  # the CT under mr.*, the MR under ct.*
    with pytest.raises(MedcycleError, match="1 of 1 cases failed") as info:
        preprocess.run(out=tmp_path / "cache", data=tmp_path / "data", overrides=OVERRIDES)
    assert f"{case / 'mr.nii.gz'}: not an MR" in str(info.value)

    from medcycle.jobs.convert import run as convert

    model = make_checkpoint(tmp_path / "model.pt")
    one_line_refusal(lambda: convert(case / "mr.nii.gz", tmp_path / "sct.nii.gz", model), "not an MR")
    assert not (tmp_path / "sct.nii.gz").exists()


def test_evaluate_refuses_a_reference_not_in_hounsfield_units(tmp_path):
    from medcycle.jobs.evaluate import run as evaluate

    _, ct, _, _, _ = synthetic_head(SHAPE, seed=1)
    ref = write_nifti(tmp_path / "ct.nii.gz", ct + 1024.0, AFFINE, dtype=np.int16)
    pred = write_nifti(tmp_path / "sct.nii.gz", ct, AFFINE, dtype=np.int16)
    one_line_refusal(lambda: evaluate(pred, ref), str(ref), "Hounsfield")


def test_the_phantom_and_head_like_volumes_pass_the_modality_checks():
    from medcycle.data.phantom import make_case as phantom_case
    from medcycle.transforms.loading import check_modality

    for index in range(3):
        case = phantom_case(0, index, "small")
        check_modality(make_image(case.mr, case.affine, "phantom mr"), "mr")
        check_modality(make_image(case.ct, case.affine, "phantom ct"), "ct")
    mr, ct, _, _, _ = synthetic_head(SHAPE, seed=3)
    check_modality(make_image(mr, AFFINE, "mr"), "mr")
    check_modality(make_image(ct, AFFINE, "ct"), "ct")
    # a few extreme voxels decide nothing: percentiles, not the minimum
    ct_with_outliers = ct + 1024.0
    ct_with_outliers.flat[:3] = -1024.0
    with pytest.raises(InputError):
        check_modality(make_image(ct_with_outliers, AFFINE, "ct"), "ct")
    mr_with_outliers = mr.copy()
    mr_with_outliers.flat[:3] = -1000.0
    check_modality(make_image(mr_with_outliers, AFFINE, "mr"), "mr")


# --------------------------------------------------------------------------------------------------
# findings 8 and 12: a failure deep in a transform is its root cause, in one line


def test_a_failing_transform_is_reported_as_its_root_cause_in_one_line(tmp_path, capsys, monkeypatch):
    import medcycle.transforms.body_mask as body_mask

    def broken(*args, **kwargs):
        raise ValueError("threshold out of range\nsecond line of detail")

    monkeypatch.setattr(body_mask, "compute_body_mask", broken)
    data = tmp_path / "data"
    make_case(data / "c01", seed=1)
    make_case(data / "c02", seed=2)
    with pytest.raises(MedcycleError) as info:
        preprocess.run(out=tmp_path / "cache", data=data, overrides=OVERRIDES)
    assert "\n" not in str(info.value)
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("medcycle preprocess:") and not line.startswith("medcycle preprocess: warning:")]
    assert err == [f"medcycle preprocess: {data / c}: ValueError: threshold out of range" for c in ("c01", "c02")]
    assert "applying transform" not in str(info.value) and "object at 0x" not in str(info.value)
    assert not any((tmp_path / "cache" / "cases").iterdir())  # no empty case folder left


def test_a_usage_error_is_one_line(capsys):
    from medcycle.cli import main

    with pytest.raises(SystemExit) as info:
        main(["convert", "-i", "mr.nii.gz", "-o", "sct.nii.gz", "-m", "run", "--tta", "sideways"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tta" in err[0] and "sideways" in err[0]
