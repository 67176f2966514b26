"""The bucket table of a training plan: samples per bucket, the batch each gets, who fits none, and aspect ratios
that a coarse `size_multiple` merges. Logged by the loaders at start (`log_bucket_report`) and printed by
`python -m src.data.bucket_report` (src/data/bucket_report.py).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence

from src.data.buckets import BucketConfig
from src.data.catalog import Skip
from src.data.plan import Planner

log = logging.getLogger(__name__)


def bucket_counts(planner: Planner) -> tuple[Counter, int]:
    """Samples per bucket as the plan assigns them (each sample's coins are its own, the same every epoch), and
    how many samples it passes over (no bucket fits, or the coins of the buckets that fit declined)."""
    counts = Counter(planner.bucket_of(g) for g in range(planner.size))
    return counts, counts.pop(None, 0)


def collapsed_aspect_ratios(buckets: BucketConfig) -> list[str]:
    """A line per shape that two or more configured aspect ratios of one resolution round to."""
    lines = []
    for res in buckets.order:
        by_shape = defaultdict(list)
        for ratio, shape in buckets.shapes[res].items():
            by_shape[shape].append(ratio)
        lines += [
            f"{res}: aspect ratios {', '.join(ratios)} all become {h}x{w} (height x width): size_multiple "
            f"{buckets.size_multiple} is too coarse to keep them apart"
            for (h, w), ratios in by_shape.items()
            if len(ratios) > 1
        ]
    return lines


def format_report(planner: Planner, unfit: Sequence[Skip], list_unfit: bool = True) -> str:
    """The bucket table of a plan: per bucket its samples, batch per rank, global batch and full global batches
    an epoch; then the samples that fit no bucket (each with why when `list_unfit`) and those the coins declined."""
    counts, passed_over = bucket_counts(planner)
    config = getattr(planner.buckets, "config", planner.buckets)  # a cache's buckets wrap the configured ones
    order = {res: i for i, res in enumerate(config.order)}  # largest resolution first, then longest, then tallest
    key = lambda b: (order.get(b.resolution, len(order)), -b.num_frames, -b.height / b.width)  # noqa: E731
    rows = sorted(set(config.all_buckets()) | set(counts), key=key)
    world = planner.dp_world
    lines = [
        f"buckets of {planner.size} samples in {len(planner.shards)} shards on {world} data-parallel ranks "
        "(bucket = resolution/frames/height x width):",
        f"{'bucket':<28} {'samples':>8} {'batch/rank':>10} {'global':>7} {'batches/epoch':>13}",
    ]
    for bucket in rows:
        n = counts.get(bucket, 0)
        lines.append(
            f"{bucket.name:<28} {n:>8} {bucket.batch_size:>10} {bucket.batch_size * world:>7} "
            f"{math.floor(n / (bucket.batch_size * world)):>13}"
        )
    declined = passed_over - len(unfit)
    lines.append(f"{len(unfit)} samples fit no bucket" + (":" if list_unfit and unfit else ""))
    if list_unfit:
        lines += [f"  {skip.key}: {skip.detail}" for skip in unfit]
    if declined:
        lines.append(f"{declined} samples fit only buckets of probability < 1 whose coins declined them")
    return "\n".join(lines)


def log_bucket_report(planner: Planner, unfit: Sequence[Skip]) -> None:
    """The bucket table in the log at the start of training (the samples that fit none are named by write_skips)."""
    log.info("%s", format_report(planner, unfit, list_unfit=False))
    config = getattr(planner.buckets, "config", planner.buckets)
    for line in collapsed_aspect_ratios(config):
        log.warning("%s", line)
