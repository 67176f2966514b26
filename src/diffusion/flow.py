"""Rectified-flow maths of the Open-Sora 2.0 recipe, as pure functions (tensors in, tensors out).

Convention: t = 0 is data (x0), t = 1 is noise (x1); the network predicts the velocity dx_t/dt = x1 - x0
(with the recipe's sigma_min: x1 - (1 - sigma_min) x0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from src.diffusion.condition import check_weights, draw_types


def resolution_shift(latent_t: int, latent_h: int, latent_w: int) -> float:
    """Timestep shift alpha for a latent of (T, H, W).

    alpha = lin(x=256 -> 1, x=4096 -> 3)(H * W / 4) * sqrt(T): bigger and longer videos are noised harder.
    """
    x = latent_h * latent_w / 4
    slope = (3.0 - 1.0) / (4096 - 256)
    return (1.0 + slope * (x - 256)) * math.sqrt(latent_t)


def shift_time(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Warp t in [0, 1] towards noise: alpha t / (1 + (alpha - 1) t). alpha = 1 is the identity."""
    if alpha <= 0:
        raise ValueError(f"timestep shift alpha must be positive, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


def sample_logit_normal(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(u), u ~ N(mean, std^2). Returns (n,) float32 in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def add_noise(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0) -> torch.Tensor:
    """x_t = (1 - (1 - sigma_min) t) x0 + t x1. x0 data, x1 noise, both (B, ...); t: (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - (1 - sigma_min) * t) * x0 + t * x1


def velocity_target(x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = 0.0) -> torch.Tensor:
    """d x_t / d t = x1 - (1 - sigma_min) x0."""
    return x1 - (1 - sigma_min) * x0


def drop_text(
    txt: torch.Tensor,
    vec: torch.Tensor,
    null_txt: torch.Tensor,
    null_vec: torch.Tensor,
    drop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the text features of the samples where `drop` is True by the null (empty-prompt) features.

    txt: (B, L, D), vec: (B, Dv), null_txt: (L, D), null_vec: (Dv,), drop: (B,) bool.
    Trains the unconditional branch used by classifier-free guidance.
    """
    keep = ~to_device(drop, txt, torch.bool)
    txt = torch.where(keep[:, None, None], txt, null_txt.to(txt)[None])
    vec = torch.where(keep[:, None], vec, null_vec.to(vec)[None])
    return txt, vec


def noise_seed(seed: int, index: int) -> int:
    """The seed of one training sample's noise, timestep and text dropout: a function of (run seed, global index)."""
    return (seed * 1_000_003 + index) % (2**63)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for one training sample: noise and timesteps depend only on (seed, global index),
    so any split of the global batch over ranks, and any resume, draws exactly the same numbers."""
    return torch.Generator().manual_seed(noise_seed(seed, index))


def to_device(x: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `like`'s device (in `dtype`, default `like`'s) without making the host wait for the GPU:
    pinned, then copied asynchronously in stream order."""
    if like.device.type == "cuda":
        x = x.pin_memory()
    return x.to(like.device, dtype or like.dtype, non_blocking=True)


def training_inputs(
    x0: torch.Tensor,
    indices: torch.Tensor,
    seed: int,
    shift: bool = True,
    sigma_min: float = 0.0,
    drop_prob: float = 0.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything random in one training step, drawn per sample from (seed, global sample index).

    x0: (B, C, T, H, W) clean latents. Returns (x_t, t, target, drop) with x_t and target like x0,
    t: (B,) shifted times, drop: (B,) bool mask for text dropout.
    """
    noise, times, drop = [], [], []
    for index in indices.tolist():
        g = sample_generator(seed, index)
        noise.append(torch.randn(x0.shape[1:], generator=g))
        times.append(sample_logit_normal(1, g, logit_mean, logit_std))
        drop.append(torch.rand(1, generator=g) < drop_prob)
    x1 = to_device(torch.stack(noise), x0)
    t = to_device(torch.cat(times), x0, torch.float32)
    if shift:
        t = shift_time(t, resolution_shift(*x0.shape[-3:]))
    return add_noise(x0, x1, t, sigma_min), t, velocity_target(x0, x1, sigma_min), torch.cat(drop)


@dataclass(frozen=True)
class FlowMatching:
    """The configured recipe (`conf/diffusion/`): binds the pure functions above to its settings."""

    shift: bool = True
    sigma_min: float = 1e-5
    text_dropout: float = 0.316
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond: Mapping[str, float] | None = None  # I2V condition types and their weights (src/diffusion/condition.py)

    def __post_init__(self):
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be a probability in [0, 1], got {self.text_dropout}")
        object.__setattr__(self, "cond", check_weights(self.cond))

    def condition_types(self, indices: torch.Tensor, seed: int) -> list[str] | None:
        """Each sample's condition type (B,), drawn from (seed, global sample index); None for a T2V-only recipe."""
        return None if self.cond is None else draw_types(self.cond, indices, seed)

    def training_inputs(self, x0: torch.Tensor, indices: torch.Tensor, seed: int):
        """(x_t, t, target, drop) for clean latents x0 (B, C, T, H, W) of the samples `indices` (B,)."""
        return training_inputs(
            x0, indices, seed, self.shift, self.sigma_min, self.text_dropout, self.logit_mean, self.logit_std
        )

    def training_losses(
        self,
        model,
        x0: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        indices: torch.Tensor,
        seed: int,
        null_txt: torch.Tensor,
        null_vec: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One batch's per-sample flow-matching losses: {"loss": (B,) MSE of the velocity, "t": (B,) times}.

        model(x_t, txt, vec, t[, cond]) -> velocity like x0 (B, C, T, H, W); txt (B, L, D), vec (B, Dv); the empty
        prompt's null_txt (L, D), null_vec (Dv,) replace the text of the samples drawn for text dropout, whatever
        their condition; cond (B, 1 + C, T, H, W): the I2V condition (`condition.build_condition`), or None. As in
        Open-Sora, every latent frame is noised and counts in the loss, the given ones too.
        """
        x_t, t, target, drop = self.training_inputs(x0, indices, seed)
        txt, vec = drop_text(txt, vec, null_txt, null_vec, drop)
        pred = model(x_t, txt, vec, t) if cond is None else model(x_t, txt, vec, t, cond)  # (B, C, T, H, W)
        return {"loss": (pred.float() - target.float()).pow(2).flatten(1).mean(1), "t": t}
