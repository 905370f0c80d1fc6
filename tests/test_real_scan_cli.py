"""Real-scan hazards through the CLI, on small synthetic volumes (3 mm voxels, on the model grid).

`medcycle preprocess` keeps head holders and frames out of the tiles (air there), tells the user how
much of a body a tile cuts and when a field of view cuts it or a case is not a head (one warning line
per case, and the case's record); a model trained on heads refuses a chest at `medcycle convert`
unless --allow-other-anatomy. `medcycle preprocess --register rigid` registers a paired case's CT on
another grid onto its MR and records the transform; a failed registration refuses the case.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from helpers import write_nifti
from medcycle.cli import main
from medcycle.data.phantom import make_case
from medcycle.registration import transform_error

MM = 3.0
AFFINE = np.diag([MM, MM, MM, 1.0])  # RAS at the configured spacing: the model grid is the file's grid
GRID = ["--set", "data.spacing=[3.0,3.0]", "--set", "data.tile_size=64", "--set", "data.context_slices=1"]
SLICES = 16  # 48 mm: a head holder's arm then holds ~60 cm3, as on the real head CT (a shorter piece touching
# the head is given back to the body: medcycle.transforms.body_mask)


def body_part(width_mm: float, depth_mm: float, shape=(80, 80)) -> tuple[np.ndarray, np.ndarray]:
    """(CT in HU, body) of an elliptic body with a skull-like ring under its scalp, `SLICES` slices in air."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    r = ((x - shape[0] / 2) / (width_mm / 2 / MM)) ** 2 + ((y - shape[1] / 2) / (depth_mm / 2 / MM)) ** 2
    body = np.repeat((r <= 1.0)[:, :, None], SLICES, axis=2)
    rim = np.repeat(((r > 0.7) & (r <= 0.85))[:, :, None], SLICES, axis=2)
    ct = np.full(body.shape, -1000.0, dtype=np.float32)
    ct[body] = 35.0
    ct[rim] = 1200.0
    return ct, body


def mr_of(ct: np.ndarray, body: np.ndarray) -> np.ndarray:
    """An MR-like image of the same body: bright soft tissue, dark bone and air, some noise."""
    mr = np.where(body, 600.0, 0.0) - np.where(ct > 500, 540.0, 0.0)
    return np.abs(mr + np.random.default_rng(0).normal(0.0, 10.0, ct.shape)).astype(np.float32)


def preprocess(tmp: Path, *args: str, capsys) -> tuple[int, str, Path]:
    cache = tmp / "cache"
    code = main(["preprocess", *args, "--out", str(cache), *GRID])
    return code, capsys.readouterr().err, cache


def record(cache: Path, case: str) -> dict:
    return json.loads((cache / "cases" / case / "record.json").read_text())


def tile_of(cache: Path, case: str, modality: str = "ct") -> np.ndarray:
    """(64, 64, N) float32 tiles of a case, on the volume's (x, y) axes."""
    return np.load(cache / "cases" / case / f"{modality}.npy")[:, 0].astype(np.float32).transpose(1, 2, 0)


def in_tile(volume: np.ndarray, rec: dict) -> np.ndarray:
    """The part of `volume` (x, y, z) that the case's tiles show, on their grid."""
    x0, y0 = rec["tile"]["start"]
    assert x0 >= 0 and y0 >= 0  # the test volumes are larger than the tile
    return volume[x0: x0 + 64, y0: y0 + 64][:, :, rec["slices"]]


@pytest.mark.parametrize("device", ["holder", "frame"])
def test_devices_on_a_head_ct_are_air_in_the_tiles(device, tmp_path, capsys):
    ct, body = body_part(150, 180 if device == "holder" else 150)
    devices = np.zeros(ct.shape, dtype=bool)
    x, y = np.ogrid[:80, :80]
    pin = np.zeros(ct.shape, dtype=bool)
    if device == "holder":  # a 6 mm cradle behind the head, touching it
        radius = np.hypot(x - 40, y - 40)
        devices[:, :, :] = ((radius >= 30.5) & (radius < 32.5) & (y < 30))[:, :, None]
    else:  # a 6 mm ring round the head, inside the tile, pinned to it by a 6 mm post (given back where it touches)
        devices[10:70, 10:70, :] = True
        devices[12:68, 12:68, :] = False
        pin[39:41, 12:16, :] = True
    pin &= ~body
    devices = (devices | pin) & ~body
    write_nifti(tmp_path / "mr" / "head.nii.gz", mr_of(ct, body), AFFINE, dtype=np.int16)
    ct[devices] = 900.0
    write_nifti(tmp_path / "ct" / "head.nii.gz", ct, AFFINE, dtype=np.int16)

    code, err, cache = preprocess(tmp_path, "--mr-dir", str(tmp_path / "mr"), "--ct-dir", str(tmp_path / "ct"),
                                  capsys=capsys)
    assert code == 0 and "warning" not in err
    rec = record(cache, "ct_head")
    tiles, mask = tile_of(cache, "ct_head"), tile_of(cache, "ct_head", "mask")
    away = in_tile(devices & ~pin & (ndimage.distance_transform_edt(~body) * MM > 9.0), rec)  # > 3 voxels from the skin
    assert (tiles[away] == -1.0).all() and not mask[away].any()  # the holder or ring is air, its contact aside
    assert away.sum() > 0.5 * in_tile(devices, rec).sum() and (tiles[in_tile(devices, rec)] == -1.0).mean() > 0.9
    assert (tiles[in_tile(body, rec)] > -0.9).mean() > 0.99  # the head is there
    assert rec["body_part"]["is_head"] and rec["tile"]["body_cut_fraction"] == 0.0


def test_cut_tile_and_truncated_field_of_view_are_told_once_per_case(tmp_path, capsys):
    ct, body = body_part(150, 180)
    big_ct, big_body = body_part(150, 220)  # 220 mm deep: more than the 192 mm tile
    cut = (slice(None), slice(18, None), slice(None))  # the back of the head is outside the image
    for name, (image, mask) in {"whole": (ct, body), "big": (big_ct, big_body), "cut": (ct[cut], body[cut])}.items():
        write_nifti(tmp_path / "mr" / f"{name}.nii.gz", mr_of(image, mask), AFFINE, dtype=np.int16)

    code, err, cache = preprocess(tmp_path, "--mr-dir", str(tmp_path / "mr"), capsys=capsys)
    assert code == 0
    lines = err.strip().splitlines()
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 2 and not any("mr_whole" in line for line in warnings)
    big = next(line for line in warnings if "mr_big" in line)
    rec = record(cache, "mr_big")
    assert rec["tile"]["body_cut_fraction"] > 0.02 and rec["tile"]["cut_warning"] in big
    assert "% of the body out" in big and "mm anterior" in big and "data.tile_size=80" in big
    cut_line = next(line for line in warnings if "mr_cut" in line)
    assert "field of view cuts it" in cut_line and "field of view cuts it" in record(cache, "mr_cut")["body_part"]["notes"][0]
    assert record(cache, "mr_cut")["tile"]["body_cut_fraction"] == 0.0
    shown = body[cut][:, :, record(cache, "mr_cut")["slices"]].sum()
    assert abs(tile_of(cache, "mr_cut", "mask").sum() - shown) < 0.01 * shown  # the mask keeps the head it shows

    capsys.readouterr()
    code, err, _ = preprocess(tmp_path, "--mr-dir", str(tmp_path / "mr"), capsys=capsys)  # skipped cases: told again
    assert code == 0 and sum("warning" in line for line in err.splitlines()) == 2


def chest() -> tuple[np.ndarray, np.ndarray]:
    """A chest-like CT: 330 x 210 mm with two lungs (-800 HU, 550 cm3), in a 120 x 80 image."""
    ct, body = body_part(330, 210, shape=(120, 80))
    x, y = np.ogrid[:120, :80]
    for cx in (38, 82):
        ct[((x - cx) / 17.0) ** 2 + ((y - 40) / 24.0) ** 2 <= 1.0] = -800.0
    return ct, body


def test_a_head_model_refuses_a_chest_unless_allowed(tmp_path, capsys):
    ct, body = body_part(150, 180)
    write_nifti(tmp_path / "mr" / "head.nii.gz", mr_of(ct, body), AFFINE, dtype=np.int16)
    write_nifti(tmp_path / "ct" / "head.nii.gz", ct, AFFINE, dtype=np.int16)
    chest_ct, chest_body = chest()
    write_nifti(tmp_path / "other" / "chest_ct.nii.gz", chest_ct, AFFINE, dtype=np.int16)
    chest_mr = write_nifti(tmp_path / "chest_mr.nii.gz", mr_of(chest_ct, chest_body), AFFINE, dtype=np.int16)

    code, err, cache = preprocess(tmp_path, "--mr-dir", str(tmp_path / "mr"), "--ct-dir", str(tmp_path / "ct"),
                                  capsys=capsys)
    assert code == 0 and "warning" not in err
    tiny = ["--set", "model.gen_width=4", "--set", "model.gen_blocks=1", "--set", "model.disc_width=4",
            "--set", "model.disc_layers=1", "--set", "train.val_every=100", "--set", "train.image_every=100"]
    assert main(["train", "--data", str(cache), "--out", str(tmp_path / "run"), "--max-iters", "2", *GRID, *tiny]) == 0
    capsys.readouterr()

    sct = tmp_path / "chest_sct.nii.gz"
    assert main(["convert", "-i", str(chest_mr), "-o", str(sct), "--model", str(tmp_path / "run"), "--tta", "none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(chest_mr) in err[0] and re.search(r"not a head \(3[23]\d mm wide", err[0])
    assert "--allow-other-anatomy" in err[0] and not sct.exists()

    assert main(["convert", "-i", str(chest_mr), "-o", str(sct), "--model", str(tmp_path / "run"), "--tta", "none",
                 "--allow-other-anatomy"]) == 0
    assert "warning" in capsys.readouterr().err and sct.exists()
    head_sct = tmp_path / "head_sct.nii.gz"
    assert main(["convert", "-i", str(tmp_path / "mr" / "head.nii.gz"), "-o", str(head_sct), "--model",
                 str(tmp_path / "run"), "--tta", "none"]) == 0
    assert "warning" not in capsys.readouterr().err

    code, err, cache = preprocess(tmp_path / "p2", "--ct-dir", str(tmp_path / "other"), "--mr-dir",
                                  str(tmp_path / "mr"), capsys=capsys)
    assert code == 0
    line = next(line for line in err.splitlines() if "warning" in line)
    assert re.search(r"ct_chest_ct: not a head \(3[23]\d mm wide; wider than deep \(1\.\d+\); \d+ cm3 of air inside\)", line)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["cases"]["ct_chest_ct"]["head"] is False and manifest["cases"]["mr_head"]["head"] is True


# --------------------------------------------------------------------------------------------------
# preprocess --register rigid


@pytest.fixture(scope="module")
def phantom():
    return make_case(0, 0, "small")  # 64 x 75 x 32 voxels of 3 x 3 x 5 mm, RAS


def motion(centre: np.ndarray, degrees: float = 10.0, shift=(12.0, -8.0, 14.0)) -> np.ndarray:
    """10 degrees about an oblique axis through `centre`, then about 20 mm."""
    rotation = Rotation.from_rotvec(np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0) * np.radians(degrees)).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(shift)
    return matrix


def write_pair(folder: Path, mr: np.ndarray, ct: np.ndarray, mr_affine: np.ndarray, ct_affine: np.ndarray) -> None:
    write_nifti(folder / "mr.nii.gz", mr, mr_affine, dtype=np.int16)
    write_nifti(folder / "ct.nii.gz", ct, ct_affine, dtype=np.int16)


def test_register_rigid_recovers_a_known_motion_and_records_it(phantom, tmp_path, capsys):
    points = np.argwhere(phantom.mask > 0) @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    truth = motion(points.mean(axis=0))
    write_pair(tmp_path / "data" / "aligned", phantom.mr, phantom.ct, phantom.affine, phantom.affine)
    write_pair(tmp_path / "data" / "moved", phantom.mr, phantom.ct, phantom.affine, truth @ phantom.affine)
    grid = ["--set", "data.spacing=[3.0,3.0]", "--set", "data.tile_size=80", "--set", "data.val_cases=0"]

    code = main(["preprocess", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "refused"), *grid])
    err = capsys.readouterr().err
    assert code == 1 and "moved/ct.nii.gz" in err and "affine differs" in err  # today's refusal, without the option

    cache = tmp_path / "cache"
    assert main(["preprocess", "--data", str(tmp_path / "data"), "--out", str(cache), "--register", "rigid", *grid]) == 0
    moved, aligned = record(cache, "moved"), record(cache, "aligned")
    assert "registration" not in aligned  # same grid: nothing to register
    reg = moved["registration"]
    assert reg["verdict"] == "ok" and reg["fixed"] == "mr" and reg["moving"] == "ct"
    error_mm, error_deg = transform_error(np.array(reg["matrix"]), truth, points)
    assert error_mm <= 1.0 and error_deg <= 1.0
    assert moved["slices"] == aligned["slices"] and moved["tile"]["start"] == aligned["tile"]["start"]
    ct_moved, ct_aligned = np.load(cache / "cases/moved/ct.npy"), np.load(cache / "cases/aligned/ct.npy")
    body = np.load(cache / "cases/aligned/mask.npy").astype(bool)
    difference = np.abs(ct_moved.astype(np.float32) - ct_aligned.astype(np.float32))[:, :1][body]
    assert np.median(difference) < 0.02  # [-1, 1] units: the registered CT lies where the aligned one does


def test_failed_registration_refuses_the_case_and_keeps_the_others(phantom, tmp_path, capsys):
    rng = np.random.default_rng(1)
    junk = np.where(phantom.ct > -500, rng.uniform(-1000, 2000, phantom.ct.shape), -1000.0)
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0]) @ phantom.affine  # another grid, and nothing in it matches the MR
    write_pair(tmp_path / "data" / "aligned", phantom.mr, phantom.ct, phantom.affine, phantom.affine)
    write_pair(tmp_path / "data" / "junk", phantom.mr, junk[:, :25], phantom.affine, flipped)
    cache = tmp_path / "cache"
    code = main(["preprocess", "--data", str(tmp_path / "data"), "--out", str(cache), "--register", "rigid",
                 "--set", "data.spacing=[3.0,3.0]", "--set", "data.tile_size=80", "--set", "data.val_cases=0"])
    err = capsys.readouterr().err
    assert code == 1 and "junk/ct.nii.gz: rigid registration onto" in err and "failed (" in err
    manifest = json.loads((cache / "manifest.json").read_text())
    assert list(manifest["cases"]) == ["aligned"] and not (cache / "cases" / "junk" / "record.json").exists()
