"""The training data loader: webdataset shards -> bucketed batches of decoded clips, resumable exactly.

    catalogue (catalog.py)  ->  global batch plan (plan.py)  ->  this rank's slice, decoded by its workers

Every rank and every DataLoader worker runs the same plan; rank r decodes the r-th slice of each global batch,
and worker w of n decodes the batches numbered w, w + n, ... DataLoader takes batches from its workers in
turn, so they arrive in plan order whatever n is. Each batch carries the plan's state after it: the training
loop saves the state of the last batch it consumed, and `build_loader(state=...)` continues from there.

A sample that fails to decode (corrupt or truncated video, bad caption, clip too short) keeps its place with a
zero clip and `valid = False`, so batch shapes and the plan stay the same on every rank; the loss ignores it.
It is counted by reason and written, with its key, to `skip_dir/rank<r>.jsonl`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from src.data.bucket_table import log_bucket_report
from src.data.buckets import Bucket, BucketConfig
from src.data.catalog import MemberReader, SampleInfo, ShardInfo, Skip, expand_urls, scan_shards
from src.data.holdout import split as holdout_split
from src.data.plan import GlobalBatch, Planner, check_fits
from src.data.source import Batch, FeatureSpec, bucket_latent_shapes
from src.data.video import VideoDecodeError, decode_clip, fits
from src.data.video_memo import VideoMemo

log = logging.getLogger(__name__)

__all__ = ["VideoShardDataset", "build_loader", "expand_urls"]


LOGGED_SKIPS = 20  # skips logged one by one per call; the rest are summed in one line (all are in the file)


def write_skips(skip_dir: str | Path | None, name: str, skips: Sequence[Skip]) -> None:
    """Append skipped samples to `skip_dir/name.jsonl` (one JSON object each) and log them: the first LOGGED_SKIPS
    one by one, then a count, so that a data set where many samples fit no bucket does not flood the log."""
    for skip in skips[:LOGGED_SKIPS]:
        log.warning("skipping %s: %s: %s", skip.key, skip.reason, skip.detail)
    if len(skips) > LOGGED_SKIPS:
        where = Path(skip_dir) / f"{name}.jsonl" if skip_dir else "no skip file"
        log.warning("skipping %d more samples (%s)", len(skips) - LOGGED_SKIPS, where)
    if skip_dir and skips:
        Path(skip_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(skip_dir) / f"{name}.jsonl", "a") as f:
            f.writelines(json.dumps({"key": s.key, "reason": s.reason, "detail": s.detail}) + "\n" for s in skips)


DECODE_FAILURES = ("decode_error", "too_short", "bad_caption", "read_error")


def unfit_samples(shards: Sequence[ShardInfo], why_no_bucket: Callable[[Mapping], str | None]) -> list[Skip]:
    """`no_bucket` skips for the samples no bucket accepts (the plan passes over them every epoch), each with why:
    `why_no_bucket(meta)`, None for a sample that fits."""
    return [
        Skip(f"{shard.url}:{sample.key}", "no_bucket", why)
        for shard in shards
        for sample in shard.samples
        if (why := why_no_bucket(sample.meta)) is not None
    ]


def declared_fps(meta: Mapping) -> float | None:
    """The frame rate a list row declared over the container's (`container_fps` kept beside it), else None."""
    return float(meta["fps"]) if "container_fps" in meta else None


def clip_window(meta: Mapping) -> tuple[float, float] | None:
    """(start, end) seconds of a cut made by the shard writer (either end may be missing), or None."""
    if "start" not in meta and "end" not in meta:
        return None
    end = meta.get("end", meta.get("duration") or meta["frames"] / meta["fps"])
    return float(meta.get("start", 0.0)), float(end)


def failure_reason(err: Exception) -> str:
    """The counter a decode failure goes to."""
    if isinstance(err, VideoDecodeError):
        return "too_short" if "too short" in str(err) else "decode_error"
    return "bad_caption" if isinstance(err, UnicodeDecodeError) else "read_error"


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from videos: target fps, frame stride, crop. Shared by training and preprocessing."""

    fps: float | None = None
    frame_stride: int = 1
    crop: str = "center"

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop {self.crop!r} is not 'center' or 'random'")

    def provenance(self) -> dict[str, Any]:
        """What a feature cache of these clips depends on: recorded by `src.preprocess`, checked by a cached run."""
        return {"fps": self.fps, "frame_stride": self.frame_stride, "crop": self.crop}

    def can_supply(self, meta: Mapping, num_frames: int) -> bool:
        """Whether a video with probe `meta` holds a clip of `num_frames` frames."""
        return fits(meta, num_frames, self.frame_stride, self.fps, clip_window(meta))

    def decode(
        self,
        reader: MemberReader,
        shard: ShardInfo,
        sample: SampleInfo,
        bucket: Bucket,
        rng_seed: str,
        memo: VideoMemo | None = None,
    ) -> tuple[torch.Tensor, str]:
        """One clip (3, T, H, W) in [-1, 1] of the bucket's shape and its caption; raises VideoDecodeError,
        UnicodeDecodeError or OSError when the sample cannot be used. Random starts and crops follow `rng_seed`;
        `memo` holds whole decoded videos (bitwise the same clip)."""
        media, caption = reader.read(shard, sample)
        video = decode_clip(
            media,
            bucket.num_frames,
            bucket.height,
            bucket.width,
            self.frame_stride,
            fps=self.fps,
            window=clip_window(sample.meta),
            rng=random.Random(rng_seed),
            crop=self.crop,
            source_fps=declared_fps(sample.meta),
            memo=memo,
        )  # (3, T, H, W)
        return video, caption


class VideoShardDataset(IterableDataset):
    """This rank's batches: dicts with `video` (B, 3, T, H, W) in [-1, 1], `caption`, `key`, `index` (B,) global
    sample numbers, `valid` (B,) bool, `bucket` name, `state` (the plan after this batch), `failed` (this rank's decode
    failures in this batch, by reason) and `plan_skipped` (samples the plan passed over, the same on all ranks)."""

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str],
        buckets: BucketConfig,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        fps: float | None = None,
        frame_stride: int = 1,
        crop: str = "center",
        shuffle: bool = True,
        mix_shards: int = 4,
        state: Mapping | None = None,
        skip_dir: str | Path | None = None,
        shard_retries: int = 3,
        holdout: int = 0,
        val_urls: str | Sequence[str] | None = None,
        memo_mb: float = 0,
    ):
        super().__init__()
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, {dp_world}), got {dp_rank}")
        if memo_mb < 0:
            raise ValueError(f"data.memo_mb must be >= 0 MiB (0: no memo), got {memo_mb}")
        self.dp_rank, self.seed, self.memo_mb = dp_rank, seed, memo_mb
        self.clips = ClipOptions(fps, frame_stride, crop)
        self.skip_dir = skip_dir
        shards, self.scan_skips = scan_shards(expand_urls(urls), retries=shard_retries)
        if dp_rank == 0:
            write_skips(skip_dir, "catalog", self.scan_skips)
        # validation clips: held out of these shards by key, or chosen from separate ones (src/data/holdout.py)
        self.val_bucket = buckets.all_buckets()[0]
        fits_val = lambda s: self.can_supply(s.meta, self.val_bucket.num_frames)  # noqa: E731
        if val_urls:
            val_shards, _ = scan_shards(expand_urls(val_urls), retries=shard_retries)
            self.held = holdout_split(val_shards, holdout, fits_val)[1]
        else:
            shards, self.held = holdout_split(shards, holdout, fits_val)
        self.fitting = check_fits(shards, buckets, self.can_supply)
        # named once here; the plan counts them each time it passes over them
        self.unfit = unfit_samples(shards, lambda meta: buckets.why_no_bucket(meta, self.can_supply))
        if dp_rank == 0:
            write_skips(skip_dir, "catalog", self.unfit)
        self.planner = Planner(shards, buckets, self.can_supply, dp_world, seed, shuffle, mix_shards, state)
        log.info(
            "data: %d samples in %d shards, %d fit the buckets; %d skipped at scan",
            self.planner.size,
            len(shards),
            self.fitting,
            len(self.scan_skips),
        )
        if dp_rank == 0:
            log_bucket_report(self.planner, self.unfit)

    def can_supply(self, meta: Mapping, num_frames: int) -> bool:
        return self.clips.can_supply(meta, num_frames)

    encoded = False  # batches hold pixels and captions: the loop encodes them

    def feature_spec(self, text, vae) -> FeatureSpec:
        """The empty prompt's features from the text encoder, every bucket's latent shape from the VAE."""
        null_txt, null_vec = text([""])  # (1, L, D), (1, Dv)
        return FeatureSpec(
            null_txt, null_vec, bucket_latent_shapes(self.planner.buckets, vae), text.dim, text.pooled_dim
        )

    def validation(self) -> Batch | None:
        """The held-out clips as one batch of the validation bucket (`video`, `caption`, `key`), centre-cropped
        from each clip's start; None without a hold-out. A clip that fails to decode is an error naming it."""
        if not self.held:
            return None
        reader, videos, captions = MemberReader(), [], []
        clips = ClipOptions(self.clips.fps, self.clips.frame_stride, "center")
        try:
            for shard, sample in self.held:
                try:
                    video, caption = clips.decode(reader, shard, sample, self.val_bucket, "validation")
                except (VideoDecodeError, UnicodeDecodeError, OSError) as err:
                    raise ValueError(f"validation clip {shard.url}:{sample.key} cannot be used: {err}") from err
                videos.append(video)
                captions.append(caption)
        finally:
            reader.close()
        keys = [f"{shard.url}:{sample.key}" for shard, sample in self.held]
        return {"video": torch.stack(videos), "caption": captions, "key": keys, "bucket": self.val_bucket.name}

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = MemberReader()
        memo = VideoMemo(self.memo_mb) if self.memo_mb else None  # this worker's (src/data/video_memo.py)
        try:
            for batch in self.planner:
                if batch.number % workers == worker:
                    yield self.decode_batch(batch, reader, memo)
        finally:
            reader.close()

    def decode_batch(self, batch: GlobalBatch, reader: MemberReader, memo: VideoMemo | None = None) -> Batch:
        bucket = batch.bucket
        videos, captions, keys, valid, skips = [], [], [], [], []
        for g in batch.rank_slice(self.dp_rank):
            shard, sample = self.planner.locate(g)
            try:
                video, caption = self.clips.decode(reader, shard, sample, bucket, f"{self.seed}/clip/{g}", memo)
                ok = True
            except (VideoDecodeError, UnicodeDecodeError, OSError) as err:
                skips.append(Skip(f"{shard.url}:{sample.key}", failure_reason(err), str(err)))
                video, caption, ok = torch.zeros(3, bucket.num_frames, bucket.height, bucket.width), "", False
            videos.append(video)
            captions.append(caption)
            keys.append(sample.key)
            valid.append(ok)
        write_skips(self.skip_dir, f"rank{self.dp_rank}", skips)
        failed = {reason: sum(s.reason == reason for s in skips) for reason in DECODE_FAILURES}
        return {
            "video": torch.stack(videos),  # (B, 3, T, H, W)
            "caption": captions,
            "key": keys,
            "index": torch.tensor(batch.rank_slice(self.dp_rank), dtype=torch.int64),  # (B,)
            "valid": torch.tensor(valid),  # (B,)
            "bucket": bucket.name,
            "state": batch.state,
            "failed": failed,  # this rank's decode failures in this batch
            "plan_skipped": batch.skipped,  # samples the plan passed over (the same on every rank)
        }


def build_loader(
    urls: str | Sequence[str],
    buckets: BucketConfig,
    dp_rank: int,
    dp_world: int,
    num_workers: int = 0,
    pin_memory: bool | str = "auto",
    **options: Any,
) -> DataLoader:
    """A DataLoader yielding this data-parallel rank's batches in plan order (see the module docstring).

    `options` are those of `VideoShardDataset` (seed, fps, frame_stride, crop, shuffle, mix_shards, skip_dir,
    and `state`: the `state` of the last batch consumed before a checkpoint, None to start from the beginning).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = VideoShardDataset(urls, buckets, dp_rank, dp_world, **options)
    return plan_order_loader(dataset, num_workers, pin_memory)


def resolve_pin_memory(pin_memory: bool | str) -> bool:
    """`auto`: pinned host memory when CUDA is present, so that batches reach the GPU by asynchronous copies
    (`non_blocking=True` in the loop) instead of a copy that waits for the GPU; never on a CPU-only machine."""
    if pin_memory == "auto":
        return torch.cuda.is_available()
    if not isinstance(pin_memory, bool):
        raise ValueError(f"data.pin_memory must be true, false or auto, got {pin_memory!r}")
    return pin_memory


def plan_order_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool | str) -> DataLoader:
    """A DataLoader over a dataset that batches itself in plan order (worker w takes batches w, w + n, ...)."""
    context = None
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset batches itself: one bucket, one shape per batch
        num_workers=num_workers,
        pin_memory=resolve_pin_memory(pin_memory),
        persistent_workers=num_workers > 0,
        multiprocessing_context=context,
    )
