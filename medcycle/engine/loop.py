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

Divergence: a non-finite loss (or non-finite weights when a checkpoint is due) stops the run with
:class:`Diverged`; checkpoints are never written with non-finite weights, so ``last.pt`` keeps the last
good state.

Signals: SIGINT / SIGTERM set a flag; the current iteration finishes, ``last.pt`` is written and
:class:`Interrupted` (exit code 128 + signal) tells how to resume. A second Ctrl-C aborts at once.
In DDP the flag, the wall clock and the end of the run are agreed through an all-reduce every
iteration, so all ranks stop at the same iteration.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from medcycle import console
from medcycle.checkpoint import load_checkpoint, save_checkpoint
from medcycle.config import Config, save_config
from medcycle.data.cache import MANIFEST, load_manifest
from medcycle.data.dataset import (
    EpochSampler,
    TileDataset,
    cases_fingerprint,
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
from medcycle.files import file_checksum
from medcycle.transforms.body_part import trained_anatomy

LAST, BEST, CONFIG = "last.pt", "best.pt", "config.yaml"
#: config keys that may change when a run is resumed (they change neither the model nor the data)
RESUMABLE_KEYS = ("train.iterations", "train.max_minutes", "train.log_every", "train.image_every",
                  "train.val_every", "train.checkpoint_every", "train.workers")
PREVIEW_TILES = 4


class Interrupted(MedcycleError):
    """Training stopped by a signal after saving ``last.pt``."""


class Diverged(MedcycleError):
    """Training stopped on a non-finite loss or weights; ``last.pt`` keeps the last good state."""


def _flat_value(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def check_run_dir(run_dir: Path, cache_dir: Path) -> None:
    """Refuse a run folder inside the cache (the cache is an input: nothing is written into it)."""
    run, cache = run_dir.resolve(), cache_dir.resolve()
    if run == cache or cache in run.parents:
        raise UsageError(f"--out {run_dir}: inside the cache folder {cache_dir}; write the run to a folder outside it")


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
    trained_cases = state["preprocessing"].get("cases_hash")  # absent in runs of medcycle 0.1: not checked
    if trained_cases is not None and trained_cases != cases_fingerprint(cache_dir, manifest):
        raise InputError(f"{cache_dir}: holds other cases than the cache this run was trained on (same data config, other "
                         "case list or sources); resume with the original cache or use another --out")
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
        stop_after: Optional[int] = None, quiet: bool = False) -> dict[str, Any]:
    """Train `config` on the cache `cache_dir` into `run_dir` (see the module docstring); returns a summary,
    which rank 0 also prints in one line. `quiet`: no progress bar.

    `stop_after` ends this session after that iteration as if interrupted cleanly (the schedule still
    follows ``train.iterations``): for tests and benchmarks.
    """
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        session = _Session(config, Path(cache_dir), Path(run_dir), ctx, resume, quiet)
        with contextlib.closing(session.logger):
            stopped = "already finished" if session.finished() else session.train(stop_after)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
    return session.summary(stopped)


class _LossWindow:
    """Sums of the losses since the last ``losses.csv`` row, and the iteration rate over them."""

    def __init__(self, iteration: int) -> None:
        self.reset(iteration)

    def reset(self, iteration: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.since, self.started = 0, iteration, time.perf_counter()

    def add(self, losses: Mapping[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.count += 1

    def means(self, names: Any) -> torch.Tensor:
        return torch.stack([self.sums.get(n, torch.zeros(())).detach().cpu().double() for n in names]) / self.count

    def rate(self, iteration: int) -> float:
        """Iterations per second since the window started."""
        return (iteration - self.since) / max(time.perf_counter() - self.started, 1e-9)


@dataclass
class _Tick:
    """Where the run stands after an iteration, as every rank agrees."""

    iteration: int
    elapsed: float  # training seconds over all sessions of the run
    progress: float  # in [0, 1]: what the lr schedule follows
    signum: int  # a signal received by any rank, else 0
    diverged: bool  # a loss of some rank is not finite
    done: bool  # the run's end: its iterations or its wall-clock budget
    stop: bool  # this session ends here (done, or `stop_after` reached)


class _Session:
    """One session of a training run: set up (new or resumed), trained step by step, summarised."""

    def __init__(self, config: Config, cache_dir: Path, run_dir: Path, ctx: DistContext, resume: bool,
                 quiet: bool = False) -> None:
        self.config, self.cache_dir, self.run_dir, self.ctx = config, cache_dir, run_dir, ctx
        train = config.train
        self.manifest = load_manifest(cache_dir)
        check_data_config(self.manifest, config.to_dict()["data"], cache_dir)
        check_run_dir(run_dir, cache_dir)
        state = load_resume_state(run_dir, config, self.manifest, cache_dir) if resume else None
        if state is None:
            check_new_run(run_dir)

        seed_everything(train.seed, train.deterministic)
        self.dataset = TileDataset(cache_dir, self.manifest, "train", config.loss.pairing, train.augment, train.seed,
                                   train.mr_gamma)
        self.sampler = EpochSampler(len(self.dataset), train.seed, train.batch_size, ctx.rank, ctx.world)
        self.trainer = CycleGANTrainer(config, ctx.device)
        self.metrics: dict[str, Any] = {"best_val_mae": None, "best_iteration": None, "history": []}
        self.base_elapsed = 0.0
        self.bad_loss: Optional[str] = None  # the first non-finite loss of the last step, as "name=value"
        if state is not None:
            self._restore(state)
        if train.compile:
            _compile(self.trainer, config)
        if state is not None:
            set_rng_state(state["rng"])  # last: nothing after this draws from the global generators

        self.val_tiles = validation_tiles(cache_dir, self.manifest, train.val_max_tiles) if ctx.is_main else None
        self.preview = preview_tiles(cache_dir, self.manifest, PREVIEW_TILES) if ctx.is_main else None
        self.preprocessing = {"data_config": self.manifest["data_config"], "data_config_hash": self.manifest["data_config_hash"],
                              "cases_hash": cases_fingerprint(cache_dir, self.manifest),
                              "manifest_sha256": file_checksum(Path(cache_dir) / MANIFEST),  # provenance of exports
                              "anatomy": trained_anatomy(self.manifest["cases"])}  # convert refuses other body parts
        if ctx.is_main:
            self._prepare_run_dir()
        self.budget = train.max_minutes * 60.0 if train.max_minutes else None
        self.start = self.trainer.iteration
        self.saved = self.start if state is not None else None  # iteration of the run's last.pt
        self.elapsed = self.base_elapsed
        self.sampler_state = {"epoch": self.sampler.epoch, "position": self.sampler.position}
        self.logger = RunLogger(run_dir, ctx.is_main, self.trainer.loss_names, self.start, train.iterations,
                                resumed=state is not None, budget_s=self.budget, quiet=quiet)

    # ----------------------------------------------------------------------------------------------
    # set-up

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Continue `state` (``last.pt``): sampler position, weights, optimisers, pools, metrics, clock."""
        ctx, train = self.ctx, self.config.train
        self.sampler.epoch, self.sampler.position = resumed_position(state["sampler"], ctx.world, train.batch_size,
                                                                     self.sampler.per_rank)
        if int(state.get("world_size", 1)) != ctx.world and ctx.is_main:
            warnings.warn(f"resuming a run of {state.get('world_size', 1)} processes with {ctx.world}: the data order and "
                          "image pools continue approximately, not exactly")
        pools = state["pools"]
        if ctx.rank > 0:
            others = state.get("rank_pools") or []
            pools = others[ctx.rank - 1] if len(others) >= ctx.rank else {}
        self.trainer.load_state_dict(state, pools=pools, restore_rng=False)
        self.metrics = dict(state.get("metrics") or self.metrics)
        self.base_elapsed = float(state.get("elapsed", 0.0))

    def _prepare_run_dir(self) -> None:
        """Create the run folder, drop temporary files of a killed run, write the resolved config."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(".tmp-*"):  # left by a run killed while writing (writes are atomic)
            if stale.is_file():
                stale.unlink(missing_ok=True)
        save_config(self.config, self.run_dir / CONFIG)
        if self.config.loss.pairing == "hybrid" and not self.dataset.paired_cases:
            warnings.warn(f"{self.cache_dir}: loss.pairing=hybrid but no training case is paired: the paired terms stay 0")

    def _loader(self) -> torch.utils.data.DataLoader:
        train = self.config.train
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=train.batch_size, sampler=self.sampler, num_workers=train.workers,
            pin_memory=self.ctx.device.type == "cuda", worker_init_fn=worker_init if train.workers else None,
            generator=torch.Generator().manual_seed(train.seed), prefetch_factor=2 if train.workers else None,
        )

    # ----------------------------------------------------------------------------------------------
    # run length and schedule

    def progress(self, iteration: int, elapsed: float) -> float:
        """Iterations done, or the budget spent if further (not in deterministic mode), as a fraction."""
        train = self.config.train
        p = iteration / train.iterations
        if self.budget and not train.deterministic:
            p = max(p, elapsed / self.budget)
        return min(1.0, p)

    def finished(self) -> bool:
        """True when the run already reached its end in an earlier session (nothing to train)."""
        return self.progress(self.start, self.elapsed) >= 1.0 or bool(self.budget and self.elapsed >= self.budget)

    # ----------------------------------------------------------------------------------------------
    # training

    def train(self, stop_after: Optional[int]) -> str:
        """Iterate until the run ends, `stop_after` or a signal (:class:`Interrupted`); returns how it stopped."""
        losses = _LossWindow(self.start)
        batches: Iterator[Any] = iter(self._loader())
        t0 = time.perf_counter()
        if self.ctx.distributed:
            self.trainer.wrap_ddp()  # only around the loop: released before the process group goes
        try:
            with _Signals() as signals:
                while True:
                    tick = self._step(next(batches), signals, t0, stop_after, losses)
                    self._after_step(tick, losses)
                    if tick.stop:
                        return "finished" if tick.done else f"stopped after iteration {tick.iteration}"
        finally:
            del batches  # stop the DataLoader's workers now
            self.trainer.release_ddp()

    def _step(self, batch: Mapping[str, Any], signals: _Signals, t0: float, stop_after: Optional[int],
              losses: _LossWindow) -> _Tick:
        """One optimisation step, then the ranks agree on the signal and the clock and the lr follows."""
        trainer = self.trainer
        trainer.set_input(batch)
        step_losses = trainer.optimize_parameters()
        losses.add(step_losses)
        it = trainer.iteration
        self.sampler_state = self.sampler.after(int(batch["epoch"][-1]), int(batch["position"][-1]))
        self.bad_loss = next((f"{name}={float(v)}" for name, v in step_losses.items() if not torch.isfinite(v)), None)
        signum, self.elapsed, diverged = self.ctx.agree_max(float(signals.signum), self.base_elapsed + time.perf_counter() - t0,
                                                            float(self.bad_loss is not None))
        progress = self.progress(it, self.elapsed)
        trainer.set_progress(progress)
        self.logger.step()
        done = progress >= 1.0 or bool(self.budget and self.elapsed >= self.budget)
        return _Tick(it, self.elapsed, progress, int(signum), bool(diverged), done,
                     done or bool(stop_after and it >= stop_after))

    def _after_step(self, tick: _Tick, losses: _LossWindow) -> None:
        """Logs, validation, preview sheet and checkpoints due at `tick`; :class:`Interrupted` on a signal."""
        train, it, main = self.config.train, tick.iteration, self.ctx.is_main
        if tick.diverged:
            self._diverged(it, f"a non-finite loss ({self.bad_loss or 'on another process'})")
        if it % train.log_every == 0 or tick.stop or tick.signum:
            self._log_losses(tick, losses)
        if main and self.val_tiles is not None and (it % train.val_every == 0 or tick.stop):
            self._validate(tick)
        if main and (it % train.image_every == 0 or tick.stop):
            self.logger.image_sheet(it, self.trainer.sheet_columns(self.preview))
        if it % train.checkpoint_every == 0 or tick.stop or tick.signum:
            self._save(LAST)
        if tick.signum:
            name = signal.Signals(tick.signum).name
            raise Interrupted(f"stopped by {name} at iteration {it}; saved {self.run_dir / LAST}; continue with: medcycle "
                              f"train --data {self.cache_dir} --out {self.run_dir} --resume", exit_code=128 + tick.signum)

    def _log_losses(self, tick: _Tick, losses: _LossWindow) -> None:
        """A ``losses.csv`` row: the mean of each loss over the ranks and the iterations since the last row."""
        names = self.trainer.loss_names
        means = self.ctx.mean(losses.means(names))  # collective
        rate = losses.rate(tick.iteration)
        self.logger.log_losses(tick.iteration, tick.elapsed, self.trainer.lr, rate, dict(zip(names, means.tolist())),
                               tick.progress)
        losses.reset(tick.iteration)

    def _validate(self, tick: _Tick) -> None:
        """Validation MAE of the val tiles; a new best is recorded and saved as ``best.pt`` (rank 0)."""
        it, metrics = tick.iteration, self.metrics
        result = self.trainer.validate(self.val_tiles)
        best = metrics.get("best_val_mae")
        improved = math.isfinite(result["mae"]) and (best is None or result["mae"] < best)
        if improved:
            metrics["best_val_mae"], metrics["best_iteration"] = result["mae"], it
        metrics["history"] = [*metrics.get("history", []), {"iteration": it, **result}]
        self.logger.log_validation(it, tick.elapsed, result, improved)
        if improved:
            self._save(BEST, gather=False)

    def _save(self, name: str, gather: bool = True) -> None:
        """Write checkpoint `name` from rank 0; with `gather` (a collective) it holds every rank's image pools.

        Weights that are not finite are never written (:class:`Diverged`)."""
        ctx, train = self.ctx, self.config.train
        finite = self.trainer.weights_finite()
        if gather and ctx.distributed:
            finite = not ctx.agree_max(float(not finite))[0]  # every rank stops, or none
        if not finite:
            self._diverged(self.trainer.iteration, "non-finite weights")
        state = self.trainer.state_dict()
        pools = ctx.gather(state["pools"]) if gather and ctx.distributed else None
        if not ctx.is_main:
            return
        state.update(config=self.config.to_dict(), preprocessing=self.preprocessing, elapsed=float(self.elapsed),
                     sampler={**self.sampler_state, "world_size": ctx.world, "batch_size": train.batch_size},
                     metrics=self.metrics, world_size=ctx.world)
        if pools is not None:
            state["rank_pools"] = pools[1:]
        save_checkpoint(self.run_dir / name, state)
        if name == LAST:
            self.saved = self.trainer.iteration

    def _diverged(self, iteration: int, what: str) -> None:
        """Stop with :class:`Diverged`, saying what the run folder still holds."""
        kept = f"{self.run_dir / LAST} keeps iteration {self.saved}" if self.saved is not None else "no checkpoint was written"
        raise Diverged(f"training diverged at iteration {iteration}: {what}; {kept}; lower train.lr (now "
                       f"{self.config.train.lr:g}) or check the cache")

    # ----------------------------------------------------------------------------------------------
    # the end

    def summary(self, stopped: str) -> dict[str, Any]:
        """What the session did (returned by :func:`fit`); rank 0 prints it in one line."""
        trainer, metrics, run_dir = self.trainer, self.metrics, self.run_dir
        if stopped == "already finished":
            if self.ctx.is_main:
                console.summary("train", f"{run_dir} already finished at iteration {self.start}; raise train.iterations "
                                         "(--max-iters) or train.max_minutes to continue")
            return {"run": str(run_dir), "iteration": self.start, "elapsed_s": self.elapsed, "stopped": stopped,
                    "best_val_mae": metrics.get("best_val_mae"), "digest": trainer.digest()}
        summary = {"run": str(run_dir), "iteration": trainer.iteration, "elapsed_s": self.elapsed, "stopped": stopped,
                   "best_val_mae": metrics.get("best_val_mae"), "best_iteration": metrics.get("best_iteration"),
                   "last": str(run_dir / LAST), "best": str(run_dir / BEST) if (run_dir / BEST).is_file() else None,
                   "digest": trainer.digest()}
        if self.ctx.is_main:
            best = metrics.get("best_val_mae")
            note = f"; best val MAE {best:.1f} HU at iteration {metrics['best_iteration']} ({run_dir / BEST})" \
                if best is not None else "; no paired val cases, so no validation (best model = last.pt)"
            console.summary("train", f"{stopped} at iteration {trainer.iteration} on {self.ctx.device} after "
                                     f"{console.seconds(self.elapsed)} -> {run_dir / LAST}{note}")
        return summary


def _compile(trainer: CycleGANTrainer, config: Config) -> None:
    """torch.compile the networks and compile the graphs on a dummy batch; on failure stay eager (warning)."""
    if not trainer.compile():
        return
    try:
        trainer.warm_up(_dummy_batch(config, config.train.batch_size))
    except Exception as exc:  # noqa: BLE001 - compilation problems surface at the first call
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "training runs eagerly")
        trainer.uncompile()


__all__ = ["BEST", "CONFIG", "Diverged", "Interrupted", "LAST", "RESUMABLE_KEYS", "check_new_run", "check_run_dir", "fit",
           "load_resume_state"]
