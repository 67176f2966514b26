"""`python -m tests.block_forwards OUT_DIR TRAIN_ARGS...`: `python -m src.train TRAIN_ARGS...` with every MMDiT
block's forward counted, split into the forwards of the loss and those run during backward (activation
checkpointing's recomputations). Each rank writes OUT_DIR/rank<r>.json: {"DoubleStreamBlock": [forward, backward],
"SingleStreamBlock": [...]}. Runs under torchrun like the entry point itself (tests/test_train.py)."""

import functools
import json
import os
import runpy
import sys
from collections import defaultdict
from pathlib import Path
from typing import NoReturn

import torch

import src.parallel.dist as kiln_dist
from src.models.layers import DoubleStreamBlock, SingleStreamBlock
from src.parallel.dist import leave

COUNTS: dict[str, list[int]] = defaultdict(lambda: [0, 0])


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (where a checkpoint recomputes)."""
    return torch._C._current_graph_task_id() != -1


def counted(cls: type) -> None:
    forward = cls.forward

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        COUNTS[cls.__name__][int(in_backward())] += 1
        return forward(self, *args, **kwargs)

    cls.forward = wrapper


def main() -> None:
    out_dir = Path(sys.argv.pop(1))
    for cls in (DoubleStreamBlock, SingleStreamBlock):
        counted(cls)

    def write_counts() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(COUNTS))

    def write_counts_and_leave() -> NoReturn:  # src.train's last call, which ends the process
        write_counts()
        leave()

    kiln_dist.leave = write_counts_and_leave
    try:
        runpy.run_module("src.train", run_name="__main__", alter_sys=True)
    finally:  # src.train raised: the counts so far
        write_counts()


if __name__ == "__main__":
    main()
