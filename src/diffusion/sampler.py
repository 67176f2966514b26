"""Euler sampler for the flow-matching model with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from src.diffusion.condition import guided_velocity_i2v, image_guidance_scale, oscillating, unconditioned
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
    cond: torch.Tensor | None = None,
    image_guidance: float = 3.0,
    temporal_image_guidance: bool = True,
    oscillate: bool = True,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to t = 0.

    model(x, txt, vec, t[, cond]) -> v; noise: (B, C, T, H, W); txt: (B, L, D), vec: (B, Dv); null_*: the empty
    prompt's features (L, D) and (Dv,). Returns the clean latents (B, C, T, H, W).

    cond (B, 1 + C, T, H, W), `src.diffusion.condition.build_condition`: a model trained with I2V conditions. With
    frames given, Open-Sora's I2V denoiser: three forwards per step, (text, cond), (empty text, cond), (empty text,
    no cond), combined with the text scale `guidance` and `image_guidance` (per latent frame when
    `temporal_image_guidance`; both scales 1 on odd steps from step 10 when `oscillate`). With no frame given (a
    T2V sample of such a model) the plain two-branch guidance, the zero condition in both.
    """
    B = noise.shape[0]
    alpha = resolution_shift(*noise.shape[-3:]) if shift else 1.0
    times = time_grid(steps, alpha).to(noise.device)
    given = cond is not None and bool(cond[:, 0].any())
    branches = 3 if given else 2
    nulls = [null_txt.expand(B, -1, -1).to(txt)] * (branches - 1)
    txt_all = torch.cat([txt, *nulls])  # (branches B, L, D)
    vec_all = torch.cat([vec, *[null_vec.expand(B, -1).to(vec)] * (branches - 1)])  # (branches B, Dv)
    extra = []
    if cond is not None:
        cond = cond.to(noise)
        extra = [torch.cat([cond, cond, unconditioned(cond)] if given else [cond, cond])]  # (branches B, 1 + C, ...)
    x = noise
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        t = t_cur.expand(branches * B)
        v = model(torch.cat([x] * branches), txt_all, vec_all, t, *extra).chunk(branches)
        if given:
            text_gs = oscillating(guidance, i) if oscillate else guidance
            image_gs = oscillating(image_guidance, i) if oscillate else image_guidance
            image_gs = image_guidance_scale(image_gs, i, steps, x.shape[2], temporal_image_guidance)  # (T,)
            velocity = guided_velocity_i2v(*v, text_gs, image_gs)
        else:
            velocity = guided_velocity(*v, guidance)
        x = x + (t_next - t_cur) * velocity
    return x
