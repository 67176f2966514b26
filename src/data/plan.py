"""The global batch plan: which samples form each global batch, identical on every rank and worker.

The catalogue defines one deterministic, infinite stream of samples: epoch e permutes the shards with a seed
from (seed, e), and the samples of every `mix_shards` consecutive shards are permuted together; sample number
g = 0, 1, 2... counts across epochs (epoch = g // N for N samples per epoch). Each sample goes to a bucket by a
coin seeded with (seed, g). A bucket's queue fills in stream order; when it holds `batch_size x dp_world`
samples it is emitted as one global batch, and data-parallel rank r takes the r-th slice.

The plan's state after a batch is the next g to read plus the g of every sample waiting in a queue. That is a
global record of consumption: resuming from it continues with exactly the unseen samples, none repeated and
none skipped, whatever the number of ranks (queues re-fill at the new size) or of loader workers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

from src.data.buckets import Bucket, BucketConfig
from src.data.catalog import SampleInfo, ShardInfo

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step's samples over all data-parallel ranks, and the plan's state after it."""

    number: int  # position in this run's plan (0, 1, 2...); picks the loader worker
    bucket: Bucket
    indices: tuple[int, ...]  # global sample numbers g, batch_size x dp_world of them
    state: dict
    skipped: dict[str, int]  # samples the plan passed over since the previous batch, by reason

    def rank_slice(self, dp_rank: int) -> tuple[int, ...]:
        size = self.bucket.batch_size
        return self.indices[dp_rank * size : (dp_rank + 1) * size]


class Planner:
    """Turns the catalogue into global batches (see the module docstring)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        buckets: BucketConfig,
        can_supply: Callable[[Mapping, int], bool],
        dp_world: int,
        seed: int = 0,
        shuffle: bool = True,
        mix_shards: int = 4,
        state: Mapping | None = None,
    ):
        self.shards = [s for s in shards if s.samples]
        self.size = sum(len(s.samples) for s in self.shards)
        if self.size == 0:
            raise ValueError("the shards hold no usable sample (see the skipped samples above)")
        self.buckets = buckets
        self.can_supply = can_supply
        self.dp_world = dp_world
        self.seed = seed
        self.shuffle = shuffle
        self.mix_shards = max(1, mix_shards)
        self.fingerprint = hashlib.sha256(
            repr([(s.url.rsplit("/", 1)[-1], [x.key for x in s.samples]) for s in self.shards]).encode()
        ).hexdigest()[:16]
        self.start = self._check_state(state)
        self.epoch_order = lru_cache(maxsize=2)(self._epoch_order)

    def _check_state(self, state: Mapping | None) -> dict:
        if not state:
            return {"next": 0, "pending": []}
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, now in (("fingerprint", self.fingerprint), ("epoch_size", self.size), ("seed", self.seed)):
            if state[key] != now:
                raise ValueError(
                    f"the data changed since the checkpoint ({key} was {state[key]!r}, is {now!r}): resuming would "
                    "repeat or skip samples. Restore the shards, or start a new run directory."
                )
        return {"next": int(state["next"]), "pending": [int(g) for g in state["pending"]]}

    def _epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, sample index) of each position of the epoch's stream."""
        shard_ids = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(shard_ids)
        order = []
        for start in range(0, len(shard_ids), self.mix_shards):
            group = [
                (s, i) for s in shard_ids[start : start + self.mix_shards] for i in range(len(self.shards[s].samples))
            ]
            if self.shuffle:
                random.Random(f"{self.seed}/epoch/{epoch}/group/{start}").shuffle(group)
            order.extend(group)
        return order

    def locate(self, g: int) -> tuple[ShardInfo, SampleInfo]:
        shard, sample = self.epoch_order(g // self.size)[g % self.size]
        return self.shards[shard], self.shards[shard].samples[sample]

    def bucket_of(self, g: int) -> Bucket | None:
        return self.buckets.assign(self.locate(g)[1].meta, random.Random(f"{self.seed}/bucket/{g}"), self.can_supply)

    def state(self, next_g: int, queues: dict[Bucket, list[int]]) -> dict:
        pending = sorted(g for queue in queues.values() for g in queue)
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "epoch_size": self.size,
            "seed": self.seed,
            "next": next_g,
            "pending": pending,
        }

    def __iter__(self) -> Iterator[GlobalBatch]:
        queues: dict[Bucket, list[int]] = {}
        for g in self.start["pending"]:  # samples that were waiting when the checkpoint was taken
            queues.setdefault(self.bucket_of(g), []).append(g)
        skipped: dict[str, int] = {}
        number, g, last_progress = 0, self.start["next"], self.start["next"]
        while True:
            bucket = self.bucket_of(g)
            if bucket is None:
                skipped["no_bucket"] = skipped.get("no_bucket", 0) + 1
                if g - last_progress > self.size:
                    raise ValueError(f"a whole epoch ({self.size} samples) fitted no bucket: {self.buckets.describe()}")
            else:
                last_progress = g
                queue = queues.setdefault(bucket, [])
                queue.append(g)
                if len(queue) == bucket.batch_size * self.dp_world:
                    queues[bucket] = []
                    yield GlobalBatch(number, bucket, tuple(queue), self.state(g + 1, queues), skipped)
                    number, skipped = number + 1, {}
            g += 1


def check_fits(shards: list[ShardInfo], buckets: BucketConfig, can_supply: Callable[[Mapping, int], bool]) -> int:
    """How many samples some bucket accepts; a ValueError saying why when none does."""
    fitting = sum(buckets.could_fit(s.meta, can_supply) for shard in shards for s in shard.samples)
    if fitting == 0:
        metas = [s.meta for shard in shards for s in shard.samples]
        if not metas:
            raise ValueError("the shards hold no usable sample")
        biggest = max(metas, key=lambda m: m["width"] * m["height"])
        longest = max(metas, key=lambda m: m["frames"])
        raise ValueError(
            f"no sample of the data ({len(metas)}) fits any bucket, so every epoch would be empty. Largest video: "
            f"{biggest['width']}x{biggest['height']} ({biggest['width'] * biggest['height']} px); longest: "
            f"{longest['frames']} frames at {longest['fps']} fps. Buckets (a video needs at least the area and the "
            f"frames at the configured fps and stride): {buckets.describe()}"
        )
    return fitting
