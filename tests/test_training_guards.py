"""Hostile input to `medcycle train` (issue 24): each is refused or stopped in one line, and nothing wrong is kept.

Grouped by class: config values, the command line, divergence, the run folder and the machine's limits.
Tiny caches (``test_dataset.make_cache``: 32-px tiles) and width-4 networks keep each run to seconds.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

import medcycle.jobs.train as train_job
from medcycle.checkpoint import load_checkpoint
from medcycle.cli import main as cli_main
from medcycle.config import load_config
from medcycle.engine.loop import Diverged
from medcycle.engine.trainer import CycleGANTrainer
from medcycle.errors import InputError, UsageError
from helpers import make_cache

TINY = ["data.tile_size=32", "data.val_cases=1", "model.gen_width=4", "model.gen_blocks=1", "model.disc_width=4",
        "train.workers=0", "train.pool_size=3", "train.log_every=1", "train.val_every=1000", "train.image_every=1000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """c00, c01 paired (train), c02 MR only, c03 CT only, c04 paired (val)."""
    return make_cache(tmp_path_factory.mktemp("cache"), ("paired", "paired", "mr", "ct", "paired"))


def train(cache: Path, out: Path, *overrides: str, **kwargs) -> dict:
    return train_job.run(data=cache, out=out, overrides=[*TINY, *overrides], **kwargs)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# --------------------------------------------------------------------------------------------------


class TestConfigValues:
    @pytest.mark.parametrize("assignment, message", [
        ("train.lr=1e30", r"train.lr must be in \(0, 1\]"),
        ("train.lr=2", r"train.lr must be in \(0, 1\]"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("loss.cycle=-.inf", "loss.cycle must be a finite number"),
        ("data.orientation=XYZ", "data.orientation must be three axis codes, one each of L/R, A/P and S/I"),
        ("data.orientation=RRR", "data.orientation must be three axis codes"),
        ("data.orientation=RAR", "data.orientation must be three axis codes"),
        ("data.orientation=ras", "data.orientation must be three axis codes"),
        ("data.orientation=RASI", "data.orientation must be three axis codes"),
        ("data.tile_size=1000000", r"data.tile_size must be a multiple of 4 in \[16, 1024\]"),
        ("data.tile_size=1028", r"data.tile_size must be a multiple of 4 in \[16, 1024\]"),
    ])
    def test_out_of_range_values_are_refused_naming_the_key(self, assignment, message):
        with pytest.raises(UsageError, match=message) as exc:
            load_config(None, [assignment])
        one_line(exc)

    def test_the_limits_themselves_are_accepted(self):
        config = load_config(None, ["train.lr=1", "data.tile_size=1024", "data.orientation=LPS"])
        assert (config.train.lr, config.data.tile_size, config.data.orientation) == (1.0, 1024, "LPS")
        assert load_config(None, ["data.orientation=SPL"]).data.orientation == "SPL"  # any order of the axes

    def test_duplicate_yaml_keys_are_refused(self, tmp_path):
        path = tmp_path / "dup.yaml"
        path.write_text("train:\n  lr: 1.0e-4\n  batch_size: 2\n  lr: 3.0e-4\n")
        with pytest.raises(UsageError, match=r"dup.yaml: not valid YAML \(duplicate key 'lr' at line 4, column 3\)"):
            load_config(path)
        path.write_text("train:\n  lr: 1.0e-4\ntrain:\n  batch_size: 2\n")  # a section twice
        with pytest.raises(UsageError, match="duplicate key 'train' at line 3"):
            load_config(path)
        with pytest.raises(UsageError, match="duplicate key 'a'"):
            load_config(None, ["data.spacing={a: 1, a: 2}"])
        path.write_text("base: &b {lr: 1.0e-4}\ntrain:\n  <<: *b\n  lr: 3.0e-4\n")  # a merge key may be overridden
        with pytest.raises(UsageError, match="unknown key 'base'"):
            load_config(path)


class TestCommandLine:
    def test_a_binary_config_file_is_one_line_exit_2(self, tmp_path, capsys):
        binary = tmp_path / "weights.bin"
        binary.write_bytes(bytes(range(256)) * 8)
        code = cli_main(["train", "--config", str(binary), "--data", str(tmp_path), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [f"medcycle train: error: {binary}: not a YAML config (not UTF-8 text; a binary file?)"]

    def test_set_with_broken_yaml_is_one_line_exit_2(self, tmp_path, capsys):
        code = cli_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "data.spacing=[1, 2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert err[0].startswith("medcycle train: error: --set data.spacing: '[1, 2' is not valid YAML (")


class TestDivergence:
    """A non-finite loss or weights stop the run in one line; last.pt keeps the last good iteration."""

    @staticmethod
    def _poison_weights_after(monkeypatch, iteration: int) -> None:
        """After the optimiser step of `iteration`, G_mr2ct's weights become NaN (as a too large step makes them)."""
        real = CycleGANTrainer.optimize_parameters

        def step(self):
            losses = real(self)
            if self.iteration == iteration:
                with torch.no_grad():
                    for p in self.nets["G_mr2ct"].parameters():
                        p.fill_(float("nan"))
            return losses

        monkeypatch.setattr(CycleGANTrainer, "optimize_parameters", step)

    def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(self, cache, tmp_path, monkeypatch):
        run = tmp_path / "run"
        self._poison_weights_after(monkeypatch, 5)  # the losses of iteration 6 are NaN
        with pytest.raises(Diverged) as exc:
            train(cache, run, "train.checkpoint_every=2", max_iters=20)
        message = one_line(exc)
        assert message.startswith("training diverged at iteration 6: a non-finite loss (")
        assert f"{run / 'last.pt'} keeps iteration 4; lower train.lr (now 0.0002)" in message
        state = load_checkpoint(run / "last.pt")
        assert state["iteration"] == 4
        assert all(torch.isfinite(v).all() for net in state["nets"].values() for v in net.values())
        assert exc.value.exit_code == 1

    def test_non_finite_weights_are_never_written(self, cache, tmp_path, monkeypatch):
        run = tmp_path / "run"
        self._poison_weights_after(monkeypatch, 4)  # a checkpoint is due at 4, the losses of 4 are still finite
        with pytest.raises(Diverged, match=f"at iteration 4: non-finite weights; {run / 'last.pt'} keeps iteration 2"):
            train(cache, run, "train.checkpoint_every=2", "train.val_every=2", max_iters=20)
        assert load_checkpoint(run / "last.pt")["iteration"] == 2
        assert not (run / "best.pt").exists() or load_checkpoint(run / "best.pt")["iteration"] <= 2

    def test_divergence_before_any_checkpoint_says_so(self, cache, tmp_path, monkeypatch):
        self._poison_weights_after(monkeypatch, 1)
        with pytest.raises(Diverged, match="at iteration 2: a non-finite loss .*; no checkpoint was written"):
            train(cache, tmp_path / "run", "train.checkpoint_every=100", max_iters=20)
        assert not (tmp_path / "run" / "last.pt").exists()


class TestRunFolder:
    def test_out_inside_the_cache_is_refused(self, cache, tmp_path):
        for out in (cache / "run", cache, cache / "cases" / "c00" / "run"):
            with pytest.raises(UsageError, match=f"--out {out}: inside the cache folder {cache}") as exc:
                train(cache, out, max_iters=1)
            one_line(exc)
        link = tmp_path / "link"
        link.symlink_to(cache, target_is_directory=True)
        with pytest.raises(UsageError, match="inside the cache folder"):
            train(cache, link / "run", max_iters=1)
        assert sorted(p.name for p in cache.iterdir()) == ["cases", "manifest.json"]  # nothing written into it

    def test_resume_on_other_cases_of_the_same_data_config_is_refused(self, cache, tmp_path):
        run = tmp_path / "run"
        train(cache, run, max_iters=2)
        other = make_cache(tmp_path / "other", ("paired", "paired", "mr", "ct", "paired"), seed=1)  # same ids, same config
        for name in ("c00", "c01"):  # other patients: the cases' sources differ
            record = other / "cases" / name / "record.json"
            record.write_text(record.read_text().replace('"sha256": "0"', f'"sha256": "{name}-other"'))
        with pytest.raises(InputError, match=f"{other}: holds other cases than the cache this run was trained on") as exc:
            train(other, run, resume=True, max_iters=4)
        one_line(exc)
        fewer = make_cache(tmp_path / "fewer", ("paired", "paired", "mr", "paired"))  # c03 missing
        with pytest.raises(InputError, match="holds other cases"):
            train(fewer, run, resume=True, max_iters=4)
        moved = tmp_path / "moved"  # the same cache in another place resumes
        shutil.copytree(cache, moved)
        assert train(moved, run, resume=True, max_iters=4)["iteration"] == 4

    def test_an_out_that_cannot_be_created_is_one_line(self, cache, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        with pytest.raises(InputError, match=f"^{blocker / 'run'}: Not a directory$"):
            train(cache, blocker / "run", max_iters=1)

    def test_a_read_only_out_is_one_line(self, cache, tmp_path, monkeypatch):
        run = tmp_path / "ro" / "run"
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):  # root ignores permission bits: the file system refuses instead
            if self == run or run in self.parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
        with pytest.raises(InputError, match=f"^{run}: Read-only file system$"):
            train(cache, run, max_iters=1)

    def test_a_full_disk_during_training_is_one_line(self, cache, tmp_path, monkeypatch):
        from medcycle.engine import logger

        real_write = logger._CsvLog.write

        def full(self, values):
            if values.get("iteration") == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return real_write(self, values)

        monkeypatch.setattr(logger._CsvLog, "write", full)
        run = tmp_path / "run"
        with pytest.raises(InputError, match=f"^{run / 'losses.csv'}: No space left on device$"):
            train(cache, run, "train.checkpoint_every=2", max_iters=10)
        assert load_checkpoint(run / "last.pt")["iteration"] == 2


class TestMachineLimits:
    def test_a_model_too_large_for_memory_is_one_line(self, cache, tmp_path):
        # 2e6 filters: the second convolution alone asks for 268,220 GiB, beyond any address space, so the
        # allocation is refused whatever the kernel's overcommit policy (no process is OOM-killed)
        with pytest.raises(UsageError, match=r"^out of memory \(one allocation of \d+\.\d GiB\): the networks of "
                                             r"model.gen_width=2000000, .* do not fit; lower them$"):
            train(cache, tmp_path / "run", "model.gen_width=2000000", max_iters=1)
