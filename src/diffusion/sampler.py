"""Euler sampler for the flow-matching model with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from src.diffusion.flow import resolution_shift, shift_time

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, alpha: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), warped by the same shift as training. (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got steps={steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), alpha)


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale (v_cond - v_uncond); scale 1 is the plain conditional."""
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(
    model: Velocity,
    noise: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    null_txt: torch.Tensor,
    null_vec: torch.Tensor,
    steps: int = 30,
    guidance: float = 4.0,
    shift: bool = True,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to t = 0.

    model(x, txt, vec, t) -> v; noise: (B, C, T, H, W); txt: (B, L, D), vec: (B, Dv); null_*: the empty
    prompt's features (L, D) and (Dv,). Returns the clean latents (B, C, T, H, W).
    """
    B = noise.shape[0]
    alpha = resolution_shift(*noise.shape[-3:]) if shift else 1.0
    times = time_grid(steps, alpha).to(noise.device)
    txt_all = torch.cat([txt, null_txt.expand(B, -1, -1).to(txt)])  # (2B, L, D)
    vec_all = torch.cat([vec, null_vec.expand(B, -1).to(vec)])  # (2B, Dv)
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        t = t_cur.expand(2 * B)
        v_cond, v_uncond = model(torch.cat([x, x]), txt_all, vec_all, t).chunk(2)
        x = x + (t_next - t_cur) * guided_velocity(v_cond, v_uncond, guidance)
    return x
