"""Rank, world size, work-unit assignment, barrier. Without torchrun: one process, rank 0 of 1.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set) the process group starts
from the environment: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


def _env(torchrun_name: str, slurm_name: str, default: str) -> int:
    """torchrun's variable, else SLURM's (one task per GPU under srun or submitit)."""
    if torchrun_name in os.environ:
        return int(os.environ[torchrun_name])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and slurm_name in os.environ:
        return int(os.environ[slurm_name])
    return int(default)


def rank() -> int:
    return _env("RANK", "SLURM_PROCID", "0")


def world_size() -> int:
    return _env("WORLD_SIZE", "SLURM_NTASKS", "1")


def local_rank() -> int:
    return _env("LOCAL_RANK", "SLURM_LOCALID", "0")


def is_main() -> bool:
    return rank() == 0


def assign(units: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin over the work units in listing order: deterministic, disjoint, covering, and
    the slices of one large shard spread over the ranks."""
    return list(units[rank::world_size])


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    if world_size() <= 1 or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "MASTER_ADDR" not in os.environ:
        from gradcam_batch import UserError

        raise UserError(f"{world_size()} processes but MASTER_ADDR is not set; launch with torchrun "
                        "or export MASTER_ADDR (and MASTER_PORT) on every task")
    os.environ.setdefault("MASTER_PORT", "29500")
    # A long barrier timeout: ranks wait for the slowest one to finish its last unit.
    torch_dist.init_process_group(backend=backend, init_method="env://", rank=rank(), world_size=world_size(),
                                  timeout=timedelta(hours=6), **kwargs)


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [value]
    values: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, value)
    return values


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
