"""Checkpoints: one file holds everything needed to resume training or convert an MRI.

A checkpoint is a ``torch.save`` dict with ``format == "medcycle-checkpoint"``, the resolved
config, the preprocessing parameters, the networks and (for resuming) optimisers, schedulers,
image pools and RNG states. Writes are atomic, so a run killed at any moment leaves the previous
checkpoint intact.

Loading never runs code a file names: ``torch.load(weights_only=True)``, which builds only tensors,
containers and plain values, plus the few numpy types of the saved numpy RNG state
(:data:`SAFE_GLOBALS`). Anything else a pickle asks for is refused in one line.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcycle.config import Config
from medcycle.errors import InputError
from medcycle.io import atomic_write

FORMAT = "medcycle-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("config", "preprocessing", "iteration", "nets")

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's array un-pickler, wherever this numpy keeps it
#: What ``torch.load(weights_only=True)`` may build besides tensors and plain values: numpy arrays and
#: dtypes (``rng.numpy``, numpy's RNG state), under the names numpy 1.x and 2.x write them.
SAFE_GLOBALS = [
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (plus the format marker) to `path` atomically."""
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    return Path(path)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or the `prefer`red (``best``, else ``last``) checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{prefer}.pt", "last.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        raise InputError(f"{path}: no checkpoint (best.pt or last.pt) in this run folder")
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a medcycle checkpoint; refuse corrupt files and foreign checkpoints."""
    path = resolve_checkpoint(path)
    state = load_weights_only(path, map_location, what="checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a medcycle checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise InputError(f"{path}: medcycle checkpoint lacks {', '.join(missing)} (preprocessing parameters are required)")
    if state.get("version", 0) > VERSION:
        raise InputError(f"{path}: written by a newer medcycle (checkpoint version {state['version']})")
    return state


def load_weights_only(path: Path, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS`: a pickle naming any other
    function or class is refused (:class:`InputError`, one line) without running it."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol of a foreign file: the error says it
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not named and "Unsupported operand" in str(exc):  # garbage, or opcodes no torch.save writes
            raise InputError(f"{path}: not a readable {what}: not a plain torch.save of tensors and values (corrupt, "
                             "or a pickle medcycle will not run)") from None
        reason = f"it names {named.group(1)}" if named else "it is not a plain torch.save of tensors and values"
        raise InputError(f"{path}: refused: loading this {what} could run code ({reason}); medcycle loads "
                         "only weights and plain values") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable {what} (corrupt or truncated?): {type(exc).__name__}") from None


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """The MR-to-CT generator of an exported model folder, a run folder or a checkpoint, in eval mode,
    with its config.

    Returns ``(generator, config, metadata)``: the model folder's metadata or the checkpoint.
    """
    from medcycle.bundle import is_model_folder, load_model_folder
    from medcycle.networks import build_generator

    if is_model_folder(path):
        return load_model_folder(path, device)
    state = load_checkpoint(path)
    config = Config.from_dict(state["config"]).validate()
    model = config.model
    generator = build_generator(config.data.context_slices, model.gen_width, model.gen_blocks)
    try:
        generator.load_state_dict(state["nets"]["G_mr2ct"])
    except (KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: generator weights do not match its config ({type(exc).__name__})") from None
    return generator.to(device).eval(), config, state
