"""Process-group setup: one group that carries CPU tensors over gloo and, on GPUs, CUDA tensors over NCCL.

Which collective runs where follows from the tensor's device, never from a copy made to please a backend:
host-side values (skip counters, the stop flag, the sequence-parallel guard's hashes, picklable objects, barriers)
are CPU tensors and go over gloo; training tensors (ZeRO-3's gathers and reductions, Ulysses' all-to-alls, the
logged loss) stay on the GPU and go over NCCL. On a CPU-only machine both kinds run on gloo.

With sequence parallelism (`parallel.sp_size` = S) the world of N ranks is N / S data-parallel groups of S
consecutive ranks (consecutive: on one node, where the all-to-alls are fast). Every rank of a sequence-parallel
group reads the same batch; ZeRO-3 still shards and averages over all N ranks.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger("kiln.dist")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, and its data-parallel (dp_*) and sequence-parallel (sp_*)
    coordinates. Rank r is sequence-parallel rank r % sp_size of data-parallel rank r // sp_size."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp_size: int = 1
    sp_group: dist.ProcessGroup | None = None  # this rank's sequence-parallel group; None when sp_size == 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_world(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_sp_size(sp_size: int, world_size: int) -> None:
    """A ValueError naming the valid sizes unless `sp_size` divides the world."""
    if sp_size < 1 or world_size % sp_size:
        valid = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"parallel.sp_size={sp_size} does not divide the world size {world_size}: "
            f"the sequence-parallel groups must tile the ranks (valid sizes: {valid})"
        )


_SP_GROUPS: dict[int, dist.ProcessGroup | None] = {}
_TIMEOUT: list[timedelta | None] = [None]  # the process-group timeout init_distributed was given (None: torch's)


def sequence_group(sp_size: int) -> dist.ProcessGroup | None:
    """This rank's group of `sp_size` consecutive ranks (None for 1). Created on first call, which every rank
    must make (creating a group is a collective over the world)."""
    if sp_size == 1:
        return None
    if sp_size not in _SP_GROUPS:
        rank, world = dist.get_rank(), dist.get_world_size()
        check_sp_size(sp_size, world)
        for first in range(0, world, sp_size):
            group = dist.new_group(list(range(first, first + sp_size)), timeout=_TIMEOUT[0])
            if first <= rank < first + sp_size:
                _SP_GROUPS[sp_size] = group
    return _SP_GROUPS[sp_size]


CPU_AND_CUDA = "cpu:gloo,cuda:nccl"  # CPU tensors over gloo, CUDA tensors over NCCL, in one process group
BACKENDS = ("auto", "gloo", CPU_AND_CUDA)


def resolve_backend(backend: str, cuda: bool) -> str:
    """The process-group backend string for `dist_backend`: "auto" is CPU_AND_CUDA with CUDA, else "gloo".

    NCCL alone is refused: it has no CPU backend, and Kiln's host-side collectives (counters, the stop flag,
    object gathers) would fail at their first call ("No backend type associated with device type cpu").
    """
    if backend == "auto":
        return CPU_AND_CUDA if cuda else "gloo"
    if backend == "nccl":
        raise ValueError(
            f"dist_backend='nccl' cannot carry the CPU tensors of Kiln's host-side collectives; use 'auto' or "
            f"{CPU_AND_CUDA!r} (NCCL for CUDA tensors, gloo for CPU ones)"
        )
    if backend not in BACKENDS:
        raise ValueError(f"dist_backend={backend!r} is not one of {BACKENDS}")
    if backend == CPU_AND_CUDA and not cuda:
        raise ValueError(f"dist_backend={backend!r} needs CUDA, and torch sees no CUDA device: use 'auto' or 'gloo'")
    return backend


def real_time_policy() -> str | None:
    """A description of this thread's real-time scheduling policy (SCHED_FIFO or SCHED_RR, inherited from the
    process that started it), or None under the normal policies. Seen in practice: SVT-AV1, PyAV's AV1 encoder,
    run as root moves the encoding thread to SCHED_FIFO 99, and every process it starts after inherits it."""
    names = {getattr(os, name): name for name in ("SCHED_FIFO", "SCHED_RR") if hasattr(os, name)}
    if not hasattr(os, "sched_getscheduler") or (policy := os.sched_getscheduler(0)) not in names:
        return None
    return f"{names[policy]} priority {os.sched_getparam(0).sched_priority}"


def init_distributed(backend: str = "auto", sp_size: int = 1, timeout_s: float | None = None) -> DistInfo:
    """Join (or create) the default process group from torchrun's environment, and the sequence-parallel groups.

    A plain `python -m ...` run becomes a one-process group, so every engine sees the same world.
    backend: one of BACKENDS (see `resolve_backend`). sp_size: ranks per sequence-parallel group.
    timeout_s: how long a collective may wait for the other ranks before it fails (gloo raises, NCCL's watchdog
    aborts the process); None keeps torch's default (30 min for gloo, 10 for NCCL).
    """
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"dist_timeout_s must be > 0 seconds, got {timeout_s}")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = resolve_backend(backend, torch.cuda.is_available())
    check_sp_size(sp_size, world)
    if backend == CPU_AND_CUDA:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        _TIMEOUT[0] = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=_TIMEOUT[0])
        if rank == 0:
            log.info("process group %s over %d rank(s), timeout %s", backend, world, _TIMEOUT[0] or "torch's default")
        if world > 1 and (policy := real_time_policy()):
            log.warning(
                "rank %d runs at real-time scheduling (%s, inherited from the process that started it): a rank "
                "busy-polling in a collective then holds its core, and on a machine with fewer cores than such "
                "threads the ranks it waits for may never run; start the job with `chrt --other 0 ...`",
                rank, policy,
            )  # fmt: skip
    group = sequence_group(sp_size)
    return DistInfo(rank, world, local_rank, device, sp_size=sp_size, sp_group=group)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a host sync: call it only when logging)."""
    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-reason counters summed over ranks (every rank must pass the same keys in the same order). A host
    value: the CPU tensor goes over gloo whatever the training device."""
    values = torch.tensor(list(counts.values()), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1 and len(values):
        dist.all_reduce(values)
    return {k: int(v) for k, v in zip(counts, values.tolist(), strict=True)}


def all_gather_objects(value: object) -> list:
    """`value` from every rank, in rank order (a host-side object gather); [value] without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def agree(value: object, what: str) -> None:
    """Raise on every rank if the ranks disagree on `value` (e.g. the run directory)."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        raise ValueError(
            f"ranks disagree on the {what}: " + ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(values))
        )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroy every process group and collect what still held one, while the interpreter is whole: a gloo
    group freed here joins its worker threads now.

    One that outlives this (DeepSpeed keeps its groups in module globals and on every ZeRO-3 parameter, and
    after a training run something outside Kiln still holds the default group) is freed during interpreter
    finalization; if a worker thread of it then drops the last reference to a collective's tensor, it must take
    the GIL, CPython ends it with pthread_exit and the process aborts ("terminate called without an active
    exception", SIGABRT; measured in docs/design.md, "Ending a rank"). The benchmarks' workers, which only write
    a JSON file, and `src.train`, end with `leave` instead."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _SP_GROUPS.clear()
    gc.collect()


def leave(timeout_s: float = 120.0) -> NoReturn:
    """End a rank whose command has finished, without interpreter finalization: once every rank of the job has
    set its key in the rendezvous store (each sets it after its last collective, so no rank still has a message
    in flight to a peer), `exit_now(0)`.

    Finalization is where the gloo groups that outlive a run are freed (DeepSpeed holds its groups past
    `destroy_process_group`): a worker thread can abort the process there (see `shutdown`), or, its peers gone,
    spin in `gloo_tcp_loop` without end (docs/design.md, "Ending a rank"). A rank that waits more than
    `timeout_s` for the others logs which ranks never arrived and leaves anyway: its own work is done. In a
    group of one, or with none, it only flushes and exits."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        missing = _wait_for_every_rank(dist.get_rank(), dist.get_world_size(), timeout_s)
        if missing:
            log.warning("rank %d leaves after %.0f s without ranks %s: they never finished", dist.get_rank(),
                        timeout_s, missing)  # fmt: skip
    exit_now(0)


def _wait_for_every_rank(rank: int, world: int, timeout_s: float) -> list[int]:
    """Set this rank's key and wait until every rank's is set; the ranks still missing at the timeout."""
    store = dist.distributed_c10d._get_default_store()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job must not see old keys
    keys = [f"kiln/finished/{attempt}/{r}" for r in range(world)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
        return []
    except dist.DistStoreError:  # the timeout: name who is missing
        try:
            return [r for r, key in enumerate(keys) if not store.check([key])]
        except dist.DistError:  # the host left meanwhile, which it does only once every key is set
            return []
    except dist.DistError:  # the store's host (rank 0 without torchrun's agent) left: it had seen every key
        return []


def exit_now(code: int = 0) -> NoReturn:
    """End this process at once with `code`, skipping interpreter finalization (see `shutdown`) and whatever
    was registered to run at exit: only for worker entry points that have written their results."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
