"""How a data set falls into buckets: samples per bucket, the batch each gets, and every sample that fits none.

    python -m src.data.bucket_report outputs/synthetic_demo --buckets demo --frame-stride 3
    python -m src.data.bucket_report /data/shards --buckets stage1 --fps 24 --ranks 64

reads the shards' catalogue (tar headers and the small json members, no video is decoded) and a bucket config
(a `conf/data/buckets/` name or a YAML file), assigns every sample as the training plan does (the same per-sample
coins) and prints the table, then every sample no bucket accepts with the reason. Training logs the same table at
start (`src/data/shards.py`, `src/data/cached.py`). A bucket is `resolution/frames/HxW`: height x width in pixels,
so `256px/33f/192x336` is 16:9. Aspect ratios that a coarse `size_multiple` rounds to the same shape are warned of.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.cli import HelpFormatter
from src.data.buckets import BucketConfig
from src.data.catalog import Skip, expand_urls, scan_shards
from src.data.plan import Planner

if TYPE_CHECKING:  # src.data.shards logs this module's table at scan: imported where used, not at import
    from src.data.shards import ClipOptions

log = logging.getLogger(__name__)
BUCKET_CONFIGS = Path(__file__).resolve().parents[2] / "conf/data/buckets"


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


def load_buckets(name_or_path: str, batch_scale: float = 1.0) -> BucketConfig:
    """A bucket config from `conf/data/buckets/<name>.yaml` or a YAML file, batch sizes scaled by `batch_scale`."""
    path = Path(name_or_path)
    if not path.is_file():
        path = BUCKET_CONFIGS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUCKET_CONFIGS.glob("*.yaml")))
        raise ValueError(f"bucket config {name_or_path!r} is neither a file nor one of conf/data/buckets/: {known}")
    return instantiate(OmegaConf.load(path), batch_scale=batch_scale)


def report(urls: Sequence[str], buckets: BucketConfig, clips: ClipOptions, ranks: int = 1, seed: int = 0) -> str:
    """The bucket report of video shards (`data.urls` forms: folders, brace patterns, `pipe:` commands)."""
    from src.data.shards import unfit_samples

    shards, scan_skips = scan_shards(expand_urls(list(urls)))
    unfit = unfit_samples(shards, lambda meta: buckets.why_no_bucket(meta, clips.can_supply))
    planner = Planner(shards, buckets, clips.can_supply, ranks, seed)
    lines = [format_report(planner, unfit)]
    lines += [f"warning: {line}" for line in collapsed_aspect_ratios(buckets)]
    if scan_skips:
        lines.append(f"{len(scan_skips)} samples or shards left out at scan:")
        lines += [f"  {skip.key}: {skip.reason}: {skip.detail}" for skip in scan_skips]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("urls", nargs="+", help="shard folders, tar files or brace patterns, as data.urls takes them")
    parser.add_argument("--buckets", required=True, help="a conf/data/buckets/ name (e.g. stage1) or a YAML file")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="as data.buckets.batch_scale")
    parser.add_argument("--fps", type=float, default=None, help="as data.fps (none: every frame_stride-th frame)")
    parser.add_argument("--frame-stride", type=int, default=1, help="as data.frame_stride")
    parser.add_argument("--ranks", type=int, default=1, help="data-parallel ranks: global batch = batch x ranks")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (the buckets' coins)")
    args = parser.parse_args(argv)
    from src.data.shards import ClipOptions

    buckets = load_buckets(args.buckets, args.batch_scale)
    print(report(args.urls, buckets, ClipOptions(args.fps, args.frame_stride), args.ranks, args.seed))


if __name__ == "__main__":
    main()
