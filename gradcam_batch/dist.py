"""Rank, world size and shard assignment. Without torchrun: one process, rank 0 of 1."""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def assign(shards: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin over the sorted shard list: deterministic, disjoint, covering."""
    return list(shards[rank::world_size])
