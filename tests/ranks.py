"""Run a test's worker function on several spawned ranks, with a deadline.

`torch.multiprocessing.spawn(join=True)` waits forever: a rank that hangs (a collective whose peer left, gloo
threads spinning while the interpreter finalizes) stalls the whole pytest run until CI's own limit kills it,
naming nothing. `spawn_ranks` gives every rank the same deadline; a rank still running then has its Python
stacks dumped to the test's stderr (faulthandler, SIGUSR1), is killed, and the test fails naming it. A rank that
returns ends like Kiln's own commands (`src.parallel.dist.leave`): it waits for its peers in the rendezvous
store, then exits without interpreter finalization."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

DUMP_WAIT_S = 3.0  # for a hung rank to write its stacks before it is killed


def spawn_ranks(worker: Callable[..., None], nprocs: int, args: tuple[Any, ...], timeout_s: float = 300.0) -> None:
    """worker(rank, *args) on `nprocs` spawned processes; raises the first rank's exception (as mp.spawn does), or
    AssertionError naming the ranks still running after `timeout_s` (each killed once its stacks are dumped)."""
    context = mp.start_processes(_rank_main, args=(worker, args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() < deadline:
            continue
        hung = [rank for rank, proc in enumerate(context.processes) if proc.is_alive()]
        for rank in hung:
            _signal(context.processes[rank].pid, signal.SIGUSR1)
        time.sleep(DUMP_WAIT_S)
        for proc in context.processes:
            proc.kill()
            proc.join(10)
        raise AssertionError(
            f"{worker.__name__}: ranks {hung} of {nprocs} still running after {timeout_s:.0f} s; killed "
            "(their Python stacks are in the captured stderr)"
        )


def spawn_for_results(worker: Callable[..., None], world: int, *args: Any) -> dict:
    """worker(rank, world, port, *args, results) on `world` ranks (`spawn_ranks`), each writing into the shared
    dict `results`; a copy of it once every rank has ended."""
    from src.parallel.dist import _free_port

    results = mp.Manager().dict()
    spawn_ranks(worker, world, (world, _free_port(), *args, results))
    return dict(results)


def _signal(pid: int | None, sig: int) -> None:
    try:
        if pid is not None:
            os.kill(pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _rank_main(rank: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    """One rank: dump stacks on SIGUSR1, run the worker, then leave (src.parallel.dist.leave) or, without a
    process group, exit at once: both skip the interpreter finalization where leftover gloo threads spin."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    worker(rank, *args)
    import torch.distributed as dist

    from src.parallel.dist import exit_now, leave

    if dist.is_initialized():
        leave(timeout_s=60.0)
    exit_now(0)
