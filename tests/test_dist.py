"""Process-group helpers on 2 gloo ranks: ranks must agree on the run directory; loss means are global."""

import os

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from src.parallel.dist import agree, all_mean, init_distributed, shutdown

    info = init_distributed("gloo")
    out = {"rank": info.rank, "mean": all_mean(torch.tensor(float(rank + 1))).item()}
    agree("/runs/a", "run directory")
    try:
        agree(f"/runs/rank{rank}", "run directory")
    except ValueError as err:
        out["error"] = str(err)
    results[rank] = out
    shutdown()


def test_ranks_agree_or_fail_naming_each_rank():
    from src.parallel.dist import _free_port

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["mean"] == 1.5
        assert (
            results[rank]["error"]
            == "ranks disagree on the run directory: rank 0: '/runs/rank0', rank 1: '/runs/rank1'"
        )
