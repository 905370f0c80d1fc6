"""Process-group setup for ``torchrun`` and the few collectives the training loop needs.

``torchrun --nproc_per_node=N -m medcycle train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` then initialises ``torch.distributed`` from them
(gloo on CPU, nccl on CUDA, one GPU per process). Without them (``WORLD_SIZE`` unset or 1) every
helper is a no-op and the run is a plain single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch

from medcycle.device import resolve_device
from medcycle.errors import UsageError


@dataclass
class DistContext:
    """Where this process runs and who it is in the process group."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # initialised here, so destroyed by close()
    _group_ready: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, images and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def agree_max(self, *values: float) -> list[float]:
        """The maximum of each value over all ranks (floats; flags as 0/1)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.cpu().tolist()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over all ranks."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        tensor = tensor.detach().to(self._collective_device, torch.float64).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor / self.world

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (a list in rank order) on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        """Destroy the process group when :func:`setup` created it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def _import_before_group() -> None:
    """Import what DistributedDataParallel imports lazily, before the process group exists.

    DDP's first use imports ``torch._dynamo``, which imports ``torch.distributed.nn.functional``, whose
    functions take ``group=group.WORLD`` as a default argument: imported while a group exists, they keep
    it alive for good. ``destroy_process_group()`` then leaves the group's gloo threads running until the
    interpreter exits, where one of them may free the last tensor of a collective, needs the GIL, is
    ended by the finalising interpreter inside a C++ destructor and aborts the process ("terminate called
    without an active exception", SIGABRT): a rank that finished its work then fails at random.
    """
    import torch._dynamo  # noqa: F401


def setup(device: Optional[str] = None) -> DistContext:
    """The device (:func:`medcycle.device.resolve_device`) and, under torchrun, the process group.

    Under torchrun each process takes the GPU of its ``LOCAL_RANK``, so only ``cuda`` (or ``auto``) names
    the GPUs there; ``cuda:N`` and ``mps`` are for a single process.
    """
    dev = resolve_device(device)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world > 1 and (dev.index is not None or dev.type == "mps"):
        raise UsageError(f"--device {device or 'auto'}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                         "give --device cuda or cpu")
    if dev.type == "cuda":
        if world > 1 and local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices on this machine")
        index = local_rank if world > 1 else dev.index
        if index is not None:
            torch.cuda.set_device(index)
        dev = torch.device("cuda", torch.cuda.current_device())
    ctx = DistContext(device=dev, rank=rank, world=world, local_rank=local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            _import_before_group()
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                    device_id=dev if dev.type == "cuda" else None)
            ctx.owns_group = True
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
    return ctx


__all__ = ["DistContext", "setup"]
