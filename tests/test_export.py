"""`medcycle export` and models given to `convert`: the model folder, loading without unpickling,
the ONNX generator, refused pickles, ensembles and the uncertainty map. Tiny generators throughout."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import Constant, make_checkpoint, phantom_mr, write_nifti
from medcycle import cli
from medcycle.errors import InputError, UsageError

AFFINE = np.array([[0.0, -1.1, 0.0, 20.0], [0.9, 0.0, 0.0, -15.0], [0.0, 0.0, 2.5, 8.0], [0, 0, 0, 1.0]])
TRAINING_ONLY = {"optimizers", "schedulers", "scaler", "pools", "rank_pools", "rng", "sampler"}


def trained_checkpoint(path: Path, **kwargs) -> Path:
    """A tiny checkpoint holding what a training run writes: other networks, optimiser, pools, RNG, metrics."""
    noise = torch.randn(3, 1, 16, 16)
    return make_checkpoint(
        path, **kwargs,
        optimizers={"G": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 2e-4, "params": [0]}]}},
        pools={"ct": {"size": 3, "images": noise}, "mr": {"size": 3, "images": noise}},
        rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        elapsed=12.5,
        metrics={"best_val_mae": 81.5, "best_iteration": 1, "history": [{"iteration": 1, "mae": 81.5, "ssim": 0.7}]},
    )


def mr_volume(folder: Path) -> Path:
    return write_nifti(folder / "mr.nii.gz", phantom_mr((30, 26, 5)), AFFINE)


def voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def keys_of(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in keys_of(v)}
    if isinstance(tree, list):
        return {k for v in tree for k in keys_of(v)}
    return set()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, model folder exported from it, with ONNX): shared, as the ONNX export takes seconds."""
    import medcycle.jobs.export

    folder = tmp_path_factory.mktemp("exported")
    checkpoint = trained_checkpoint(folder / "run" / "best.pt", context=3)
    medcycle.jobs.export.run(folder / "run", folder / "model")
    return checkpoint, folder / "model"


# --------------------------------------------------------------------------------------------------
# the model folder


def test_export_writes_the_bundle_layout_with_provenance_and_nothing_of_training(exported):
    from medcycle.bundle import read_safetensors
    from medcycle.checkpoint import load_checkpoint

    checkpoint, model = exported
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert files == ["configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.onnx",
                     "models/model.safetensors"]
    metadata = json.loads((model / "configs/metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "task", "network_data_format"):
        assert key in metadata
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    provenance = metadata["medcycle"]
    assert provenance["format"] == "medcycle-model" and provenance["iteration"] == 1
    assert provenance["validation"]["best_val_mae_hu"] == 81.5 and provenance["validation"]["history"][0]["ssim"] == 0.7
    assert provenance["training_data"]["data_config_hash"]
    assert len(provenance["checkpoint"]["sha256"]) == 64 and provenance["checkpoint"]["name"] == "best.pt"
    inference = json.loads((model / "configs/inference.json").read_text())
    assert inference["data"]["tile_size"] == 16 and inference["data"]["context_slices"] == 3
    assert inference["network_def"]["_target_"] == "medcycle.networks.build_generator"
    everything = keys_of(metadata) | keys_of(inference)
    assert not everything & TRAINING_ONLY
    weights = read_safetensors(model / "models/model.safetensors")
    generator = load_checkpoint(checkpoint)["nets"]["G_mr2ct"]
    assert set(weights) == set(generator)
    assert all(torch.equal(weights[k], generator[k]) for k in generator)
    size = sum(p.stat().st_size for p in model.rglob("*"))
    assert size < sum(v.numel() * 4 for v in generator.values()) + 64_000  # one copy of the weights, shared with ONNX


def test_export_is_atomic_and_replaces_only_a_model_folder(tmp_path, exported):
    import medcycle.jobs.export

    checkpoint, _ = exported
    out = tmp_path / "model"
    medcycle.jobs.export.run(checkpoint, out, onnx=False)
    with pytest.raises(InputError, match="already exists"):
        medcycle.jobs.export.run(checkpoint, out, onnx=False)
    (out / "configs/inference.json").write_text("{}")
    medcycle.jobs.export.run(checkpoint, out, onnx=False, overwrite=True)
    assert json.loads((out / "configs/inference.json").read_text())["data"]["tile_size"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or lock left beside it
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a medcycle model folder"):
        medcycle.jobs.export.run(checkpoint, other, overwrite=True, onnx=False)
    assert (other / "keep.txt").read_text() == "mine"


def test_loading_an_exported_model_never_unpickles(monkeypatch, tmp_path, exported):
    from medcycle.checkpoint import load_generator

    _, model = exported

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading an exported model")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    generator, config, metadata = load_generator(model)
    assert config.data.context_slices == 3 and metadata["medcycle"]["iteration"] == 1
    records = __import__("medcycle.jobs.convert", fromlist=["run"]).run(mr_volume(tmp_path), tmp_path / "sct.nii.gz", model)
    assert records[0]["status"] == "converted"


def test_convert_from_the_model_folder_equals_convert_from_the_run(tmp_path, exported):
    from medcycle.jobs.convert import run

    checkpoint, model = exported
    mr = mr_volume(tmp_path)
    run(mr, tmp_path / "from_run.nii.gz", checkpoint.parent)
    run(mr, tmp_path / "from_model.nii.gz", model)
    assert np.array_equal(voxels(tmp_path / "from_run.nii.gz"), voxels(tmp_path / "from_model.nii.gz"))


def test_the_onnx_generator_runs_without_medcycle_and_matches_torch(tmp_path, exported):
    """onnxruntime in a fresh interpreter where medcycle cannot be imported, on a copy of the folder."""
    import shutil

    from medcycle.checkpoint import load_generator

    _, model = exported
    copy = shutil.copytree(model, tmp_path / "elsewhere")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import sys\n"
              "sys.modules['medcycle'] = None  # any import of medcycle fails\n"
              "import numpy, onnxruntime\n"
              f"s = onnxruntime.InferenceSession({str(copy / 'models/model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
              f"numpy.save({str(tmp_path / 'y.npy')!r}, s.run(None, {{'mr': numpy.load({str(tmp_path / 'x.npy')!r})}})[0])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    generator, _, _ = load_generator(model)
    with torch.no_grad():
        expected = generator(torch.from_numpy(x)).numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() < 1e-4


# --------------------------------------------------------------------------------------------------
# pickles


def crafted_pickle(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format": "medcycle-checkpoint", "version": 1, "config": {}, "preprocessing": {}, "iteration": 0,
                "nets": {"G_mr2ct": Payload()}}, path)
    return path


def test_a_crafted_pickle_given_as_model_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = crafted_pickle(tmp_path / "evil.pt", marker)
    mr = mr_volume(tmp_path)
    for argv in (["convert", "-i", str(mr), "-o", str(tmp_path / "sct.nii.gz"), "--model", str(evil)],
                 ["export", str(evil), "--out", str(tmp_path / "model"), "--no-onnx"]):
        assert cli.main(argv) == 1
        assert not marker.exists() and not (tmp_path / "sct.nii.gz").exists() and not (tmp_path / "model").exists()
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "refused" in lines[0] and "posix.system" in lines[0] and str(evil) in lines[0]


def test_a_checkpoint_written_by_the_trainer_loads_with_weights_only(tmp_path):
    from medcycle.checkpoint import load_checkpoint

    state = load_checkpoint(trained_checkpoint(tmp_path / "best.pt"))
    assert state["rng"]["numpy"][1].dtype == np.uint32 and state["pools"]["ct"]["images"].shape == (3, 1, 16, 16)


# --------------------------------------------------------------------------------------------------
# ensembles and uncertainty


def constant_members(monkeypatch, values: dict[str, float]) -> None:
    """Each checkpoint (by file name) converts with a generator that outputs a known constant."""
    import medcycle.checkpoint

    real = medcycle.checkpoint.load_generator

    def fake(path, device="cpu"):
        _, config, state = real(path, device)
        return Constant(values[Path(path).name]), config, state

    monkeypatch.setattr(medcycle.checkpoint, "load_generator", fake)


def test_an_ensemble_averages_its_members_in_hu_and_maps_their_spread(monkeypatch, tmp_path):
    from medcycle.jobs.convert import run

    members = [make_checkpoint(tmp_path / f"{name}.pt", tile=16) for name in ("a", "b")]
    constant_members(monkeypatch, {"a.pt": -0.5, "b.pt": 0.0})  # HU window -1024..3000: -0.5 -> -18, 0 -> 988
    mr = mr_volume(tmp_path)
    records = run(mr, tmp_path / "sct.nii.gz", members, uncertainty=tmp_path / "sd.nii.gz")
    assert records[0]["uncertainty"] == str(tmp_path / "sd.nii.gz")
    sct, sd = nib.load(str(tmp_path / "sct.nii.gz")), nib.load(str(tmp_path / "sd.nii.gz"))
    source = nib.load(str(mr))
    assert sd.shape == sct.shape == source.shape and sd.get_data_dtype() == np.float32
    np.testing.assert_allclose(sd.affine, source.affine, atol=1e-6)
    np.testing.assert_allclose(sd.header.get_qform(), sct.header.get_qform(), atol=1e-6)
    hu, spread = voxels(tmp_path / "sct.nii.gz"), voxels(tmp_path / "sd.nii.gz")
    body = hu != -1000
    assert body.sum() > 100
    low, high = -1024 + 0.25 * 4024, -1024 + 0.5 * 4024
    assert np.all(hu[body] == round((low + high) / 2))
    np.testing.assert_allclose(spread[body], (high - low) / 2, rtol=1e-5)  # two members, all mirrorings alike
    assert np.all(spread[~body] == 0)


def test_the_uncertainty_of_one_model_is_the_spread_of_its_mirrorings(tmp_path):
    from medcycle.jobs.convert import run

    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    mr = mr_volume(tmp_path)
    run(mr, tmp_path / "plain.nii.gz", model)
    run(mr, tmp_path / "sct.nii.gz", model, uncertainty=tmp_path / "sd.nii.gz")
    assert np.array_equal(voxels(tmp_path / "plain.nii.gz"), voxels(tmp_path / "sct.nii.gz"))  # the sCT is unchanged
    spread = voxels(tmp_path / "sd.nii.gz")
    assert spread.max() > 0 and spread.min() >= 0  # random weights: the mirrorings disagree


def test_members_with_other_preprocessing_and_impossible_uncertainty_requests_are_refused(tmp_path):
    from medcycle.jobs.convert import run

    mr = mr_volume(tmp_path)
    a, b = make_checkpoint(tmp_path / "a.pt", tile=16), make_checkpoint(tmp_path / "b.pt", tile=16, context=3)
    with pytest.raises(InputError, match=r"b.pt: its preprocessing differs .* in data.context_slices \(3 vs 1\)"):
        run(mr, tmp_path / "sct.nii.gz", [a, b])
    with pytest.raises(UsageError, match="one output has no spread"):
        run(mr, tmp_path / "sct.nii.gz", a, tta="none", uncertainty=tmp_path / "sd.nii.gz")
    with pytest.raises(UsageError, match="must be a NIfTI file"):
        run(mr, tmp_path / "sct.nii.gz", [a, a], uncertainty=tmp_path / "sd.txt")
    assert not (tmp_path / "sct.nii.gz").exists()


def test_a_folder_of_cases_gets_one_uncertainty_map_per_case_and_a_missing_map_is_made_on_rerun(tmp_path, capsys):
    from medcycle.jobs.convert import run

    model = make_checkpoint(tmp_path / "model.pt", tile=16)
    cases = tmp_path / "cases"
    for name in ("p1", "p2"):
        (cases / name).mkdir(parents=True)
        mr_volume(cases / name)
    before = {p: p.read_bytes() for p in cases.rglob("*.nii.gz")}
    with pytest.raises(UsageError, match="go to a folder .* not a file"):
        run(cases, tmp_path / "sct", model, uncertainty=tmp_path / "sd.nii.gz")
    with pytest.raises(UsageError, match="is the input folder"):
        run(cases, tmp_path / "sct", model, uncertainty=cases)
    assert not (tmp_path / "sct").exists()

    records = run(cases, tmp_path / "sct", model, uncertainty=tmp_path / "sd")
    assert [r["status"] for r in records] == ["converted", "converted"]
    assert f"-> {tmp_path / 'sct'} (uncertainty maps in {tmp_path / 'sd'}) on cpu" in capsys.readouterr().out
    for name in ("p1", "p2"):
        sd, source = nib.load(str(tmp_path / "sd" / f"{name}_sd.nii.gz")), nib.load(str(cases / name / "mr.nii.gz"))
        assert sd.shape == source.shape and sd.get_data_dtype() == np.float32
        np.testing.assert_allclose(sd.affine, source.affine, atol=1e-6)
        assert voxels(tmp_path / "sd" / f"{name}_sd.nii.gz").max() > 0
    (tmp_path / "sd" / "p2_sd.nii.gz").unlink()  # a map lost: its case is not finished
    records = run(cases, tmp_path / "sct", model, uncertainty=tmp_path / "sd")
    assert [r["status"] for r in records] == ["skipped", "converted"]
    assert (tmp_path / "sd" / "p2_sd.nii.gz").is_file()
    assert {p: p.read_bytes() for p in cases.rglob("*.nii.gz")} == before


# --------------------------------------------------------------------------------------------------
# the command line, end to end


def test_cli_export_then_ensemble_convert_with_uncertainty(tmp_path, capsys):
    run_a = trained_checkpoint(tmp_path / "run_a" / "best.pt").parent
    run_b = make_checkpoint(tmp_path / "b.pt", tile=16)
    assert cli.main(["export", str(run_a), "--out", str(tmp_path / "model_a"), "--no-onnx"]) == 0
    assert capsys.readouterr().out.startswith(f"medcycle export: {run_a / 'best.pt'} (iteration ")
    assert cli.main(["export", str(run_a), "--out", str(tmp_path / "model_a"), "--no-onnx"]) == 1
    assert "already exists" in capsys.readouterr().err
    mr = mr_volume(tmp_path)
    assert cli.main(["convert", "-i", str(mr), "-o", str(tmp_path / "sct.nii.gz"), "-m", str(tmp_path / "model_a"),
                     "-m", str(run_b), "--uncertainty", str(tmp_path / "sd.nii.gz"), "--tta", "none"]) == 0
    assert voxels(tmp_path / "sd.nii.gz").shape == voxels(tmp_path / "sct.nii.gz").shape == (30, 26, 5)
