"""Held-out validation clips, chosen by key: the same clips on every rank count, every resume and shard order.

`eval.val: N` holds the N eligible samples with the smallest hash of (shard file name, key) out of the training
plan: they are never trained on. `eval.val_urls` names separate shards instead; N are chosen from them the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from src.data.catalog import SampleInfo, ShardInfo

Eligible = Callable[[SampleInfo], bool]


def sample_id(shard: ShardInfo, sample: SampleInfo) -> str:
    """A sample's identity for the hold-out: its shard's file name and its key."""
    return f"{shard.url.rsplit('/', 1)[-1]}/{sample.key}"


def rank_key(identity: str, salt: str = "kiln-val") -> str:
    return hashlib.sha256(f"{salt}/{identity}".encode()).hexdigest()


def choose(shards: list[ShardInfo], n: int, eligible: Eligible) -> list[tuple[ShardInfo, SampleInfo]]:
    """The `n` eligible samples with the smallest hash, in hash order; a ValueError if fewer than `n` are eligible."""
    if n < 0:
        raise ValueError(f"eval.val must be >= 0 clips, got {n}")
    pool = [(shard, s) for shard in shards for s in shard.samples if eligible(s)]
    if len(pool) < n:
        raise ValueError(f"eval.val={n} clips asked for, but only {len(pool)} samples fit the validation bucket")
    return sorted(pool, key=lambda pair: rank_key(sample_id(*pair)))[:n]


def split(
    shards: list[ShardInfo], n: int, eligible: Eligible
) -> tuple[list[ShardInfo], list[tuple[ShardInfo, SampleInfo]]]:
    """(training shards without the held-out samples, the held-out (shard, sample) pairs)."""
    held = choose(shards, n, eligible)
    if not held:
        return shards, []
    ids = {sample_id(shard, s) for shard, s in held}
    kept = [ShardInfo(sh.url, [s for s in sh.samples if sample_id(sh, s) not in ids]) for sh in shards]
    return kept, held
