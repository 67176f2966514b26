"""Random latents and text features shaped like a feature cache (`data=random_features`): training speed with no
data, no encoders and no disk. `python -m src.bench` trains on it; any experiment can (`data=random_features`).

Batches have the fields of `CachedFeatureDataset` (`latent`, `txt`, `vec`, `index`, `valid`, `bucket`, `state`,
...) so the training loop runs exactly as on a cache. Samples come from a small pool drawn once from `seed`, so a
batch costs one stack and never waits on a generator; sample indices are global and split by data-parallel rank
like the real plan, and `state` (batches consumed) resumes exactly. The features are N(0, 1), the scale of
normalised latents and text features: the numbers are meaningless, the shapes and the work are real.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from src.data.shards import plan_order_loader
from src.data.source import Batch, FeatureSpec

BUCKET = "random"


class RandomFeatureDataset(IterableDataset):
    """This rank's endless batches of `batch_size` samples: latent (B, C, T', H', W'), txt (B, L, D), vec (B, Dv)."""

    encoded = True  # the loop treats it as a feature cache: no text encoder or VAE is built

    def __init__(
        self,
        latent_shape: Sequence[int],
        text_shape: Sequence[int],
        vec_dim: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        pool: int = 8,
        state: Mapping | None = None,
        holdout: int = 0,
    ):
        super().__init__()
        for name, value in (("latent_shape", latent_shape), ("text_shape", text_shape)):
            if any(int(v) < 1 for v in value):
                raise ValueError(f"data.{name} must be positive sizes, got {list(value)}")
        if len(latent_shape) != 4 or len(text_shape) != 2:
            raise ValueError(
                f"data.latent_shape is (C, T', H', W') and data.text_shape (L, D); got {list(latent_shape)} and "
                f"{list(text_shape)}"
            )
        if batch_size < 1 or pool < 1 or vec_dim < 1:
            raise ValueError(f"batch_size, pool and vec_dim must be >= 1, got {batch_size}, {pool}, {vec_dim}")
        self.batch_size, self.dp_rank, self.dp_world = batch_size, dp_rank, dp_world
        self.latent_shapes = {BUCKET: tuple(int(v) for v in latent_shape)}  # bucket name -> (C, T', H', W')
        self.text_shape = tuple(int(v) for v in text_shape)
        self.text_dims = (self.text_shape[1], vec_dim)
        self.scan_skips: list = []
        self.seed, self.holdout = seed, holdout
        self.start = int(state["batches"]) if state else 0
        g = torch.Generator().manual_seed(seed)
        self.pool = {
            "latent": torch.randn(pool, *self.latent_shapes[BUCKET], generator=g),
            "txt": torch.randn(pool, *self.text_shape, generator=g),
            "vec": torch.randn(pool, vec_dim, generator=g),
        }

    def validation(self) -> Batch | None:
        """`holdout` random samples of their own (drawn from seed + 1, never trained on); None for 0."""
        if not self.holdout:
            return None
        g = torch.Generator().manual_seed(self.seed + 1)
        return {
            "latent": torch.randn(self.holdout, *self.latent_shapes[BUCKET], generator=g),
            "txt": torch.randn(self.holdout, *self.text_shape, generator=g),
            "vec": torch.randn(self.holdout, self.text_dims[1], generator=g),
            "caption": [""] * self.holdout,
            "key": [f"random-val-{i}" for i in range(self.holdout)],
            "bucket": BUCKET,
        }

    def feature_spec(self, text=None, vae=None) -> FeatureSpec:
        """What the features are, from the source itself (the encoders, when built for fixed prompts, are unused)."""
        null_txt, null_vec = self.null_features()
        return FeatureSpec(null_txt, null_vec, dict(self.latent_shapes), *self.text_dims)

    def null_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's features: zeros (1, L, D), (1, Dv)."""
        return torch.zeros(1, *self.text_shape), torch.zeros(1, self.text_dims[1])

    def indices(self, number: int) -> list[int]:
        """Global sample indices of this rank's part of global batch `number`."""
        first = (number * self.dp_world + self.dp_rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def batch(self, number: int) -> Batch:
        indices = self.indices(number)
        rows = torch.tensor(indices) % len(self.pool["vec"])
        return {
            **{k: v[rows] for k, v in self.pool.items()},  # (B, C, T', H', W'), (B, L, D), (B, Dv)
            "caption": [""] * len(indices),
            "key": [f"random-{i:09d}" for i in indices],
            "index": torch.tensor(indices, dtype=torch.int64),
            "valid": torch.ones(len(indices), dtype=torch.bool),
            "bucket": BUCKET,
            "state": {"batches": number + 1},
            "failed": {},
            "plan_skipped": {},
        }

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        number = self.start
        while True:
            if number % workers == worker:
                yield self.batch(number)
            number += 1


def build_random_loader(
    latent: Sequence[int],
    channels: int,
    text_tokens: int,
    txt_dim: int,
    vec_dim: int,
    batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int = 0,
    pool: int = 8,
    num_workers: int = 0,
    pin_memory: bool | str = "auto",
    state: Mapping | None = None,
    skip_dir: str | Path | None = None,
    holdout: int = 0,
    val_urls: str | None = None,
) -> DataLoader:
    """A DataLoader of random feature batches: `latent` is the latent grid (T', H', W'), `channels` its channels."""
    del skip_dir  # nothing is ever skipped
    if val_urls:
        raise ValueError(f"data=random_features draws its own validation samples; eval.val_urls={val_urls!r} is unused")
    if len(latent) != 3:
        raise ValueError(f"data.latent is the latent grid (T', H', W'), got {list(latent)}")
    dataset = RandomFeatureDataset(
        (channels, *latent), (text_tokens, txt_dim), vec_dim, batch_size, dp_rank, dp_world, seed, pool, state, holdout
    )
    return plan_order_loader(dataset, num_workers, pin_memory)
