"""`medcycle train`: the MR <-> CT CycleGAN on a tile cache, into a run folder.

::

    medcycle train --config configs/demo_cpu.yaml --data CACHE --out RUN [--max-iters N] [--resume]
                   [--device auto|cpu|cuda|cuda:N|mps] [--quiet] [--set key=value ...]
    torchrun --nproc_per_node=N -m medcycle train ...        # DDP: gloo on CPU, nccl on CUDA

The run folder gets ``config.yaml`` (the resolved config), ``last.pt`` (every
``train.checkpoint_every`` iterations, at the end and on SIGINT/SIGTERM), ``best.pt`` (lowest
validation MAE; only with paired ``val`` cases in the cache), ``losses.csv``, ``validation.csv``,
``tensorboard/`` and ``images/iter_XXXXXX.png``. The loop itself is :func:`medcycle.engine.loop.fit`
(schedule, wall-clock budget, determinism and signals are described there).

* ``--max-iters N`` sets ``train.iterations`` (the run length the lr schedule follows);
* ``--resume`` continues ``RUN/last.pt`` exactly; without ``--config`` the run's own ``config.yaml``
  is used (plus ``--set``). Only ``train.iterations``, ``train.max_minutes``, ``train.workers`` and
  the logging/checkpoint intervals may change on resume;
* a new run into a folder holding ``last.pt`` is refused (use ``--resume`` or another ``--out``).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from medcycle.config import Config, resolve_config
from medcycle.errors import InputError, MedcycleError, UsageError

CONFIG = "config.yaml"


def run_config(config: Any, overrides: Sequence[str], out: Path, resume: bool, max_iters: Optional[int]) -> Config:
    """The run's config: `config` (Config, path, built-in name or None) with `overrides`; on resume
    without a config the run's own ``config.yaml``; ``max_iters`` replaces ``train.iterations``."""
    overrides = list(overrides or ())
    if max_iters is not None:
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise UsageError(f"--max-iters must be an integer >= 1, got {max_iters!r}")
        overrides.append(f"train.iterations={max_iters}")
    if config is None and resume and (out / CONFIG).is_file():
        config = out / CONFIG
    return resolve_config(config, overrides)


def run(config: Any = None, data: Optional[str | os.PathLike] = None, out: Optional[str | os.PathLike] = None,
        overrides: Sequence[str] = (), max_iters: Optional[int] = None, resume: bool = False,
        device: Optional[str] = None, stop_after: Optional[int] = None, quiet: bool = False) -> dict[str, Any]:
    """Train into `out` on the cache `data`; returns a summary (``run``, ``iteration``, ``elapsed_s``,
    ``stopped``, ``best_val_mae``, ``last``, ``best``, ``digest`` of the weights), also printed in one line.

    `device`: :func:`medcycle.device.resolve_device` (default ``auto``); `quiet`: no progress bar.
    `stop_after` ends the session after that iteration without changing the schedule (tests, benchmarks).
    """
    from medcycle.engine import distributed
    from medcycle.engine.loop import fit

    if data is None or out is None:
        raise UsageError("train needs --data CACHE and --out RUN")
    out = Path(out)
    cfg = run_config(config, overrides, out, resume, max_iters)
    ctx = distributed.setup(device)
    try:
        with _one_line_errors(cfg):
            return fit(cfg, Path(data), out, ctx, resume=resume, stop_after=stop_after, quiet=quiet)
    except MedcycleError as exc:
        if ctx.rank > 0:  # rank 0 reports; the others leave quietly with the same exit code
            raise SystemExit(exc.exit_code) from None
        raise
    finally:
        ctx.close()


@contextlib.contextmanager
def _one_line_errors(config: Config) -> Iterator[None]:
    """Turn the machine's refusals (no memory, a file that cannot be read or written) into one-line errors."""
    try:
        yield
    except OSError as exc:  # a read-only or full --out, a cache file that cannot be read
        raise InputError(f"{exc.filename or 'train'}: {exc.strerror or exc}") from None
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        m, d, t = config.model, config.data, config.train
        asked = re.search(r"tried to allocate (\d+) bytes", str(exc))
        size = f" (one allocation of {int(asked.group(1)) / 2**30:.1f} GiB)" if asked else ""
        raise UsageError(f"out of memory{size}: the networks of model.gen_width={m.gen_width}, model.gen_blocks="
                         f"{m.gen_blocks}, model.disc_width={m.disc_width} on {d.tile_size}-px tiles, batch "
                         f"{t.batch_size}, do not fit; lower them") from None


def _out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure of torch (CPU or CUDA) or Python."""
    import torch

    text = str(exc)
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "not enough memory" in text


__all__ = ["run", "run_config"]
