"""Rank, world size, work-unit assignment, barrier. Without torchrun: one process, rank 0 of 1.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set) the process group starts
from the environment: gloo on CPU; on CUDA nccl for tensors and gloo beside it for this
module's collectives, which move small Python objects and must name a rank that stalls.

Every collective waits at most runtime.dist_timeout_minutes for the other ranks. A rank that
does not arrive (stopped, hung, dead) ends the job with one line naming it, rather than
leaving the others waiting for hours.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")

# Seconds instead of runtime.dist_timeout_minutes, for tests that stall a rank on purpose.
TIMEOUT_SECONDS_ENV = "GRADCAM_BATCH_DIST_TIMEOUT_SECONDS"

# The collective timeout the process group was started with: torch has no public getter, and
# monitored_barrier otherwise falls back to torch's default rather than the group's.
_timeout: timedelta | None = None


class CollectiveTimeout(RuntimeError):
    """A rank did not arrive at a collective in time, or left the job while the others waited.
    One line, naming the rank(s) and the step; the job stops and a rerun resumes."""


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


def collective_timeout(minutes: int) -> timedelta:
    seconds = os.environ.get(TIMEOUT_SECONDS_ENV)
    return timedelta(seconds=float(seconds)) if seconds else timedelta(minutes=minutes)


def init(device: torch.device, timeout_minutes: int = 30) -> None:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    global _timeout
    if world_size() <= 1 or torch_dist.is_initialized():
        return
    # gloo beside nccl: object collectives and monitored_barrier run on the CPU backend, which
    # can name the ranks that do not arrive; nccl's watchdog would only abort the process.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "MASTER_ADDR" not in os.environ:
        from gradcam_batch import UserError

        raise UserError(f"{world_size()} processes but MASTER_ADDR is not set; launch with torchrun "
                        "or export MASTER_ADDR (and MASTER_PORT) on every task")
    os.environ.setdefault("MASTER_PORT", "29500")
    # At the end of the run, ranks wait for the slowest one to finish its last unit: the
    # timeout must cover that, and is the user's to set.
    _timeout = collective_timeout(timeout_minutes)
    torch_dist.init_process_group(backend=backend, init_method="env://", rank=rank(), world_size=world_size(),
                                  timeout=_timeout, **kwargs)


def _duration(timeout: timedelta | None) -> str:
    seconds = (timeout or timedelta(minutes=30)).total_seconds()
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _stalled(error: RuntimeError, what: str) -> CollectiveTimeout:
    """torch's error, as one line naming the rank(s) that did not arrive where it tells."""
    message = str(error)
    within = f"within {_duration(_timeout)} (runtime.dist_timeout_minutes)"
    missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    if missing:
        ranks = [r.strip() for r in missing.group(1).split(",") if r.strip()]
        who = f"rank {ranks[0]} did not" if len(ranks) == 1 else f"ranks {', '.join(ranks)} did not"
        return CollectiveTimeout(f"{who} arrive at {what} {within}: stalled, stopped or dead; "
                                 "the job stops, and a rerun resumes")
    silent = re.search(r"from rank (\d+)", message)
    if silent:
        return CollectiveTimeout(f"rank {rank()}: rank {silent.group(1)} did not answer at {what} {within}; "
                                 "its error names the rank that stalled")
    first = next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)
    first = re.sub(r"^\[[^\]]*\]:?\s*", "", first)  # gloo's "[source/file.cc:561] " prefix
    return CollectiveTimeout(f"rank {rank()}: the ranks could not meet at {what} (a rank stalled or left): "
                             f"{first[:300]}")


def barrier(what: str = "a barrier") -> None:
    """Wait for every rank; a rank missing after the timeout is named (monitored_barrier)."""
    if not torch_dist.is_initialized():
        return
    try:
        torch_dist.monitored_barrier(timeout=_timeout, wait_all_ranks=True)
    except ValueError:
        # torch releases that only monitor a gloo-only group: a plain barrier, still bounded
        # by the group's timeout
        _plain_barrier(what)
    except RuntimeError as error:
        raise _stalled(error, what) from error


def _plain_barrier(what: str) -> None:
    try:
        torch_dist.barrier()
    except RuntimeError as error:
        raise _stalled(error, what) from error


def gather(value: Any, what: str = "a collective") -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [value]
    barrier(what)  # names a rank that does not arrive; the exchange itself then finds everyone there
    values: list[Any] = [None] * torch_dist.get_world_size()
    try:
        torch_dist.all_gather_object(values, value)
    except RuntimeError as error:
        raise _stalled(error, what) from error
    return values


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
