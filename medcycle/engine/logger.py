"""What a training run writes besides checkpoints: CSV logs, TensorBoard events, the progress bar, image sheets.

Only rank 0 creates a :class:`RunLogger` with ``enabled=True``; on the other ranks every method is a
no-op. On resume the CSV files keep their rows up to the resumed iteration (rows written after the
last checkpoint by the interrupted run are dropped) and TensorBoard purges its later events.
"""
from __future__ import annotations

import csv
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

LOSSES_CSV = "losses.csv"
VALIDATION_CSV = "validation.csv"
TENSORBOARD = "tensorboard"
IMAGES = "images"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class _CsvLog:
    """An append-only CSV with a fixed header; rows with an iteration past `keep_until` are dropped."""

    def __init__(self, path: Path, header: Sequence[str], keep_until: Optional[int]) -> None:
        self.path, self.header = path, list(header)
        rows: list[list[str]] = []
        if keep_until is not None and path.is_file():
            with open(path, newline="") as handle:
                old = list(csv.reader(handle))
            if old and old[0] == self.header:
                rows = [r for r in old[1:] if r and r[0].isdigit() and int(r[0]) <= keep_until]
        from medcycle.io import atomic_write

        with atomic_write(path) as tmp:
            with open(tmp, "w", newline="") as handle:
                csv.writer(handle).writerows([self.header, *rows])
        self._handle = open(path, "a", newline="")
        self._writer = csv.writer(self._handle)

    def write(self, values: Mapping[str, Any]) -> None:
        self._writer.writerow([_fmt(values.get(name, "")) for name in self.header])
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class RunLogger:
    """CSV files, TensorBoard and the progress bar (none when `quiet`) of one run (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, loss_names: Sequence[str], start: int, total: int,
                 resumed: bool, budget_s: Optional[float] = None, quiet: bool = False) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.budget_s = budget_s
        self.iterations = total
        self.val_mae: Optional[float] = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        from medcycle.console import progress

        keep = start if resumed else None
        self.losses = _CsvLog(self.run_dir / LOSSES_CSV, ["iteration", "elapsed_s", "lr", "it_per_s", *loss_names], keep)
        self.validation = _CsvLog(self.run_dir / VALIDATION_CSV, ["iteration", "elapsed_s", "mae", "mae_bone", "psnr",
                                                                   "ssim", "tiles", "best"], keep)
        self.tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD), purge_step=start + 1 if resumed else None)
        self.bar = progress(total=total, initial=start, desc="train", unit="it", quiet=quiet, mininterval=1.0,
                            smoothing=0.05)

    def step(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def log_losses(self, iteration: int, elapsed: float, lr: float, rate: float, losses: Mapping[str, float],
                   progress: float) -> None:
        """A losses.csv row, TensorBoard scalars and the bar's postfix."""
        if not self.enabled:
            return
        self.losses.write({"iteration": iteration, "elapsed_s": round(elapsed, 2), "lr": lr, "it_per_s": rate, **losses})
        for name, value in losses.items():
            self.tb.add_scalar(f"loss/{name}", value, iteration)
        self.tb.add_scalar("train/lr", lr, iteration)
        self.tb.add_scalar("train/it_per_s", rate, iteration)
        postfix = {"G": f"{losses.get('G', float('nan')):.3f}"}
        if "D_ct" in losses:
            postfix["D"] = f"{losses['D_ct'] + losses['D_mr']:.3f}"
        if "cycle_mr" in losses:
            postfix["cyc"] = f"{losses['cycle_mr'] + losses['cycle_ct']:.3f}"
        if self.val_mae is not None:
            postfix["val_MAE"] = f"{self.val_mae:.1f}"
        if self.budget_s and progress > 0:  # the wall clock may end the run first: the bar's total (and ETA) follow
            self.bar.total = max(iteration, min(self.iterations, int(round(iteration / progress))))
        self.bar.set_postfix(postfix, refresh=False)

    def log_validation(self, iteration: int, elapsed: float, metrics: Mapping[str, float], best: bool) -> None:
        if not self.enabled:
            return
        self.val_mae = metrics["mae"]
        self.validation.write({"iteration": iteration, "elapsed_s": round(elapsed, 2), **metrics, "best": int(best)})
        for key in ("mae", "mae_bone", "psnr", "ssim"):
            self.tb.add_scalar(f"val/{key}", metrics[key], iteration)

    def image_sheet(self, iteration: int, columns: Mapping[str, Any]) -> Optional[Path]:
        """``images/iter_XXXXXX.png`` through :func:`medcycle.visualize.training_sheet` (skipped with a warning if unavailable)."""
        if not self.enabled:
            return None
        try:
            from medcycle.visualize import training_sheet
        except ImportError as exc:
            warnings.warn(f"no training images: medcycle.visualize unavailable ({exc})")
            return None
        path = self.run_dir / IMAGES / f"iter_{iteration:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        training_sheet(path, dict(columns), title=f"iteration {iteration}")
        return path

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.budget_s:
            self.bar.total = self.bar.n
        self.bar.close()
        self.losses.close()
        self.validation.close()
        self.tb.close()


__all__ = ["IMAGES", "LOSSES_CSV", "RunLogger", "TENSORBOARD", "VALIDATION_CSV"]
