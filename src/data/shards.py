"""Streaming reader for webdataset video shards with sample-exact, rank- and worker-independent resume.

The data is one deterministic, infinite *global sample stream*: for epoch e = 0, 1, 2, ... the shard
list is permuted with ``random.Random(seed * 1_000_003 + e)`` (or kept sorted when not shuffling) and
each shard is read in tar order; sample number g = 0, 1, 2, ... counts across epochs.

Splitting the stream:

* data-parallel rank r (of dp_world) takes the samples with ``g % dp_world == r``;
* the rank's j-th sample (counted from ``start_index``) belongs to its local batch ``b = j // batch_size``;
* DataLoader worker w (of n) builds exactly the batches with ``b % n == w``. The DataLoader takes one
  batch from each worker in turn, so batches come out as b = 0, 1, 2, ... whatever n is.

Resuming at ``start_index = samples_consumed(step, batch_size, dp_world)`` therefore continues the
stream exactly where the interrupted run stopped, even with a different number of workers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import webdataset
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from src.data.video import VideoDecodeError, decode_clip

logger = logging.getLogger(__name__)

EPOCH_SEED_STRIDE = 1_000_003
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # the member names webdataset's tar reader skips


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard patterns into a list of shard URLs, keeping the given order.

    Each pattern is brace-expanded (``data/shard-{000000..000099}.tar``); a local directory stands for
    its sorted ``*.tar`` files; local paths that do not exist are dropped with a warning; ``pipe:`` and
    other ``scheme://`` URLs are passed through unchecked.

    Raises:
        ValueError: no pattern was given, or a pattern matches no shard.
    """
    patterns = [os.fspath(u) for u in ([urls] if isinstance(urls, (str, os.PathLike)) else urls)]
    if not patterns:
        raise ValueError(f"no shard patterns given: {urls!r}")
    expanded: list[str] = []
    for pattern in patterns:
        found: list[str] = []
        missing: list[str] = []
        for url in braceexpand(pattern):
            if not _is_local(url):
                found.append(url)
                continue
            path = _local_path(url)
            if path.is_dir():
                found.extend(str(p) for p in sorted(path.glob("*.tar")))
            elif path.is_file():
                found.append(url)
            else:
                missing.append(url)
        if not found:
            raise ValueError(f"shard pattern {pattern!r} matches no tar files")
        if missing:
            logger.warning("shard pattern %r: %d missing paths, e.g. %s", pattern, len(missing), missing[0])
        expanded.extend(found)
    return expanded


def samples_consumed(step: int, batch_size: int, dp_world: int) -> int:
    """Global samples consumed after `step` optimizer steps; pass it as `start_index` to resume."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dp_world < 1:
        raise ValueError(f"dp_world must be >= 1, got {dp_world}")
    return step * batch_size * dp_world


class _Item(NamedTuple):
    """One decoded sample on its way into a batch."""

    index: int  # global sample index g
    key: str
    caption: str
    video: torch.Tensor  # (3, T, H, W)


class VideoShardDataset(IterableDataset):
    """Batches of decoded clips from webdataset shards, split by data-parallel rank and loader worker.

    Samples need a ``mp4`` member (the video) and a ``txt`` member (the caption). Yields dicts with
    ``video`` float32 (B, 3, T, H, W) in [-1, 1], ``caption`` list[str], ``key`` list[str] and
    ``index`` int64 (B,) of global sample indices. The stream is infinite; see the module docstring
    for which rank and worker gets which sample.

    Bad samples (undecodable or too short video, missing member, caption not utf-8) are skipped with
    a warning and counted by reason in ``skipped``; the worker fills the batch with its next owned
    sample, so batches are always full. Each DataLoader worker counts in its own copy of the dataset.
    Resume across skips is approximate: the skip shifts that worker's later batches by one sample,
    which ``start_index`` does not know about (a later change will record skips to make it exact).
    A worker that meets ``max_consecutive_bad`` bad samples in a row raises RuntimeError.
    """

    max_consecutive_bad: int = 1000

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        num_frames: int,
        height: int,
        width: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        frame_stride: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_index: int = 0,
    ) -> None:
        for name, value, minimum in (
            ("num_frames", num_frames, 1),
            ("height", height, 1),
            ("width", width, 1),
            ("batch_size", batch_size, 1),
            ("dp_world", dp_world, 1),
            ("frame_stride", frame_stride, 1),
            ("start_index", start_index, 0),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, {dp_world}), got {dp_rank}")
        super().__init__()
        self.urls = sorted(expand_urls(urls))
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.frame_stride = frame_stride
        self.seed = seed
        self.shuffle = shuffle
        self.start_index = start_index
        self.skipped: dict[str, int] = {}
        self._counts: dict[str, int] = {}  # samples per local shard, to skip shards a worker has no part in
        # the rank's samples with g < start_index: j counts from the first sample after them
        self._first_local = max(0, start_index - dp_rank + dp_world - 1) // dp_world

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shard order of `epoch` in the global stream."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * EPOCH_SEED_STRIDE + epoch).shuffle(order)
        return order

    def owns(self, g: int, worker: int, num_workers: int) -> bool:
        """Whether global sample `g` goes into a batch built by this rank's loader `worker`."""
        if g < self.start_index or g % self.dp_world != self.dp_rank:
            return False
        local_batch = (g // self.dp_world - self._first_local) // self.batch_size
        return local_batch % num_workers == worker

    def _owns_any(self, indices: range, worker: int, num_workers: int) -> bool:
        """Whether any of the global samples `indices` goes to this rank's loader `worker`."""
        return any(self.owns(g, worker, num_workers) for g in indices)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        batch: list[_Item] = []
        bad_run = 0
        for g, sample in self._owned_samples(worker, num_workers):
            item = self._decode(g, sample)
            if item is None:
                bad_run += 1
                if bad_run >= self.max_consecutive_bad:
                    where = f"up to global index {g}; skipped so far: {self.skipped}"
                    raise RuntimeError(f"{bad_run} bad samples in a row ({where})")
                continue
            bad_run = 0
            batch.append(item)
            if len(batch) == self.batch_size:
                yield {
                    "video": torch.stack([item.video for item in batch]),  # (B, 3, T, H, W)
                    "caption": [item.caption for item in batch],
                    "key": [item.key for item in batch],
                    "index": torch.tensor([item.index for item in batch], dtype=torch.int64),  # (B,)
                }
                batch = []

    def _owned_samples(self, worker: int, num_workers: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """Undecoded samples (with their global index) owned by `worker`, forever."""
        g = 0
        for epoch in itertools.count():
            epoch_start = g
            for url in self.epoch_shards(epoch):
                count = self._shard_count(url)
                if count is not None and not self._owns_any(range(g, g + count), worker, num_workers):
                    g += count  # nothing for this worker in the shard: do not read it
                    continue
                shard_start = g
                for sample in _read_shard(url):
                    if self.owns(g, worker, num_workers):
                        yield g, sample
                    g += 1
                if count is not None and g - shard_start != count:
                    raise RuntimeError(
                        f"{url}: read {g - shard_start} samples but its tar headers say {count}; "
                        "the reader's key grouping disagrees with the shard index"
                    )
            if g == epoch_start:
                raise ValueError(f"the shards {self.urls[:3]}... (of {len(self.urls)}) hold no samples")

    def _shard_count(self, url: str) -> int | None:
        """Samples in a local shard from its tar headers (cached); None for remote shards."""
        if url not in self._counts:
            if not _is_local(url):
                return None
            self._counts[url] = _count_tar_samples(_local_path(url))
        return self._counts[url]

    def _decode(self, g: int, sample: dict[str, Any]) -> _Item | None:
        """The decoded sample, or None (counted in `skipped` and logged) for a bad one."""
        key = sample["__key__"]
        members = sorted(name for name in sample if not name.startswith("__"))
        if "mp4" not in sample:
            reason, detail = "missing_mp4", f"members {members}"
        elif "txt" not in sample:
            reason, detail = "missing_txt", f"members {members}"
        else:
            try:
                caption = sample["txt"].decode("utf-8").strip()
                data = sample["mp4"]
                video = decode_clip(data, self.num_frames, self.height, self.width, self.frame_stride)
                return _Item(g, key, caption, video)
            except UnicodeDecodeError as exc:
                reason, detail = "bad_caption", str(exc)
            except VideoDecodeError as exc:
                reason, detail = "decode_error", str(exc)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        url = sample["__url__"]
        logger.warning("skipping sample %s (global index %d, %s): %s: %s", key, g, url, reason, detail)
        return None


def build_loader(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    num_frames: int,
    height: int,
    width: int,
    batch_size: int,
    dp_rank: int,
    dp_world: int,
    frame_stride: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    start_index: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over `VideoShardDataset` yielding this rank's batches in order.

    `start_index` is the number of global samples already consumed by all ranks together
    (= steps * batch_size * dp_world, see `samples_consumed`); the loader continues from there.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = VideoShardDataset(
        urls,
        num_frames,
        height,
        width,
        batch_size,
        dp_rank,
        dp_world,
        frame_stride,
        seed,
        shuffle,
        start_index,
    )
    context = None
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        multiprocessing_context=context,
    )


def _is_local(url: str) -> bool:
    """Whether a shard URL names a local file (plain path or file: URL)."""
    return url.startswith("file:") or not (url.startswith("pipe:") or "://" in url)


def _local_path(url: str) -> Path:
    """The filesystem path of a local shard URL."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    return Path(url[len("file:") :] if url.startswith("file:") else url)


def _read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples (dicts of member suffix -> bytes, plus __key__ and __url__) of one shard, in tar order."""
    with contextlib.closing(webdataset.gopen(url)) as stream:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from tariterators.group_by_keys(files)


def _count_tar_samples(path: Path) -> int:
    """Count the samples in a tar from its headers alone, grouping members exactly like `_read_shard`."""
    count = 0
    previous = None
    with tarfile.open(path, "r:*") as tar:
        for info in tar:  # random access: seeks over the member data instead of reading it
            name = info.name
            if not info.isreg():
                continue
            if (
                "/" not in name
                and name.startswith(tariterators.meta_prefix)
                and name.endswith(tariterators.meta_suffix)
            ):
                continue
            if _SKIP_META.match(name):
                continue
            prefix, _ = tariterators.base_plus_ext(name)
            if prefix is None:
                continue
            if prefix != previous:
                count += 1
                previous = prefix
    return count
