"""What every data source (online shards, cached features, random features) tells the training loop, the same way.

A source's dataset has `encoded` (True: its batches hold `latent`, `txt`, `vec`; False: `video` and `caption`, which
the loop encodes), `feature_spec(text, vae)` below, and `validation()`: its held-out batch, or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch

from src.diffusion.condition import COND_TYPES, IMAGE_KEYS, build_condition


class Batch(TypedDict, total=False):
    """One data-parallel rank's batch, from any source. An encoded source fills `latent`, `txt`, `vec`; an online one
    `video` and `caption` (encoded by the loop with `batch_features`). A held-out (validation) batch has only the
    content fields, `key` and `bucket`."""

    video: torch.Tensor  # (B, 3, T, H, W) in [-1, 1]
    latent: torch.Tensor  # (B, C, T', H', W')
    txt: torch.Tensor  # (B, L, D)
    vec: torch.Tensor  # (B, Dv)
    image_head: torch.Tensor  # (B, C, 1, H', W') the first frame encoded alone, in a cache written for I2V
    image_tail: torch.Tensor  # (B, C, 1, H', W') the last frame encoded alone
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


def training_condition(flow, batch: Batch, x0: torch.Tensor, vae, seed: int) -> torch.Tensor | None:
    """The I2V condition (B, 1 + C, T', H', W') of a batch whose clean latents are x0 (B, C, T', H', W'), each sample's
    type drawn by `flow` from (seed, its global index); None when the recipe trains text-to-video only.

    The given frames are the first / last frame encoded alone: from the cache (`image_head`, `image_tail`, written by
    `src.preprocess` for a recipe that places them) or, for online data, encoded now from the batch's `video`."""
    types = flow.condition_types(batch["index"], seed)
    if types is None:
        return None
    given = {}
    for name, key in IMAGE_KEYS.items():
        if not any(name in COND_TYPES[kind] for kind in types):
            continue
        if key in batch:
            given[name] = batch[key].to(x0.device, x0.dtype, non_blocking=True)
        elif "video" in batch:
            frame = batch["video"][:, :, :1] if name == "head" else batch["video"][:, :, -1:]  # (B, 3, 1, H, W)
            given[name] = vae.encode(frame.to(x0.device, non_blocking=True)).to(x0.dtype)
        else:
            raise ValueError(
                f"diffusion.cond {dict(flow.cond)} places the {name} frame, but the feature cache holds no {key}: "
                "write the cache again with this experiment (src.preprocess stores the images its diffusion.cond needs)"
            )
    return build_condition(types, tuple(x0.shape), given.get("head"), given.get("tail")).to(x0)
