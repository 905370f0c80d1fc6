"""The training loop: run-folder checks, resume, schedule, validation, logs, checkpoints, signals, DDP.

Run length and schedule. The run ends when ``progress`` reaches 1, with ``progress = it / train.iterations``
or, with ``train.max_minutes``, ``max(it / iterations, elapsed / budget)``: the lr follows whichever of
the two ends first (constant, then linear decay to 0 from ``train.decay_from``). In
``train.deterministic`` mode progress (and so the lr) counts iterations only, so that a resumed run
repeats a straight one bit for bit; the wall-clock budget then still stops the run. ``elapsed`` counts
training seconds over all sessions of a run (it is stored in the checkpoint).

Validation (every ``train.val_every`` iterations and at the end) needs paired ``val`` cases in the
cache. Without them there is no validation and no ``best.pt``: :func:`medcycle.checkpoint.resolve_checkpoint`
then falls back to ``last.pt``, i.e. the best model is the last one.

Signals: SIGINT / SIGTERM set a flag; the current iteration finishes, ``last.pt`` is written and
:class:`Interrupted` (exit code 128 + signal) tells how to resume. A second Ctrl-C aborts at once.
In DDP the flag, the wall clock and the end of the run are agreed through an all-reduce every
iteration, so all ranks stop at the same iteration.
"""
from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from medcycle.checkpoint import load_checkpoint, save_checkpoint
from medcycle.config import Config, save_config
from medcycle.data.cache import load_manifest
from medcycle.data.dataset import (
    EpochSampler,
    TileDataset,
    check_data_config,
    config_differences,
    preview_tiles,
    resumed_position,
    validation_tiles,
    worker_init,
)
from medcycle.engine.distributed import DistContext
from medcycle.engine.logger import RunLogger
from medcycle.engine.trainer import CycleGANTrainer, seed_everything, set_rng_state
from medcycle.errors import InputError, MedcycleError, UsageError

LAST, BEST, CONFIG = "last.pt", "best.pt", "config.yaml"
#: config keys that may change when a run is resumed (they change neither the model nor the data)
RESUMABLE_KEYS = ("train.iterations", "train.max_minutes", "train.log_every", "train.image_every",
                  "train.val_every", "train.checkpoint_every", "train.workers")
PREVIEW_TILES = 4


class Interrupted(MedcycleError):
    """Training stopped by a signal after saving ``last.pt``."""


def _flat_value(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def check_new_run(run_dir: Path) -> None:
    """Refuse to start a new run over an existing one."""
    if (run_dir / LAST).exists():
        raise UsageError(f"{run_dir}: already holds a training run ({LAST}); use --resume or another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a folder")


def load_resume_state(run_dir: Path, config: Config, manifest: Mapping[str, Any], cache_dir: Path) -> dict[str, Any]:
    """``RUN/last.pt``, checked against the config (only :data:`RESUMABLE_KEYS` may differ) and the cache."""
    path = run_dir / LAST
    if not path.is_file():
        raise UsageError(f"{run_dir}: nothing to resume ({LAST} not found); start without --resume")
    state = load_checkpoint(path)
    for key in ("optimizers", "schedulers", "pools", "rng", "sampler"):
        if key not in state:
            raise InputError(f"{path}: cannot be resumed (the checkpoint holds no {key})")
    run_config = Config.from_dict(state["config"]).to_dict()  # as this version reads it (removed keys dropped)
    differing = config_differences(run_config, config.to_dict(), ignore=RESUMABLE_KEYS)
    if differing:
        key = differing[0]
        more = f" (and {len(differing) - 1} more)" if len(differing) > 1 else ""
        raise UsageError(f"--resume: the config differs from the run's in {key}{more}: run {_flat_value(run_config, key)!r}, "
                         f"now {_flat_value(config.to_dict(), key)!r}; resume with {run_dir / CONFIG} or use another --out")
    cached = manifest.get("data_config_hash")
    trained = (state.get("preprocessing") or {}).get("data_config_hash")
    if cached != trained:
        raise InputError(f"{cache_dir}: not the cache this run was trained on (data config hash {cached}, run {trained}); "
                         "resume with the original cache or use another --out")
    return state


class _Signals:
    """SIGINT/SIGTERM -> a flag (main thread only); a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _dummy_batch(config: Config, batch_size: int) -> dict[str, torch.Tensor]:
    k, side = config.data.context_slices, config.data.tile_size
    tile = torch.zeros(batch_size, k, side, side)
    batch: dict[str, Any] = {"mr": tile, "ct": tile}
    if config.loss.pairing == "hybrid":
        batch.update(ct_reg=tile, mr_reg=tile, has_ct_reg=torch.ones(batch_size, dtype=torch.bool),
                     has_mr_reg=torch.ones(batch_size, dtype=torch.bool))
    return batch


def fit(config: Config, cache_dir: str | Path, run_dir: str | Path, ctx: DistContext, resume: bool = False,
        stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train `config` on the cache `cache_dir` into `run_dir` (see the module docstring); returns a summary.

    `stop_after` ends this session after that iteration as if interrupted cleanly (the schedule still
    follows ``train.iterations``): for tests and benchmarks.
    """
    cache_dir, run_dir = Path(cache_dir), Path(run_dir)
    train = config.train
    manifest = load_manifest(cache_dir)
    check_data_config(manifest, config.to_dict()["data"], cache_dir)
    state = load_resume_state(run_dir, config, manifest, cache_dir) if resume else None
    if state is None:
        check_new_run(run_dir)

    deterministic_before = torch.are_deterministic_algorithms_enabled()
    seed_everything(train.seed, train.deterministic)
    dataset = TileDataset(cache_dir, manifest, "train", config.loss.pairing, train.augment, train.seed)
    sampler = EpochSampler(len(dataset), train.seed, train.batch_size, ctx.rank, ctx.world)
    if state is not None:
        sampler.epoch, sampler.position = resumed_position(state["sampler"], ctx.world, train.batch_size, sampler.per_rank)
    trainer = CycleGANTrainer(config, ctx.device)
    metrics: dict[str, Any] = {"best_val_mae": None, "best_iteration": None, "history": []}
    base_elapsed = 0.0
    if state is not None:
        if int(state.get("world_size", 1)) != ctx.world and ctx.is_main:
            warnings.warn(f"resuming a run of {state.get('world_size', 1)} processes with {ctx.world}: the data order and "
                          "image pools continue approximately, not exactly")
        pools = state["pools"]
        if ctx.rank > 0:
            others = state.get("rank_pools") or []
            pools = others[ctx.rank - 1] if len(others) >= ctx.rank else {}
        trainer.load_state_dict(state, pools=pools, restore_rng=False)
        metrics = dict(state.get("metrics") or metrics)
        base_elapsed = float(state.get("elapsed", 0.0))
    if train.compile:
        _compile(trainer, config, ctx)
    if ctx.distributed:
        trainer.wrap_ddp()
    if state is not None:
        set_rng_state(state["rng"])  # last: nothing after this draws from the global generators

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train.batch_size, sampler=sampler, num_workers=train.workers,
        pin_memory=ctx.device.type == "cuda", worker_init_fn=worker_init if train.workers else None,
        generator=torch.Generator().manual_seed(train.seed), prefetch_factor=2 if train.workers else None,
    )
    val_tiles = validation_tiles(cache_dir, manifest, train.val_max_tiles) if ctx.is_main else None
    preview = preview_tiles(cache_dir, manifest, PREVIEW_TILES) if ctx.is_main else None
    preprocessing = {"data_config": manifest["data_config"], "data_config_hash": manifest["data_config_hash"]}
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".tmp-*"):  # left by a run killed while writing (writes are atomic)
            if stale.is_file():
                stale.unlink(missing_ok=True)
        save_config(config, run_dir / CONFIG)
        if config.loss.pairing == "hybrid" and not dataset.paired_cases:
            warnings.warn(f"{cache_dir}: loss.pairing=hybrid but no training case is paired: the paired terms stay 0")
    budget = train.max_minutes * 60.0 if train.max_minutes else None
    start = trainer.iteration
    logger = RunLogger(run_dir, ctx.is_main, trainer.loss_names, start, train.iterations, resumed=state is not None,
                       budget_s=budget)

    def progress_of(iteration: int, elapsed: float) -> float:
        p = iteration / train.iterations
        if budget and not train.deterministic:
            p = max(p, elapsed / budget)
        return min(1.0, p)

    def checkpoint_state(elapsed: float, sampler_state: Mapping[str, int], gather: bool = True) -> Optional[dict[str, Any]]:
        local = trainer.state_dict()
        pools = ctx.gather(local["pools"]) if gather and ctx.distributed else None  # collective
        if not ctx.is_main:
            return None
        local.update(config=config.to_dict(), preprocessing=preprocessing, elapsed=float(elapsed),
                     sampler={**sampler_state, "world_size": ctx.world, "batch_size": train.batch_size},
                     metrics=metrics, world_size=ctx.world)
        if pools is not None:
            local["rank_pools"] = pools[1:]
        return local

    sampler_state = {"epoch": sampler.epoch, "position": sampler.position}
    elapsed = base_elapsed
    stopped = "finished"
    summary: dict[str, Any] = {}
    if progress_of(start, elapsed) >= 1.0 or (budget and elapsed >= budget):
        logger.close()
        _restore(deterministic_before)
        if ctx.is_main:
            print(f"train: {run_dir} already finished at iteration {start}; raise train.iterations (--max-iters) "
                  "or train.max_minutes to continue")
        return {"run": str(run_dir), "iteration": start, "elapsed_s": elapsed, "stopped": "already finished",
                "best_val_mae": metrics.get("best_val_mae"), "digest": trainer.digest()}

    sums: dict[str, torch.Tensor] = {}
    count, window_start, window_it = 0, time.perf_counter(), start
    t0 = time.perf_counter()
    batches = iter(loader)
    try:
        with _Signals() as signals:
            while True:
                batch = next(batches)
                trainer.set_input(batch)
                losses = trainer.optimize_parameters()
                it = trainer.iteration
                sampler_state = sampler.after(int(batch["epoch"][-1]), int(batch["position"][-1]))
                signum, elapsed = ctx.agree_max(float(signals.signum), base_elapsed + time.perf_counter() - t0)
                progress = progress_of(it, elapsed)
                trainer.set_progress(progress)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.float()
                count += 1
                logger.step()
                done = progress >= 1.0 or bool(budget and elapsed >= budget)
                stop_here = done or bool(stop_after and it >= stop_after)
                if it % train.log_every == 0 or stop_here or signum:
                    names = trainer.loss_names
                    values = ctx.mean(torch.stack([sums.get(n, torch.zeros(())).detach().cpu().double() for n in names]) / count)
                    now = time.perf_counter()
                    rate = (it - window_it) / max(now - window_start, 1e-9)
                    logger.log_losses(it, elapsed, trainer.lr, rate, dict(zip(names, values.tolist())), progress)
                    sums, count, window_start, window_it = {}, 0, now, it
                if ctx.is_main and val_tiles is not None and (it % train.val_every == 0 or stop_here):
                    result = trainer.validate(val_tiles)
                    best = metrics.get("best_val_mae")
                    improved = math.isfinite(result["mae"]) and (best is None or result["mae"] < best)
                    if improved:
                        metrics["best_val_mae"], metrics["best_iteration"] = result["mae"], it
                    metrics["history"] = [*metrics.get("history", []), {"iteration": it, **result}]
                    logger.log_validation(it, elapsed, result, improved)
                    if improved:
                        save_checkpoint(run_dir / BEST, checkpoint_state(elapsed, sampler_state, gather=False))
                if ctx.is_main and (it % train.image_every == 0 or stop_here):
                    logger.image_sheet(it, trainer.sheet_columns(preview))
                if it % train.checkpoint_every == 0 or stop_here or signum:
                    payload = checkpoint_state(elapsed, sampler_state)
                    if payload is not None:
                        save_checkpoint(run_dir / LAST, payload)
                if signum:
                    name = signal.Signals(int(signum)).name
                    raise Interrupted(
                        f"stopped by {name} at iteration {it}; saved {run_dir / LAST}; continue with: medcycle train "
                        f"--data {cache_dir} --out {run_dir} --resume", exit_code=128 + int(signum))
                if stop_here:
                    stopped = "finished" if done else f"stopped after iteration {it}"
                    break
    finally:
        del batches
        logger.close()
        _restore(deterministic_before)

    summary = {"run": str(run_dir), "iteration": trainer.iteration, "elapsed_s": elapsed, "stopped": stopped,
               "best_val_mae": metrics.get("best_val_mae"), "best_iteration": metrics.get("best_iteration"),
               "last": str(run_dir / LAST), "best": str(run_dir / BEST) if (run_dir / BEST).is_file() else None,
               "digest": trainer.digest()}
    if ctx.is_main:
        best = metrics.get("best_val_mae")
        note = f"; best val MAE {best:.1f} HU at iteration {metrics['best_iteration']} ({run_dir / BEST})" if best is not None \
            else "; no paired val cases, so no validation (best model = last.pt)"
        print(f"train: {stopped} at iteration {trainer.iteration} after {elapsed / 60:.1f} min -> {run_dir / LAST}{note}")
    return summary


def _compile(trainer: CycleGANTrainer, config: Config, ctx: DistContext) -> None:
    """torch.compile the networks and compile the graphs on a dummy batch; on failure stay eager (warning)."""
    if not trainer.compile():
        return
    try:
        trainer.warm_up(_dummy_batch(config, config.train.batch_size))
    except Exception as exc:  # noqa: BLE001 - compilation problems surface at the first call
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "training runs eagerly")
        trainer.uncompile()


def _restore(deterministic: bool) -> None:
    torch.use_deterministic_algorithms(deterministic)


__all__ = ["BEST", "CONFIG", "Interrupted", "LAST", "RESUMABLE_KEYS", "check_new_run", "fit", "load_resume_state"]
