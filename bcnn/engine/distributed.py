"""Distributed helpers: read torchrun's environment, reduce metrics, agree on a value."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, checkpoints and results."""
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as set by ``torchrun`` (or, in a
    SLURM job of several tasks, by submitit's helper)."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        try:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export()
        except ImportError:
            pass  # not a submitit job: SLURM's own variables, read below
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init() -> DistEnv:
    """Joins the process group of a distributed run (idempotent): gloo for CPU tensors
    (metrics), NCCL for CUDA ones (gradients)."""
    env = env_from_torchrun()
    if env.enabled and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        # Left to the interpreter's own teardown, the group's C++ threads can be destroyed
        # while still joinable: std::terminate, and a run that finished exits with SIGABRT.
        atexit.register(_destroy)
    return env


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all processes (returns it unchanged when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Returns rank ``src``'s ``obj`` on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Waits for every process (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
