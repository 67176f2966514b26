"""Process-group setup: NCCL on GPUs, gloo on CPU, chosen automatically from what the machine has."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. dp_* are data-parallel coordinates (equal to the global ones until sequence
    parallelism splits the world into groups)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_world(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the default process group from torchrun's environment.

    A plain `python -m ...` run becomes a one-process group, so every engine sees the same world.
    backend: "auto" (nccl with CUDA, else gloo), "nccl" or "gloo".
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"process-group backend {backend!r} is not one of 'auto', 'nccl', 'gloo'")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a host sync: call it only when logging)."""
    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-reason counters summed over ranks (every rank must pass the same keys in the same order)."""
    values = torch.tensor(list(counts.values()), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1 and len(values):
        dist.all_reduce(values)
    return {k: int(v) for k, v in zip(counts, values.tolist(), strict=True)}


def agree(value: object, what: str) -> None:
    """Raise on every rank if the ranks disagree on `value` (e.g. the run directory)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ValueError(
            f"ranks disagree on the {what}: " + ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(values))
        )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
