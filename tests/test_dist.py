"""Process-group helpers on 2 gloo ranks: ranks must agree on the run directory; loss means and host counters are
global; shutdown leaves no gloo thread behind; leave waits for every rank, then skips finalization. The backend
chosen for a CUDA machine carries CPU tensors too (checked with torch.cuda mocked)."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.ranks import spawn_ranks


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from src.parallel.dist import agree, all_mean, all_sum_counts, init_distributed, shutdown

    info = init_distributed("gloo", sp_size=2)
    out = {"rank": info.rank, "mean": all_mean(torch.tensor(float(rank + 1))).item()}
    out["counts"] = all_sum_counts({"corrupt": rank + 1, "truncated": 10 * rank})
    agree("/runs/a", "run directory")
    try:
        agree(f"/runs/rank{rank}", "run directory")
    except ValueError as err:
        out["error"] = str(err)
    del info  # it holds the sequence-parallel group
    shutdown()
    out["gloo threads"] = _gloo_threads()
    results[rank] = out


def _gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return [name for t in tasks.iterdir() if "gloo" in (name := (t / "comm").read_text().strip())]


@pytest.mark.dist
def test_ranks_agree_or_fail_naming_each_rank():
    from src.parallel.dist import _free_port

    results = mp.Manager().dict()
    spawn_ranks(_worker, 2, (_free_port(), results))
    for rank in (0, 1):
        # shutdown() joined every gloo thread: none is left to touch Python objects during finalization
        assert results[rank]["gloo threads"] == []
        assert results[rank]["mean"] == 1.5
        assert results[rank]["counts"] == {"corrupt": 3, "truncated": 10}
        assert (
            results[rank]["error"]
            == "ranks disagree on the run directory: rank 0: '/runs/rank0', rank 1: '/runs/rank1'"
        )


def test_backend_carries_cpu_tensors_wherever_cuda_is_used():
    from src.parallel.dist import CPU_AND_CUDA, resolve_backend

    assert resolve_backend("auto", cuda=True) == CPU_AND_CUDA == "cpu:gloo,cuda:nccl"
    assert resolve_backend("auto", cuda=False) == "gloo"
    assert resolve_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(ValueError, match="'nccl' cannot carry the CPU tensors.*use 'auto' or 'cpu:gloo,cuda:nccl'"):
        resolve_backend("nccl", cuda=True)
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend(CPU_AND_CUDA, cuda=False)
    with pytest.raises(ValueError, match="dist_backend='mpi' is not one of"):
        resolve_backend("mpi", cuda=True)


def test_a_cuda_machine_joins_one_group_for_cpu_and_cuda_tensors(monkeypatch):
    # torch.cuda and the process-group constructor mocked: what init_distributed asks for on a GPU node
    import torch.distributed as dist

    from src.parallel import dist as kiln_dist

    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    info = kiln_dist.init_distributed("auto")
    assert calls == {"device": 3, "backend": "cpu:gloo,cuda:nccl"}
    assert info.device == torch.device("cuda", 3) and info.rank == 3 and info.world_size == 8


def _leaving_worker(rank: int, port: int, folder: str, late_rank: int, absent_rank: int, timeout_s: float) -> None:
    import atexit
    import logging
    import time

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from src.parallel.dist import init_distributed, leave

    logging.basicConfig(filename=f"{folder}/rank{rank}.log", level=logging.INFO)
    atexit.register(lambda: Path(folder, f"finalized{rank}").touch())
    init_distributed("gloo")
    if rank == absent_rank:  # never leaves: its peer must give up after the timeout
        time.sleep(3 * timeout_s)
        os._exit(0)
    if rank == late_rank:
        time.sleep(2)
        Path(folder, f"arrived{rank}").touch()
    leave(timeout_s=timeout_s)


@pytest.mark.dist
@pytest.mark.parametrize("late_rank", [0, 1])  # rank 0 hosts the store here: it may leave first or last
def test_a_rank_leaves_only_once_every_rank_has_finished_and_skips_finalization(tmp_path, late_rank):
    import multiprocessing

    from src.parallel.dist import _free_port

    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_leaving_worker, args=(r, port, str(tmp_path), late_rank, -1, 60)) for r in (0, 1)]
    for p in procs:
        p.start()
    early = procs[1 - late_rank]
    early.join(timeout=120)
    assert early.exitcode == 0
    assert (tmp_path / f"arrived{late_rank}").exists()  # the early rank waited for the late one
    procs[late_rank].join(timeout=120)
    assert procs[late_rank].exitcode == 0
    assert not list(tmp_path.glob("finalized*"))  # os._exit: no atexit handler, no finalization


@pytest.mark.dist
def test_a_rank_whose_peer_never_finishes_leaves_after_the_timeout_naming_it(tmp_path):
    import multiprocessing

    from src.parallel.dist import _free_port

    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_leaving_worker, args=(r, port, str(tmp_path), -1, 1, 3)) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[0].join(timeout=60)
    assert procs[0].exitcode == 0
    assert "rank 0 leaves after 3 s without ranks [1]: they never finished" in (tmp_path / "rank0.log").read_text()
    procs[1].join(timeout=60)


def test_a_real_time_scheduling_policy_is_named(monkeypatch):
    # init_distributed warns with this when a multi-rank job inherited real-time priority (docs/design.md)
    from src.parallel.dist import real_time_policy

    assert real_time_policy() is None  # the suite's own processes run under SCHED_OTHER (tests/conftest.py)
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_FIFO)
    monkeypatch.setattr(os, "sched_getparam", lambda pid: os.sched_param(99))
    assert real_time_policy() == "SCHED_FIFO priority 99"
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_BATCH)
    assert real_time_policy() is None
