"""`medcycle train`: the step, logs, validation and best.pt, checkpoints, exact resume, signals, errors.

Tiny caches (32 px tiles, see test_dataset.make_cache) and width-4 networks keep every run to a
second or two; end-to-end tests run the real command line (`python -m medcycle train`) in a subprocess.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import medcycle.jobs.train as train_job
from helpers import HANG, QUIET, ROOT, rows, TINY
from medcycle.checkpoint import load_checkpoint, load_generator
from medcycle.config import load_config
from medcycle.data.cache import load_manifest
from medcycle.data.dataset import validation_tiles
from medcycle.engine.trainer import CycleGANTrainer, active_losses
from medcycle.errors import InputError, UsageError
from medcycle.files import file_checksum
from helpers import make_cache

#: seconds after which a waiting test gives up: only a hang takes that long, but on a shared 2-core machine
#: starting a process that imports torch and MONAI can take a minute


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """c00, c01 paired (train), c02 MR only, c03 CT only, c04 paired (val)."""
    return make_cache(tmp_path_factory.mktemp("cache"), ("paired", "paired", "mr", "ct", "paired"))


def train(cache: Path, out: Path, *overrides: str, **kwargs) -> dict:
    return train_job.run(data=cache, out=out, overrides=[*TINY, *overrides], **kwargs)


def cli(*args: str, timeout: float = HANG, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "medcycle", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout, **popen)


def cli_args(cache: Path, out: Path, *overrides: str) -> list[str]:
    return ["--data", str(cache), "--out", str(out), *[a for o in [*TINY, *overrides] for a in ("--set", o)]]


# --------------------------------------------------------------------------------------------------
# end to end


def test_cli_run_writes_checkpoints_logs_images_and_tracks_the_best_model(cache, tmp_path):
    run = tmp_path / "run"
    result = cli(*cli_args(cache, run, "train.log_every=2", "train.val_every=4", "train.image_every=6",
                           "train.checkpoint_every=5"), "--max-iters", "12")
    assert result.returncode == 0, result.stderr
    assert "finished at iteration 12" in result.stdout
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["iterations"] == 12 and config["model"]["gen_width"] == 4

    state = load_checkpoint(run / "last.pt")
    manifest = load_manifest(cache)
    assert state["format"] == "medcycle-checkpoint" and state["version"] == 1
    assert state["config"] == config and state["iteration"] == 12 and state["elapsed"] > 0
    from medcycle.data.dataset import cases_fingerprint

    assert state["preprocessing"] == {"data_config": manifest["data_config"], "data_config_hash": manifest["data_config_hash"],
                                      "cases_hash": cases_fingerprint(cache, manifest),
                                      "manifest_sha256": file_checksum(cache / "manifest.json"),  # exports' provenance
                                      "anatomy": "unknown"}  # make_cache's manifest carries no head check
    assert set(state["nets"]) == {"G_mr2ct", "G_ct2mr", "D_ct", "D_mr"}
    assert set(state["optimizers"]) == set(state["schedulers"]) == {"G", "D"}
    assert set(state["pools"]) == {"ct", "mr"} and state["pools"]["ct"]["images"].shape[0] == 3
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    per_epoch = 18  # 3 MR cases x 6 tiles, batch 1
    assert state["sampler"]["epoch"] == 12 // per_epoch and state["sampler"]["position"] == 12 % per_epoch
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in state["nets"]["G_mr2ct"])

    # validation at 4, 8, 12: validation.csv, history, best.pt = the lowest MAE
    val = rows(run / "validation.csv")
    assert [int(r["iteration"]) for r in val] == [4, 8, 12]
    history = state["metrics"]["history"]
    assert [h["iteration"] for h in history] == [4, 8, 12]
    maes = [h["mae"] for h in history]
    assert [float(r["mae"]) for r in val] == pytest.approx(maes, rel=1e-5)
    best_at = history[int(np.argmin(maes))]["iteration"]
    assert state["metrics"]["best_val_mae"] == min(maes) and state["metrics"]["best_iteration"] == best_at
    assert [r["best"] for r in val][[4, 8, 12].index(best_at)] == "1"
    best = load_checkpoint(run / "best.pt")
    assert best["iteration"] == best_at
    # best.pt's generator reproduces its validation MAE
    trainer = CycleGANTrainer(load_config(run / "config.yaml"))
    for name, weights in best["nets"].items():
        trainer.nets[name].load_state_dict(weights)
    tiles = validation_tiles(cache, manifest, config["train"]["val_max_tiles"])
    assert trainer.validate(tiles)["mae"] == pytest.approx(min(maes), rel=1e-4)
    generator, _, _ = load_generator(run)  # conversion picks best.pt
    assert torch.equal(generator.state_dict()["model.1.conv.weight"], best["nets"]["G_mr2ct"]["model.1.conv.weight"])

    losses = rows(run / "losses.csv")
    assert [int(r["iteration"]) for r in losses] == [2, 4, 6, 8, 10, 12]
    assert list(losses[0]) == ["iteration", "elapsed_s", "lr", "it_per_s", *active_losses(load_config(run / "config.yaml"))]
    assert sorted(p.name for p in (run / "images").iterdir()) == ["iter_000006.png", "iter_000012.png"]
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.glob(".tmp*"))

    # continue the finished run for 4 more iterations (train.iterations may change on resume)
    result = cli("--data", str(cache), "--out", str(run), "--resume", "--max-iters", "16")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "last.pt")["iteration"] == 16
    assert [int(r["iteration"]) for r in rows(run / "losses.csv")] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_networks_learn_and_losses_decrease(cache):
    config = load_config(None, [*TINY, "loss.pairing=paired", "model.gen_width=8", "train.lr=1e-3", "train.augment=false"])
    trainer = CycleGANTrainer(config)
    d_before = {k: v.clone() for k, v in trainer.nets["D_ct"].state_dict().items()}
    from medcycle.data.dataset import EpochSampler, TileDataset

    tiles = validation_tiles(cache, load_manifest(cache), 6)  # held out: never trained on

    def held_out_l1() -> float:
        return float(np.abs(trainer.translate(tiles["mr"]) - tiles["ct"]).mean())

    before = held_out_l1()
    ds = TileDataset(cache, load_manifest(cache), pairing="paired", augment=False)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=2, sampler=EpochSampler(len(ds), 0, 2)))
    paired = []
    for _ in range(40):
        trainer.set_input(next(loader))
        losses = trainer.optimize_parameters()
        assert all(v.dtype == torch.float32 for v in losses.values())
        paired.append(float(losses["paired"]))
    assert held_out_l1() < 0.7 * before
    assert np.mean(paired[-12:]) < 0.8 * np.mean(paired[:12])
    assert any(not torch.equal(d_before[k], v) for k, v in trainer.nets["D_ct"].state_dict().items())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical_to_a_straight_run(cache, tmp_path, workers):
    settings = ["train.deterministic=true", f"train.workers={workers}", "train.batch_size=2",
                "train.decay_from=0.3", "loss.pairing=hybrid", "loss.structure=0.5", "train.checkpoint_every=3",
                "train.val_every=2", "train.log_every=1", "train.image_every=1000", "train.pool_size=2"]
    straight = train(cache, tmp_path / "straight", *settings, max_iters=10)
    first = train(cache, tmp_path / "resumed", *settings, max_iters=10, stop_after=5)
    assert first["iteration"] == 5 and first["digest"] != straight["digest"]
    second = train(cache, tmp_path / "resumed", *settings, max_iters=10, resume=True)
    assert second["iteration"] == 10
    assert second["digest"] == straight["digest"]
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in ("G", "D"):
        for sa, sb in zip(a["optimizers"][key]["state"].values(), b["optimizers"][key]["state"].values()):
            assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(a["pools"]["ct"]["images"], b["pools"]["ct"]["images"])
    assert a["sampler"] == b["sampler"]
    # the same validations (the interrupted session also validated when it stopped, at 5)
    assert [h for h in b["metrics"]["history"] if h["iteration"] != 5] == a["metrics"]["history"]
    drop = ("elapsed_s", "it_per_s")
    la = [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "straight" / "losses.csv")]
    lb = [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "resumed" / "losses.csv")]
    assert la == lb and len(la) == 10


def test_wall_clock_budget_ends_the_run_and_drives_the_schedule(cache, tmp_path):
    summary = train(cache, tmp_path / "budget", *QUIET, "train.iterations=100000", "train.max_minutes=0.03",
                    "train.decay_from=0.5")
    assert summary["stopped"] == "finished" and 1 < summary["iteration"] < 100000 and summary["elapsed_s"] >= 1.8
    log = rows(tmp_path / "budget" / "losses.csv")
    lrs = [float(r["lr"]) for r in log]
    assert lrs[0] == pytest.approx(2e-4) and lrs[-1] == 0.0 and all(x >= y for x, y in zip(lrs, lrs[1:]))
    # deterministic: the schedule counts iterations only, the budget still stops the run
    summary = train(cache, tmp_path / "det", *QUIET, "train.iterations=100000", "train.max_minutes=0.02",
                    "train.deterministic=true")
    assert summary["iteration"] < 100000
    assert float(rows(tmp_path / "det" / "losses.csv")[-1]["lr"]) == pytest.approx(2e-4)


@pytest.mark.parametrize("overrides, present, absent", [
    ([], ["G_adv_ct", "G_adv_mr", "cycle_mr", "cycle_ct", "idt_ct", "idt_mr", "D_ct", "D_mr"], ["structure", "paired"]),
    (["loss.identity=0", "loss.structure=1", "loss.paired=5"], ["structure", "cycle_mr"], ["idt_ct", "idt_mr", "paired"]),
    (["loss.pairing=paired", "loss.adversarial=0"], ["paired", "cycle_ct"], ["G_adv_ct", "G_adv_mr", "D_ct", "D_mr"]),
    (["loss.pairing=hybrid", "loss.cycle=0"], ["paired", "G_adv_ct"], ["cycle_mr", "cycle_ct", "idt_ct", "idt_mr"]),
])
def test_loss_terms_are_logged_exactly_when_on(cache, tmp_path, overrides, present, absent):
    train(cache, tmp_path / "run", *QUIET, *overrides, max_iters=3)
    log = rows(tmp_path / "run" / "losses.csv")
    assert len(log) == 3
    for name in present:
        assert name in log[0] and all(float(r[name]) > 0 for r in log), name
    for name in absent:
        assert name not in log[0], name
    assert all(float(r["G"]) > 0 for r in log)


def test_a_run_of_medcycle_0_1_with_removed_keys_resumes_and_converts(cache, tmp_path):
    from medcycle.checkpoint import save_checkpoint
    from medcycle.config import REMOVED_KEYS

    run = tmp_path / "run"
    train(cache, run, *QUIET, max_iters=2)
    state, config = load_checkpoint(run / "last.pt"), yaml.safe_load((run / "config.yaml").read_text())
    for key, (off, _) in REMOVED_KEYS.items():  # as 0.1 wrote them
        section, name = key.split(".")
        state["config"][section][name] = config[section][name] = off
    save_checkpoint(run / "last.pt", state)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    generator, _, _ = load_generator(run)
    assert torch.equal(generator.state_dict()["model.1.conv.weight"], state["nets"]["G_mr2ct"]["model.1.conv.weight"])
    assert train_job.run(data=cache, out=run, resume=True, max_iters=4)["iteration"] == 4  # config from RUN/config.yaml
    state["config"]["loss"]["cycle_noise"] = 0.1
    save_checkpoint(run / "last.pt", state)
    with pytest.raises(UsageError, match="loss.cycle_noise was removed in medcycle 0.2"):
        load_generator(run / "last.pt")


def test_amp_channels_last_and_float32_losses():
    config = load_config(None, [*TINY, "train.amp=auto", "train.channels_last=true"])
    trainer = CycleGANTrainer(config)
    from medcycle.engine.amp import autocast_dtype

    assert trainer.dtype == autocast_dtype("auto", "cpu")
    assert trainer.nets["G_mr2ct"].model[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.set_input({"mr": torch.rand(2, 1, 32, 32) * 2 - 1, "ct": torch.rand(2, 1, 32, 32) * 2 - 1})
    losses = trainer.optimize_parameters()
    assert trainer.fake_ct.dtype == (trainer.dtype or torch.float32)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    fp32 = CycleGANTrainer(load_config(None, [*TINY, "train.amp=none", "train.channels_last=false"]))
    assert fp32.dtype is None and fp32.nets["G_mr2ct"].model[1].conv.weight.is_contiguous()


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_policy_follows_the_cpu(monkeypatch, native_bf16):
    from medcycle.engine import amp

    monkeypatch.setattr(amp, "cpu_supports_bf16", lambda: native_bf16)
    for setting in ("auto", "bf16", "fp16", True):
        assert amp.autocast_dtype(setting, "cpu") == (torch.bfloat16 if native_bf16 else None)
    for setting in ("none", False, None):
        assert amp.autocast_dtype(setting, "cpu") is None
    trainer = CycleGANTrainer(load_config(None, [*TINY, "train.amp=auto"]))
    assert trainer.dtype == (torch.bfloat16 if native_bf16 else None)


def test_compile_failure_falls_back_to_eager(cache, tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *args):
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(torch, "compile", lambda net, **kw: Broken(net))
    with pytest.warns(UserWarning, match="torch.compile failed"):
        summary = train(cache, tmp_path / "run", *QUIET, "train.compile=true", max_iters=2)
    assert summary["iteration"] == 2


# --------------------------------------------------------------------------------------------------
# checkpoints: atomic, signals


def test_a_failed_checkpoint_write_keeps_the_previous_one(cache, tmp_path, monkeypatch):
    import medcycle.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def flaky(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as handle:  # half a file, then the disk fills up
                handle.write(b"PK\x03\x04 truncated")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", flaky)
    with pytest.raises(InputError, match="last.pt: cannot write"):
        train(cache, tmp_path / "run", *QUIET, "train.checkpoint_every=2", max_iters=10)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2
    assert not list((tmp_path / "run").glob(".tmp*"))


def _wait_for(predicate, proc: subprocess.Popen) -> None:
    """Until `predicate` holds; fails at once if `proc` ended (with its stderr) and after :data:`HANG` seconds."""
    deadline = time.monotonic() + HANG
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _start(cache: Path, run: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "medcycle", "train", *cli_args(cache, run, *QUIET, *overrides),
                             "--max-iters", "100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace")


def test_sigterm_saves_last_pt_and_says_how_to_resume(cache, tmp_path):
    run = tmp_path / "run"
    proc = _start(cache, run, "train.workers=2")
    try:
        _wait_for(lambda: (run / "losses.csv").is_file() and len(rows(run / "losses.csv")) >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=HANG)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("medcycle train: error: stopped by SIGTERM at iteration ")
    assert f"--out {run} --resume" in message
    stopped_at = int(message.split("at iteration ")[1].split(";")[0])
    state = load_checkpoint(run / "last.pt")
    assert state["iteration"] == stopped_at >= 3
    summary = train_job.run(data=cache, out=run, resume=True, max_iters=stopped_at + 2)  # config from RUN/config.yaml
    assert summary["iteration"] == stopped_at + 2


def test_sigkill_leaves_a_loadable_checkpoint_that_resumes(cache, tmp_path):
    run = tmp_path / "run"
    proc = _start(cache, run, "train.checkpoint_every=1")

    def checkpointed() -> bool:
        try:
            return (run / "last.pt").is_file() and load_checkpoint(run / "last.pt")["iteration"] >= 3
        except InputError:  # never: writes are atomic
            raise
    try:
        _wait_for(checkpointed, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG)
    finally:
        proc.kill()
    state = load_checkpoint(run / "last.pt")
    result = cli("--data", str(cache), "--out", str(run), "--resume", "--max-iters", str(state["iteration"] + 2))
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "last.pt")["iteration"] == state["iteration"] + 2


# --------------------------------------------------------------------------------------------------
# errors


def test_user_errors_are_refused_with_one_line(cache, tmp_path):
    with pytest.raises(InputError, match="no such cache folder"):
        train(tmp_path / "missing", tmp_path / "r0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cache folder is empty"):
        train(tmp_path / "empty", tmp_path / "r0")
    with pytest.raises(InputError, match=r"data.tile_size: cache 32, config 64.*re-run medcycle preprocess"):
        train(cache, tmp_path / "r0", "data.tile_size=64")
    with pytest.raises(UsageError, match="nothing to resume"):
        train(cache, tmp_path / "r0", resume=True)
    with pytest.raises(UsageError, match="every generator loss is off"):
        train(cache, tmp_path / "r0", "loss.adversarial=0", "loss.cycle=0")
    with pytest.raises(UsageError, match="--device cuda"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        train(cache, tmp_path / "r0", device="cuda")
    unpaired = make_cache(tmp_path / "unpaired", ("mr", "ct", "paired"), val=1)
    with pytest.raises(InputError, match="loss.pairing=paired"):
        train(unpaired, tmp_path / "r0", "loss.pairing=paired")

    run = tmp_path / "run"
    train(cache, run, *QUIET, max_iters=2)
    with pytest.raises(UsageError, match="use --resume or another --out"):
        train(cache, run, *QUIET, max_iters=2)
    with pytest.raises(UsageError, match=r"config differs from the run.s in train.lr: run 0.0002, now 0.001"):
        train(cache, run, *QUIET, "train.lr=1e-3", resume=True, max_iters=4)
    assert train(cache, run, *QUIET, "train.log_every=2", resume=True, max_iters=4)["iteration"] == 4
    (run / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="last.pt: not a readable checkpoint"):
        train(cache, run, *QUIET, resume=True, max_iters=6)

    result = cli(*cli_args(cache, run, *QUIET), "--max-iters", "2")  # the command line: one line, exit 2
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"medcycle train: error: {run}: already holds a training run (last.pt); use --resume or another --out"]
