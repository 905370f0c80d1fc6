"""What the commands show while they run: progress bars, step notes and the one summary line.

* Progress bars (tqdm) go to stderr. On a terminal they redraw in place; into a file or a pipe (a log)
  they write a plain line at most every ``LOG_INTERVAL_S`` seconds and at the end, instead of a redraw
  every second that fills a log with carriage returns.
* ``quiet`` (``--quiet``): no bars and no step notes; warnings, errors and the summary line remain.
* Every successful command ends with one line on stdout, ``medcycle COMMAND: ...``: what was written
  where, how many cases, how long (:func:`summary`).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, Sequence, TextIO

#: seconds between two progress lines when stderr is not a terminal
LOG_INTERVAL_S = 60.0


class _Lines:
    """A stream for tqdm that turns its in-place redraws (``\\r`` + status) into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:  # closing a bar draws its last state again
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable: Optional[Iterable[Any]] = None, *, desc: str, unit: str, total: Optional[int] = None,
             initial: int = 0, quiet: bool = False, **options: Any) -> Any:
    """A tqdm bar on stderr (none when `quiet`): in place on a terminal, plain lines in a log."""
    from tqdm import tqdm

    stream = sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, file=stream, dynamic_ncols=True,
                    disable=quiet, **options)
    # maxinterval: tqdm's monitor thread would also redraw a bar whose count has not moved
    options.update(mininterval=LOG_INTERVAL_S, maxinterval=float("inf"))
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, file=_Lines(stream), ncols=80,
                disable=quiet, **options)


def note(text: str, quiet: bool = False) -> None:
    """A step note on stdout (what a command is doing now), unless `quiet`."""
    if not quiet:
        print(text, flush=True)


def summary(command: str, text: str) -> str:
    """Print and return the one summary line of a successful `command`: ``medcycle COMMAND: TEXT``."""
    line = f"medcycle {command}: {text}"
    print(line, flush=True)
    return line


def seconds(elapsed: float) -> str:
    """A duration as the summary lines give it: ``12.3 s``, ``4.2 min``."""
    return f"{elapsed:.1f} s" if elapsed < 120 else f"{elapsed / 60:.1f} min"


def grid(shape: Sequence[int], spacing: Sequence[float]) -> str:
    """A voxel grid as the summary lines give it: ``256x256x160, 1.00x1.00x2.50 mm``."""
    return f"{'x'.join(str(int(s)) for s in shape)}, {'x'.join(f'{float(s):.2f}' for s in spacing)} mm"


__all__ = ["LOG_INTERVAL_S", "grid", "note", "progress", "seconds", "summary"]
