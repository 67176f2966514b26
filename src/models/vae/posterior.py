"""The VAE posterior at training: its mode, or a sample drawn anew each time a clip is seen (Open-Sora 2.0's way).

Open-Sora's HunyuanVideo VAE encodes with `sample_posterior=True` by default: each training step sees
mean + std * eps. A `posterior: sample` feature cache therefore stores each latent's mean and standard deviation,
both in latent units (mean' = (mean - shift) * scale, std' = std * scale, so mean' + std' * eps is the scaled sample),
and the loader draws the sample per step. eps comes from a generator seeded by (run seed, global sample index): the
same draw on any number of ranks and after a resume, a new one each epoch (the index counts across epochs), and a
stream apart from the one that draws the sample's flow noise and timestep (`src.diffusion.flow.sample_generator`).
"""

from __future__ import annotations

import hashlib

import torch

POSTERIORS = ("mode", "sample")


def check_posterior(posterior: str) -> None:
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior={posterior!r}: use one of {POSTERIORS}")


def posterior_seed(seed: int, index: int) -> int:
    """The seed of one sample's posterior draw: a hash of (seed, index), unrelated to its noise seed."""
    digest = hashlib.blake2b(f"kiln/posterior/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """mean + std * eps in fp32 for one sample, mean and std (C, T', H', W'); eps ~ N(0, I) drawn on the CPU from
    (seed, index)."""
    if mean.shape != std.shape:
        raise ValueError(f"posterior mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(posterior_seed(seed, index)))
    return mean.float() + std.float() * eps.to(mean.device)
