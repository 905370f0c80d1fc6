"""Checkpoints: one file holds everything needed to resume training or convert an MRI.

A checkpoint is a ``torch.save`` dict with ``format == "medcycle-checkpoint"``, the resolved
config, the preprocessing parameters, the networks and (for resuming) optimisers, schedulers,
image pools and RNG states. Writes are atomic, so a run killed at any moment leaves the previous
checkpoint intact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medcycle.config import Config
from medcycle.errors import InputError
from medcycle.io import atomic_write

FORMAT = "medcycle-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("config", "preprocessing", "iteration", "nets")


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable checkpoint (corrupt or truncated?): {type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a medcycle checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise InputError(f"{path}: medcycle checkpoint lacks {', '.join(missing)} (preprocessing parameters are required)")
    if state.get("version", 0) > VERSION:
        raise InputError(f"{path}: written by a newer medcycle (checkpoint version {state['version']})")
    return state


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """The MR-to-CT generator of a checkpoint or run folder, in eval mode, with its config.

    Returns ``(generator, config, checkpoint)``.
    """
    from medcycle.networks import build_generator

    state = load_checkpoint(path)
    config = Config.from_dict(state["config"]).validate()
    model = config.model
    generator = build_generator(config.data.context_slices, model.gen_width, model.gen_blocks)
    try:
        generator.load_state_dict(state["nets"]["G_mr2ct"])
    except (KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: generator weights do not match its config ({type(exc).__name__})") from None
    return generator.to(device).eval(), config, state
