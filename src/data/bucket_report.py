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
from collections.abc import Sequence
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.cli import HelpFormatter
from src.data.bucket_table import collapsed_aspect_ratios, format_report
from src.data.buckets import BucketConfig
from src.data.catalog import expand_urls, scan_shards
from src.data.plan import Planner
from src.data.shards import ClipOptions, unfit_samples

log = logging.getLogger(__name__)
BUCKET_CONFIGS = Path(__file__).resolve().parents[2] / "conf/data/buckets"


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
    buckets = load_buckets(args.buckets, args.batch_scale)
    print(report(args.urls, buckets, ClipOptions(args.fps, args.frame_stride), args.ranks, args.seed))


if __name__ == "__main__":
    main()
