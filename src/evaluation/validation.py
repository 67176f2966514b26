"""Held-out validation: which clips are held out, and the flow-matching loss on them at fixed noise and timesteps,
with the probes that tell whether the model uses time and text.

All functions here are pure (tensors in, numbers out) except that they call the velocity model they are given.

Probes, on the same clips, noise and timesteps as the validation loss:
- time: each clip's latent frames reversed. A reversed clip is a valid clip of the opposite motion, so only a model
  that binds its caption to the order of frames predicts the true order better (positive gap).
- order: each clip's latent frames in a fixed shuffled order. Any model that has learnt motion predicts smooth
  clips better; a model blind to frame order (static video, time-axis RoPE broken) shows no gap.
- text: the captions' features rolled by one across the set (every clip gets another clip's caption), and the empty
  prompt. A model that ignores its text (a wrongly loaded text encoder) shows no gap.
A gap is relative to the mean validation loss: gap = mean_i(L_probe_i - L_true_i) / mean_i(L_true_i), over clips i
(each clip's loss averaged over the timestep bins); its noise level is the standard error of that mean over clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from src.diffusion.flow import add_noise, velocity_target

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PROBES = ("time", "order", "text", "empty")


@dataclass
class ValidationSet:
    """Encoded held-out clips: x0 (N, C, T', H', W'), txt (N, L, D), vec (N, Dv); their keys and captions."""

    x0: torch.Tensor
    txt: torch.Tensor
    vec: torch.Tensor
    keys: list[str]
    captions: list[str]

    def __post_init__(self):
        if len(self.keys) < 2:
            raise ValueError(f"eval.val must be >= 2 clips (the text probe swaps captions), got {len(self.keys)}")


def shuffled(frames: int, seed: int) -> torch.Tensor:
    """A fixed permutation of `frames` (> 1) frame indices that is not the identity."""
    perm = torch.randperm(frames, generator=torch.Generator().manual_seed(seed))
    return perm.roll(1) if torch.equal(perm, torch.arange(frames)) else perm


def bin_times(bins: int) -> torch.Tensor:
    """The centre of each of `bins` equal timestep bins over [0, 1]: (bins,) float32."""
    if bins < 1:
        raise ValueError(f"eval.val_bins must be >= 1, got {bins}")
    return (torch.arange(bins, dtype=torch.float32) + 0.5) / bins


def fixed_noise(shape: tuple[int, ...], clips: int, bins: int, seed: int) -> torch.Tensor:
    """(clips, bins, *shape) N(0, 1) noise, a function of (seed, clip, bin) only."""
    out = torch.empty(clips, bins, *shape)
    for i in range(clips):
        for k in range(bins):
            out[i, k] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i * 1009 + k))
    return out


@torch.no_grad()
def loss_matrix(
    velocity: Velocity,
    x0: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    noise: torch.Tensor,
    times: torch.Tensor,
    batch: int,
    sigma_min: float = 0.0,
) -> torch.Tensor:
    """The flow-matching loss of every (clip, bin): (N, K).

    x0: (N, C, T, H, W); txt: (N, L, D); vec: (N, Dv); noise: (N, K, C, T, H, W); times: (K,). Forwards go in
    chunks of `batch` samples, in the same order on every rank (so sharded engines take part in each one).
    """
    N, K = noise.shape[:2]
    flat = [(i, k) for i in range(N) for k in range(K)]
    out = torch.empty(N, K, dtype=torch.float64)
    for first in range(0, len(flat), batch):
        ii = torch.tensor([i for i, _ in flat[first : first + batch]])
        kk = torch.tensor([k for _, k in flat[first : first + batch]])
        clean, x1 = x0[ii], noise[ii, kk].to(x0)
        t = times[kk].to(x0.device)
        x_t = add_noise(clean, x1, t, sigma_min)
        pred = velocity(x_t, txt[ii], vec[ii], t)
        err = (pred.float() - velocity_target(clean, x1, sigma_min).float()).pow(2).flatten(1).mean(1)
        out[ii, kk] = err.double().cpu()
    return out


def gap(probe: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """(relative gap, its standard error) of a probe's (N, K) losses against the true ones (see the docstring)."""
    per_clip = (probe - true).mean(1)  # (N,)
    scale = true.mean().item()
    se = per_clip.std(unbiased=True).item() / math.sqrt(len(per_clip)) if len(per_clip) > 1 else float("nan")
    return per_clip.mean().item() / scale, se / scale


def evaluate(
    velocity: Velocity,
    val: ValidationSet,
    null_txt: torch.Tensor,
    null_vec: torch.Tensor,
    bins: int = 8,
    seed: int = 0,
    batch: int = 32,
    sigma_min: float = 0.0,
) -> dict:
    """Validation loss (overall and per timestep bin) and the probe gaps, as one metrics row's fields.

    null_txt: (L, D) and null_vec: (Dv,), the empty prompt's features.
    """
    times = bin_times(bins)
    N = len(val.keys)
    noise = fixed_noise(tuple(val.x0.shape[1:]), N, bins, seed)

    def losses(x0: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return loss_matrix(velocity, x0, txt, vec, noise, times, batch, sigma_min)

    true = losses(val.x0, val.txt, val.vec)
    row = {
        "val_loss": true.mean().item(),
        "val_loss_by_t": [round(v, 6) for v in true.mean(0).tolist()],
    }
    empty_txt, empty_vec = null_txt.to(val.txt)[None].expand_as(val.txt), null_vec.to(val.vec)[None].expand_as(val.vec)
    probes = {
        "text": lambda: losses(val.x0, val.txt.roll(1, 0), val.vec.roll(1, 0)),
        "empty": lambda: losses(val.x0, empty_txt, empty_vec),
    }
    if val.x0.shape[2] > 1:  # time and order: only for clips of more than one latent frame
        probes["time"] = lambda: losses(val.x0.flip(2), val.txt, val.vec)
        probes["order"] = lambda: losses(val.x0[:, :, shuffled(val.x0.shape[2], seed)], val.txt, val.vec)
    for name in PROBES:
        if name in probes:
            g, se = gap(probes[name](), true)
            row[f"probe_{name}_gap"], row[f"probe_{name}_se"] = g, se
        else:
            row[f"probe_{name}_gap"] = row[f"probe_{name}_se"] = None
    return row
