"""DDP on CPU (gloo, two processes): gradients are averaged, ranks stay identical, only rank 0 writes,
a signal or the wall clock stops every rank at the same iteration, and `torchrun -m medcycle train` works."""
from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from medcycle.checkpoint import load_checkpoint
from helpers import make_cache
from helpers import HANG, QUIET, ROOT, TINY, rows

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache"), ("paired", "paired", "mr", "ct", "paired"))


def _gradients_are_averaged(cache: Path, rank: int) -> float:
    """Largest difference between the DDP gradients and the mean of the ranks' local gradients."""
    import torch.distributed as dist

    from medcycle.config import load_config
    from medcycle.engine.trainer import CycleGANTrainer

    config = load_config(None, [*TINY, "train.pool_size=0", "loss.structure=1"])
    torch.manual_seed(0)
    ddp = CycleGANTrainer(config)
    torch.manual_seed(0)
    local = CycleGANTrainer(config)  # same weights, no DDP
    ddp.wrap_ddp()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    batch = {"mr": torch.rand(2, 1, 32, 32, generator=g) * 2 - 1, "ct": torch.rand(2, 1, 32, 32, generator=g) * 2 - 1}
    for trainer in (ddp, local):
        trainer.set_input(batch)
        trainer.forward()
        trainer.set_requires_grad(trainer.D.parameters(), False)
        trainer.backward_G()
        trainer.set_requires_grad(trainer.D.parameters(), True)
        trainer.backward_D()
    worst = 0.0
    for name in ("G_mr2ct", "G_ct2mr", "D_ct", "D_mr"):
        for p_ddp, p_local in zip(ddp.nets[name].parameters(), local.nets[name].parameters()):
            mean = p_local.grad.clone()
            dist.all_reduce(mean)
            mean /= WORLD
            assert not torch.equal(p_local.grad, mean) or name.startswith("D")  # the ranks' batches differ
            worst = max(worst, float((p_ddp.grad - mean).abs().max() / (mean.abs().max() + 1e-12)))
    return worst


def _native_threads() -> list[str]:
    """Names of this process's native threads (Linux)."""
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


def _worker(rank: int, port: int, cache: str, out: str, overrides: list, results: str, grad_check: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import medcycle.jobs.train as train_job
    from medcycle.engine import distributed
    from medcycle.errors import MedcycleError

    report: dict = {}
    close = distributed.DistContext.close

    def counting_close(self) -> None:  # DDP still alive here would destroy the group holding the GIL (a hang)
        gc.collect()
        report.setdefault("ddp_alive_at_close", sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        close(self)

    distributed.DistContext.close = counting_close
    ctx = distributed.setup("cpu") if grad_check else None  # the group, for the check before training
    try:
        if grad_check:
            report["grad_error"] = _gradients_are_averaged(Path(cache), rank)
        summary = train_job.run(data=cache, out=out, overrides=[*TINY, *overrides])
        report.update(iteration=summary["iteration"], digest=summary["digest"])
    except MedcycleError as exc:
        report.update(error=str(exc), code=exc.exit_code)
    except SystemExit as exc:
        report.update(error="exit", code=exc.code)
    finally:
        if ctx is not None:
            ctx.close()
    # the process group is gone with its threads: none is left to run into the interpreter's exit
    report["threads_left"] = [name for name in _native_threads() if "gloo" in name or "tcpstore" in name]
    Path(results, f"rank{rank}.json").write_text(json.dumps(report))


def _reports(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ddp_averages_gradients_and_keeps_the_ranks_identical(cache, tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    overrides = [*QUIET, "train.iterations=6", "train.batch_size=2", "train.val_every=3", "train.checkpoint_every=3",
                 "loss.pairing=hybrid", "loss.structure=1"]
    mp.spawn(_worker, args=(_free_port(), str(cache), str(out), overrides, str(results), True), nprocs=WORLD, join=True)
    reports = _reports(results)
    assert all(r["grad_error"] < 1e-5 for r in reports), reports
    assert [r["threads_left"] for r in reports] == [[], []]
    assert [r["ddp_alive_at_close"] for r in reports] == [0, 0]
    assert reports[0]["iteration"] == reports[1]["iteration"] == 6
    assert reports[0]["digest"] == reports[1]["digest"]  # different data on each rank, identical weights
    state = load_checkpoint(out / "last.pt")
    assert state["world_size"] == WORLD and len(state["rank_pools"]) == WORLD - 1
    assert state["sampler"] == {"epoch": 1, "position": 4, "world_size": WORLD, "batch_size": 2}  # 8 per rank and epoch
    from medcycle.engine.trainer import CycleGANTrainer
    from medcycle.config import Config

    trainer = CycleGANTrainer(Config.from_dict(state["config"]))
    for name, weights in state["nets"].items():
        trainer.nets[name].load_state_dict(weights)
    assert trainer.digest() == reports[0]["digest"]
    assert [int(r["iteration"]) for r in rows(out / "losses.csv")] == list(range(1, 7))  # one writer
    assert [int(r["iteration"]) for r in rows(out / "validation.csv")] == [3, 6]


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_iteration(cache, tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    context = mp.spawn(_worker, args=(_free_port(), str(cache), str(out), [*QUIET, "train.iterations=100000"], str(results),
                                      False), nprocs=WORLD, join=False)
    try:
        deadline = time.monotonic() + HANG
        while not ((out / "losses.csv").is_file() and len(rows(out / "losses.csv")) >= 3):
            assert time.monotonic() < deadline and all(p.is_alive() for p in context.processes)
            time.sleep(0.05)
        os.kill(context.processes[1].pid, signal.SIGTERM)  # rank 1 only
        for process in context.processes:
            process.join(HANG)
            assert not process.is_alive()
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    reports = _reports(results)
    assert reports[0]["code"] == reports[1]["code"] == 128 + signal.SIGTERM
    assert [r["threads_left"] for r in reports] == [[], []]
    assert [r["ddp_alive_at_close"] for r in reports] == [0, 0]  # released before the group, also on a signal
    assert [p.exitcode for p in context.processes] == [0, 0]
    assert "stopped by SIGTERM at iteration" in reports[0]["error"]
    stopped_at = int(reports[0]["error"].split("at iteration ")[1].split(";")[0])
    assert load_checkpoint(out / "last.pt")["iteration"] == stopped_at


def test_torchrun_cli_writes_one_run_and_stops_all_ranks_on_the_wall_clock(cache, tmp_path):
    run = tmp_path / "run"
    sets = [a for o in [*TINY, *QUIET, "train.iterations=100000", "train.max_minutes=0.04", "train.val_every=5"]
            for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                             "-m", "medcycle", "train", "--data", str(cache), "--out", str(run), *sets],
                            cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=HANG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train: finished at iteration") == 1  # rank 0 reports
    state = load_checkpoint(run / "last.pt")
    assert state["world_size"] == WORLD and state["elapsed"] >= 0.04 * 60 and 0 < state["iteration"] < 100000
    log = rows(run / "losses.csv")
    assert [int(r["iteration"]) for r in log] == list(range(1, state["iteration"] + 1))
    assert float(log[-1]["lr"]) == 0.0  # the schedule followed the wall clock to its end
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "images", "last.pt", "losses.csv",
                                                     "tensorboard", "validation.csv"]
