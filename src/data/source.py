"""What every data source (online shards, cached features, random features) tells the training loop, the same way.

A source's dataset has `encoded` (True: its batches hold `latent`, `txt`, `vec`; False: `video` and `caption`, which
the loop encodes), `feature_spec(text, vae)` below, and `validation()`: its held-out batch, or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch


class Batch(TypedDict, total=False):
    """One data-parallel rank's batch, from any source. An encoded source fills `latent`, `txt`, `vec`; an online one
    `video` and `caption` (encoded by the loop with `batch_features`). A held-out (validation) batch has only the
    content fields, `key` and `bucket`."""

    video: torch.Tensor  # (B, 3, T, H, W) in [-1, 1]
    latent: torch.Tensor  # (B, C, T', H', W')
    txt: torch.Tensor  # (B, L, D)
    vec: torch.Tensor  # (B, Dv)
    caption: list[str]
    key: list[str]
    index: torch.Tensor  # (B,) global sample numbers: the noise, timestep and dropout of each sample follow them
    valid: torch.Tensor  # (B,) bool: False where a sample failed to decode or read (its loss is ignored)
    bucket: str
    state: dict  # the plan after this batch (what a checkpoint stores to resume exactly)
    failed: dict[str, int]  # this rank's read / decode failures in this batch, by reason
    plan_skipped: dict[str, int]  # samples the plan passed over since the previous batch (the same on all ranks)


@dataclass(frozen=True)
class FeatureSpec:
    """The features a source feeds the model: the empty prompt's (for CFG and text dropout), the latent shape of
    every bucket, the text widths."""

    null_txt: torch.Tensor  # (1, L, D)
    null_vec: torch.Tensor  # (1, Dv)
    latent_shapes: dict[str, tuple[int, ...]]  # bucket name -> (C, T', H', W'), in the buckets' order
    txt_dim: int
    vec_dim: int


def bucket_latent_shapes(buckets, vae) -> dict[str, tuple[int, ...]]:
    """(C, T', H', W') of every configured bucket; a bucket the VAE cannot encode is an error naming it."""
    shapes = {}
    for bucket in buckets.all_buckets():
        try:
            shapes[bucket.name] = vae.latent_shape(bucket.num_frames, bucket.height, bucket.width)
        except ValueError as err:
            raise ValueError(f"bucket {bucket.name} does not fit the VAE: {err}") from err
    return shapes


def batch_features(batch: Batch, text, vae, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 (B, C, T', H', W'), txt (B, L, D), vec (B, Dv) of a batch: its own features (an encoded source), or its
    `video` (B, 3, T, H, W) in [-1, 1] and `caption` encoded now."""
    if "latent" in batch:
        return tuple(batch[k].to(device, non_blocking=True) for k in ("latent", "txt", "vec"))
    x0 = vae.encode(batch["video"].to(device, non_blocking=True))
    return (x0, *text(batch["caption"]))
