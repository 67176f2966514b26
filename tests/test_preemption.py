"""A stop request on 2 gloo ranks: every rank agrees to stop and on why, whichever rank was signalled."""

import os
import signal

import pytest
import torch.multiprocessing as mp

from tests.ranks import spawn_ranks


def _worker(rank: int, port: int, run_dir: str, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from src.parallel.dist import init_distributed, shutdown
    from src.run.preemption import StopRequest

    init_distributed("gloo")
    stop = StopRequest(run_dir)
    out = {"before": (stop.requested(), stop.reason())}
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM or a user sends to one process of the job
    out["signalled"] = (stop.requested(), stop.reason())
    stop.close(is_main=rank == 0)
    results[rank] = out
    shutdown()


@pytest.mark.dist
def test_sigusr1_to_rank_1_stops_every_rank_and_says_so(tmp_path):
    from src.parallel.dist import _free_port

    results = mp.Manager().dict()
    spawn_ranks(_worker, 2, (_free_port(), str(tmp_path), results))
    for rank in (0, 1):
        assert results[rank]["before"] == (False, "not requested")
        assert results[rank]["signalled"] == (True, "SIGUSR1 to rank 1")  # rank 0 logs it: no "STOP exists"
    assert not (tmp_path / "STOP").exists()


def test_a_stop_file_is_the_reason_when_no_signal_came(tmp_path):
    from src.run.preemption import StopRequest

    stop = StopRequest(tmp_path)
    (tmp_path / "STOP").touch()
    try:
        assert stop.requested() and stop.reason() == f"{tmp_path / 'STOP'} exists"
    finally:
        stop.close(is_main=True)
    assert not (tmp_path / "STOP").exists()
