"""The synthetic paired MR/CT head phantom: anatomy, CT and MR values, geometry, files, CLI.

Small cases (3 x 3 x 5 mm) everywhere except the CT/MR value checks, which need the thin tissues
(skull tables, CSF rim) resolved: they share one ``full`` case, generated once for the module.
"""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medcycle.cli import main
from medcycle.data import phantom as ph
from medcycle.errors import UsageError
from medcycle.transforms import CT_BODY_THRESHOLD_HU, compute_body_mask

REPO = Path(__file__).resolve().parents[1]
FILES = ("mr.nii.gz", "ct.nii.gz", "mask.nii.gz", "labels.nii.gz")


@pytest.fixture(scope="module")
def full_case() -> ph.PhantomCase:
    return ph.make_case(3, 0, "full")


def interior(labels: np.ndarray, label: int) -> np.ndarray:
    """Voxels of `label` whose 26 neighbours are `label` too (no partial volume with another tissue)."""
    return ndimage.binary_erosion(labels == label, structure=np.ones((3, 3, 3), bool))


def test_same_seed_and_index_give_identical_cases_other_index_or_seed_differ():
    a, b = ph.make_case(7, 2, "small"), ph.make_case(7, 2, "small")
    for name in ("labels", "ct", "mr", "mask", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for other in (ph.make_case(7, 3, "small"), ph.make_case(8, 2, "small")):
        assert not np.array_equal(a.labels, other.labels)
        assert not np.array_equal(a.ct, other.ct) and not np.array_equal(a.mr, other.mr)


def test_case_holds_every_tissue_with_a_head_shaped_layout():
    for index in range(3):
        case = ph.make_case(0, index, "small")
        assert case.labels.dtype == np.uint8 and case.shape == ph.SIZES["small"].shape
        present = set(np.unique(case.labels).tolist())
        assert present == {t.label for t in ph.TISSUES}, [ph.TISSUES[i].name for i in set(range(12)) - present]
        labels = case.labels
        nz = labels.shape[2]
        body = labels != ph.AIR
        assert not body[:, :, -1].any(), "the vertex must lie inside the field of view"
        assert body[:, :, 0].any(), "the head goes on below the field of view"
        # the skull surrounds the brain on every slice that holds brain
        brain = np.isin(labels, [ph.GREY_MATTER, ph.WHITE_MATTER])
        for z in np.nonzero(brain.any(axis=(0, 1)))[0]:
            assert (labels[:, :, z] == ph.CORTICAL_BONE).any(), f"slice {z}: brain without skull"
        # skull base region in the lower slices: sinuses and eyes there, and more bone than above
        low, high = slice(0, nz // 2), slice(nz // 2, nz)
        for label in (ph.SINUS, ph.EYE):
            assert (labels[:, :, high] == label).sum() < 0.1 * (labels[:, :, low] == label).sum()
        bone = np.isin(labels, [ph.CORTICAL_BONE, ph.CANCELLOUS_BONE]).sum(axis=(0, 1))
        skull_ring = np.median(bone[high][brain[:, :, high].any(axis=(0, 1))])
        assert bone[low].max() > 1.4 * skull_ring
        # ventricles lie inside the brain, away from the skull
        ventricles = labels == ph.VENTRICLES
        grown = ndimage.binary_dilation(ventricles, iterations=1)
        assert not np.isin(labels[grown], [ph.CORTICAL_BONE, ph.CANCELLOUS_BONE, ph.SKIN, ph.FAT]).any()


def test_cases_vary_in_size_shape_and_anatomy():
    cases = [ph.make_case(0, i, "small") for i in range(4)]
    head = [c.mask.sum() for c in cases]
    ventricles = [(c.labels == ph.VENTRICLES).sum() for c in cases]
    bone = [(c.labels == ph.CORTICAL_BONE).sum() for c in cases]
    for values in (head, ventricles, bone):
        assert max(values) > 1.05 * min(values)
    assert len({c.mr.max() for c in cases}) == 4


def test_body_mask_is_the_head_with_its_sinuses_inside():
    case = ph.make_case(0, 0, "small")
    mask, labels = case.mask, case.labels
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
    np.testing.assert_array_equal(mask, (labels != ph.AIR).astype(np.uint8))
    assert (labels == ph.SINUS).sum() > 20 and mask[labels == ph.SINUS].all()
    np.testing.assert_array_equal(ndimage.binary_fill_holes(mask), mask.astype(bool))  # no holes
    assert ndimage.label(mask)[1] == 1
    assert not mask[[0, -1], :, :].any() and not mask[:, [0, -1], :].any()  # air margin in plane
    assert np.median(case.ct[mask == 0]) < -980 and np.median(case.ct[mask == 1]) > -200


def test_small_and_full_grids_hold_the_same_anatomy(full_case):
    small = ph.make_case(3, 0, "small")
    assert full_case.shape == (192, 224, 64) and full_case.spacing == pytest.approx((1.0, 1.0, 2.5))
    assert small.shape == (64, 75, 32) and small.spacing == pytest.approx((3.0, 3.0, 5.0))
    for label in (ph.AIR, ph.WHITE_MATTER, ph.GREY_MATTER, ph.MUSCLE):
        ml_full = (full_case.labels == label).sum() * np.prod(full_case.spacing) / 1000
        ml_small = (small.labels == label).sum() * np.prod(small.spacing) / 1000
        assert ml_small == pytest.approx(ml_full, rel=0.08), ph.TISSUES[label].name


def test_ct_is_int16_hu_with_tissue_values_blur_and_noise(full_case):
    ct, labels = full_case.ct, full_case.labels
    assert ct.dtype == np.int16 and ct.min() >= -1024 and ct.max() <= 3071
    checked = set()
    for tissue in ph.TISSUES:
        core = interior(labels, tissue.label)
        if core.sum() < 50:
            continue
        lo, hi = tissue.ct_range
        assert lo <= np.median(ct[core]) <= hi, (tissue.name, np.median(ct[core]), tissue.ct_range)
        checked.add(tissue.label)
    assert checked >= set(range(12)) - {ph.SKIN}, "every tissue but the thin skin has a core of pure voxels"
    # noise: spread inside a uniform tissue; texture in cancellous bone far above it
    assert 8 < ct[interior(labels, ph.WHITE_MATTER)].std() < 25
    assert ct[interior(labels, ph.CANCELLOUS_BONE)].std() > 40
    # partial-volume blur: the air just outside the skin is lifted well above -1000 HU (noise alone: not)
    body = labels != ph.AIR
    outside = ndimage.binary_dilation(body, np.ones((3, 3, 1), bool)) & ~body
    assert -950 < np.median(ct[outside]) < -600


def test_mr_is_t1_weighted_with_dark_bone_and_air(full_case):
    mr, labels = full_case.mr, full_case.labels
    assert mr.dtype == np.float32 and mr.min() >= 0 and np.array_equal(mr, np.rint(mr))
    med = {t.label: float(np.median(mr[interior(labels, t.label)])) for t in ph.TISSUES if t.label != ph.SKIN}
    assert med[ph.FAT] > med[ph.WHITE_MATTER] > med[ph.GREY_MATTER] > med[ph.CSF]
    assert med[ph.CANCELLOUS_BONE] > med[ph.CSF]
    wm = med[ph.WHITE_MATTER]
    for dark in (ph.CORTICAL_BONE, ph.AIR, ph.SINUS):
        assert med[dark] < 0.1 * wm, ph.TISSUES[dark].name
    assert med[ph.EYE] == pytest.approx(med[ph.CSF], rel=0.3)
    # Rician noise: outside air is positive, a few per cent of white matter, and not Gaussian around 0
    air = mr[interior(labels, ph.AIR)]
    assert 0.01 * wm < air.mean() < 0.06 * wm and (air > 0).mean() > 0.9


def test_mr_has_a_smooth_bias_field_and_a_scale_per_case():
    spreads, scales = [], []
    for index in range(3):
        case = ph.make_case(0, index, "small")
        wm = ndimage.binary_erosion(case.labels == ph.WHITE_MATTER, np.ones((3, 3, 1), bool))
        blocks = []
        for part in np.array_split(np.arange(case.shape[0]), 2):
            for row in np.array_split(np.arange(case.shape[1]), 2):
                for level in np.array_split(np.arange(case.shape[2]), 2):
                    sl = np.ix_(part, row, level)
                    values = case.mr[sl][wm[sl]]
                    if values.size >= 100:
                        blocks.append(np.median(values))
        assert len(blocks) >= 4
        spreads.append((max(blocks) - min(blocks)) / np.median(blocks))
        scales.append(np.median(case.mr[wm]))
    # white matter is one tissue: only the bias field moves its block medians by more than ~1 %
    assert min(spreads) > 0.05, spreads
    assert max(scales) > 1.5 * min(scales)


def test_written_files_share_one_grid_with_sform_and_qform_equal_to_the_affine(tmp_path):
    case = ph.make_case(0, 1, "small")  # index % 3 == 1: oblique
    paths = ph.write_case(tmp_path / "case", case)
    assert sorted(p.name for p in paths) == sorted(FILES)
    dtypes = {"mr": np.int16, "ct": np.int16, "mask": np.uint8, "labels": np.uint8}
    for name in FILES:
        image = nib.load(str(tmp_path / "case" / name))
        sform, sform_code = image.header.get_sform(coded=True)
        qform, qform_code = image.header.get_qform(coded=True)
        assert sform_code == 1 and qform_code == 1
        np.testing.assert_allclose(sform, case.affine, atol=1e-4)
        np.testing.assert_allclose(qform, case.affine, atol=1e-4)
        assert image.shape == case.shape
        role = name.split(".")[0]
        assert image.get_data_dtype() == dtypes[role]
        np.testing.assert_array_equal(np.asarray(image.dataobj), getattr(case, role))  # lossless, MR too
    rotation = case.affine[:3, :3] / np.linalg.norm(case.affine[:3, :3], axis=0)
    assert not np.allclose(rotation, np.eye(3), atol=0.05), "case 1 has an oblique affine"


def test_some_cases_are_oblique_all_have_an_origin_and_case_grid_is_cheap_and_exact():
    oblique = []
    for index in range(6):
        shape, affine = ph.case_grid(0, index, "small")
        assert shape == ph.SIZES["small"].shape and np.abs(affine[:3, 3]).max() > 1
        rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        oblique.append(angle > 1)
        if angle > 1:
            assert 4 < angle < 22
    assert oblique == [False, True, False, False, True, False]
    np.testing.assert_array_equal(ph.case_grid(0, 4, "small")[1], ph.make_case(0, 4, "small").affine)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "medcycle", *args], capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=REPO, env=env)


def test_cli_writes_the_synthrad_layout_and_resumes(tmp_path):
    out = tmp_path / "data"
    result = _cli("phantom", "--out", str(out), "--cases", "2", "--size", "small")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [result.stdout.strip()]  # one summary line
    assert result.stdout.startswith(f"medcycle phantom: wrote 2 cases in {out} (64x75x32, 3.00x3.00x5.00 mm, seed 0)")
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000", "phantom_001"]
    for case in out.iterdir():
        assert sorted(p.name for p in case.iterdir()) == sorted(FILES)
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.nii.gz")}
    lost = out / "phantom_001" / "labels.nii.gz"
    lost.unlink()  # as if the run had been killed before this file

    result = _cli("phantom", "--out", str(out), "--cases", "3", "--size", "small")
    assert result.returncode == 0, result.stderr
    assert "wrote 2 of 3 cases (1 already there)" in result.stdout  # phantom_001 got its lost file back
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000", "phantom_001", "phantom_002"]
    for path, (mtime, data) in first.items():
        assert path.read_bytes() == data  # regenerated byte for byte
        if path != lost:
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    # case 2 is the one make_case gives, whatever the number of cases
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "phantom_002" / "ct.nii.gz")).dataobj),
                                  ph.make_case(0, 2, "small").ct)


@pytest.mark.parametrize("args, word", [(["--cases", "0"], "--cases"), (["--seed", "-1"], "--seed")])
def test_cli_bad_arguments_give_one_line_and_exit_code_2(tmp_path, capsys, args, word):
    out = tmp_path / "data"
    assert main(["phantom", "--out", str(out), *args, "--size", "small"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medcycle phantom: error:") and word in lines[0]
    assert not out.exists()


def test_run_refuses_a_bad_size_and_a_folder_of_another_seed(tmp_path):
    import medcycle.jobs.phantom
    from medcycle.errors import InputError

    with pytest.raises(UsageError, match="--size"):
        medcycle.jobs.phantom.run(out=tmp_path / "x", cases=1, size="medium")
    folder = tmp_path / "data" / "phantom_000"
    ph.write_case(folder, ph.make_case(5, 0, "small"), names=["mask.nii.gz"])
    with pytest.raises(InputError, match="another --seed"):
        medcycle.jobs.phantom.run(out=tmp_path / "data", cases=1, seed=0, size="small")
    assert sorted(p.name for p in folder.iterdir()) == ["mask.nii.gz"]


# --------------------------------------------------------------------------------------------------
# a pair on real anatomy: a real CT and the MR rendered from its tissues


def test_labels_from_a_ct_find_the_tissues_the_ct_was_made_of(full_case):
    labels = ph.labels_from_ct(full_case.ct, full_case.mask.astype(bool), full_case.spacing)
    assert labels.shape == full_case.labels.shape and labels.dtype == np.uint8
    assert (labels[full_case.mask == 0] == ph.AIR).all()
    brain = {ph.CSF, ph.WHITE_MATTER, ph.GREY_MATTER}
    expected = [  # tissue of the phantom, labels of a CT's tissues it may get, their least share of its interior
        (ph.CORTICAL_BONE, {ph.CORTICAL_BONE}, 0.9),
        (ph.CANCELLOUS_BONE, {ph.CANCELLOUS_BONE, ph.CORTICAL_BONE}, 0.9),
        (ph.SINUS, {ph.SINUS}, 0.9),
        (ph.FAT, {ph.FAT}, 0.8),  # thin layers: some mix with the skin's HU
        (ph.MUSCLE, {ph.GREY_MATTER}, 0.9),  # grey matter stands for muscle (the same T1w intensity)
        # grey and white matter differ by ~10 HU on CT, less than its noise: the brain is brain, roughly sorted
        (ph.WHITE_MATTER, brain, 0.97), (ph.WHITE_MATTER, {ph.WHITE_MATTER}, 0.6),
        (ph.GREY_MATTER, brain, 0.97), (ph.GREY_MATTER, {ph.GREY_MATTER}, 0.6),
        # the phantom's ventricles (10-20 HU) straddle the CSF bound (18 HU; a real CT's CSF is 0-15 HU)
        (ph.VENTRICLES, {ph.CSF, ph.WHITE_MATTER}, 0.95), (ph.VENTRICLES, {ph.CSF}, 0.5),
    ]
    for tissue, allowed, least in expected:
        inside = interior(full_case.labels, tissue)
        assert inside.sum() > 50, ph.TISSUES[tissue].name
        share = np.isin(labels[inside], list(allowed)).mean()
        assert share > least, (ph.TISSUES[tissue].name, allowed, share)


def _head_ct_with_holder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, ph.PhantomCase]:
    """A small oblique phantom head CT lying on a 300 HU holder plate (3 mm) that touches its back."""
    case = ph.make_case(0, 1, "small")  # case 1 is oblique
    ct = case.ct.astype(np.int16).copy()
    back = np.argwhere(case.mask.any(axis=(0, 2)))[0, 0]  # the body's first row from the posterior side
    holder = np.zeros(ct.shape, dtype=bool)
    holder[16:48, back - 1, :] = True
    holder &= case.mask == 0
    ct[holder] = 300
    path = tmp_path / "scans" / "head_ct.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(ct, case.affine), str(path))
    return path, ct, holder, case


def test_cli_writes_a_pair_on_a_real_ct_on_its_grid_without_the_holder(tmp_path):
    path, ct, holder, case = _head_ct_with_holder(tmp_path)
    before = path.read_bytes()
    out = tmp_path / "data"
    result = _cli("phantom", "--out", str(out), "--from-ct", str(path.parent))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [result.stdout.strip()]
    assert result.stdout.startswith(f"medcycle phantom: wrote 1 case in {out} (1 on real anatomy)")
    assert path.read_bytes() == before
    pair = out / "pair_head_ct"
    assert sorted(p.name for p in out.iterdir()) == ["pair_head_ct"]
    assert sorted(p.name for p in pair.iterdir()) == sorted(FILES)
    images = {name: nib.load(str(pair / name)) for name in FILES}
    for name, image in images.items():
        assert image.shape == ct.shape, name
        np.testing.assert_allclose(image.affine, case.affine, atol=1e-5, err_msg=name)
    values = {name[:-7]: np.asarray(image.dataobj) for name, image in images.items()}
    body = values["mask"].astype(bool)
    np.testing.assert_array_equal(body, compute_body_mask(ct.astype(np.float32), threshold=CT_BODY_THRESHOLD_HU,
                                                          spacing=case.spacing))  # medcycle's one body mask
    assert (body & holder).sum() < 0.2 * holder.sum()  # at most the contact zone
    assert (body & (case.mask == 1)).sum() > 0.97 * case.mask.sum()
    np.testing.assert_array_equal(values["ct"][body], ct[body])
    assert (values["ct"][~body] == -1024).all()
    mr, labels = values["mr"].astype(np.float32), values["labels"]
    brain = np.median(mr[np.isin(labels, [ph.WHITE_MATTER, ph.GREY_MATTER]) & body])
    assert np.median(mr[holder & ~body]) < 0.1 * brain  # a holder gives no MR signal
    assert np.median(mr[labels == ph.CORTICAL_BONE]) < 0.5 * brain  # bone dark, as in a T1
    assert np.median(mr[labels == ph.FAT]) > brain  # fat bright
    written = {p: p.stat().st_mtime_ns for p in pair.iterdir()}

    again = _cli("phantom", "--out", str(out), "--from-ct", str(path))
    assert again.returncode == 0, again.stderr
    assert "wrote 0 of 1 cases (1 already there)" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in pair.iterdir()} == written

    # pairs written into the CTs' own folder: a re-run does not take the output for a CT series
    beside = path.parent / "pairs"
    for _ in range(2):
        result = _cli("phantom", "-q", "--out", str(beside), "--from-ct", str(path.parent))
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in beside.iterdir()) == ["pair_head_ct"]


def test_cli_refuses_an_mr_or_a_missing_file_as_the_real_ct(tmp_path):
    case = ph.make_case(0, 0, "small")
    mr = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(case.mr.astype(np.int16), case.affine), str(mr))
    for given, words in ((mr, "not a CT"), (tmp_path / "absent.nii.gz", "no such CT")):
        out = tmp_path / "data"
        result = _cli("phantom", "-q", "--out", str(out), "--from-ct", str(given))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(given) in lines[0] and words in lines[0], result.stderr
        assert not (out / f"pair_{given.name[:-7]}").exists()
