"""What a run checks before it trains: its folders are writable, and a resumed run keeps its global batch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from src.parallel.dist import all_gather_objects

log = logging.getLogger("kiln.train")


def _write_problem(folder: Path, rank: int) -> str | None:
    """Why this rank cannot write in `folder` (or, while it does not exist, in the parent that will hold it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, where the run needs a folder"
    where = folder if folder.is_dir() else folder.parent
    probe = where / f".write_probe_{folder.name}_rank{rank}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.write_text("kiln")
        probe.unlink()
    except OSError as err:
        return f"rank {rank} cannot write to {where} ({type(err).__name__}: {err})"
    return None


def check_writable(folders: list[Path]) -> None:
    """Write a file in each folder (or in its parent, where it does not exist yet) on every rank; if any rank
    cannot, a ValueError on every rank naming the folder and the fix.

    Run at start on the run directory and its checkpoints folder, so that a bad mount or permission shows now and
    not at the first checkpoint, `ckpt_every` steps later."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = [problem for folder in folders if (problem := _write_problem(folder, rank))]
    problems = [p for part in all_gather_objects(mine) for p in part]
    if problems:
        raise ValueError(
            "; ".join(problems) + ". The run writes its log, metrics and checkpoints there: make it a writable "
            "folder (permissions, free space, the same mount on every node) or choose another hydra.run.dir"
        )


class GlobalBatches:
    """The global batch size of each bucket trained so far, carried in every checkpoint.

    A resumed run whose global batch for a bucket differs from the checkpoint's (another `parallel.sp_size`,
    `data.buckets.batch_scale`, bucket table or number of ranks) changes the optimisation silently: it is refused
    at that bucket's first batch unless `resume_batch_change=true` declares it."""

    def __init__(self, saved: dict[str, int] | None, declared: bool):
        self.sizes = dict(saved or {})
        self.declared = declared

    def check(self, bucket: str, size: int, step: int) -> None:
        before = self.sizes.get(bucket)
        if before is not None and before != size:
            change = f"bucket {bucket}: the global batch was {before} samples before the resume and is {size} now"
            if not self.declared:
                raise ValueError(
                    f"step {step}, {change} (parallel.sp_size, data.buckets.batch_scale, the bucket table or the "
                    "number of data-parallel ranks changed). Resume with the checkpoint's settings, or declare the "
                    "change with resume_batch_change=true (the learning-rate schedule is not rescaled)"
                )
            log.warning("%s (declared: resume_batch_change=true)", change)
        self.sizes[bucket] = size

    def state(self) -> dict[str, dict[str, int]]:
        """What a checkpoint records (beside the loop state)."""
        return {"global_batches": dict(self.sizes)}
