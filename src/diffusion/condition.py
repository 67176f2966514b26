"""Image-to-video conditioning as Open-Sora 2.0 trains and samples it, as pure functions.

Each training sample draws one condition type, with the configured weights (`diffusion.cond`, e.g. Open-Sora's stage-2
mixture {t2v: 1, i2v_head: 5, i2v_loop: 1, i2v_tail: 1}):

    t2v       nothing given: mask 0 everywhere, condition latent 0
    i2v_head  the first frame given: mask 1 on latent frame 0
    i2v_tail  the last frame given: mask 1 on the last latent frame
    i2v_loop  both: mask 1 on the first and the last latent frame

The model's `cond` input is cat(mask (1 channel), mask * placed latent (C channels)) on the channel axis, mask first,
as Open-Sora's `prepare_visual_condition_*` builds it. The given frames are latents of the image encoded alone (never
the clip's own latent frames, which carry later frames too): `image_head` = VAE(first frame), `image_tail` = VAE(last
frame), each (B, C, 1, H', W'). The draw is seeded by (run seed, global sample index), apart from the flow noise, so
any split over ranks and any resume draw the same types. Text dropout is drawn independently of the type.

At sampling, the same condition goes into three forwards: (text, condition), (empty text, condition) and (empty text,
no condition), combined as Open-Sora's I2V denoiser does (`guided_velocity_i2v`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

# Which given images each type places: "head" at latent frame 0, "tail" at the last latent frame
COND_TYPES: dict[str, tuple[str, ...]] = {
    "t2v": (),
    "i2v_head": ("head",),
    "i2v_tail": ("tail",),
    "i2v_loop": ("head", "tail"),
}
IMAGE_KEYS = {"head": "image_head", "tail": "image_tail"}  # batch / feature-cache keys of the given latents


def check_weights(weights: Mapping[str, float] | None) -> dict[str, float] | None:
    """The condition mixture as a plain dict, or None (text-to-video only). ValueError naming a type Kiln does not
    know, a negative weight or an all-zero mixture."""
    if weights is None:
        return None
    weights = {str(k): float(v) for k, v in dict(weights).items()}
    unknown = sorted(set(weights) - set(COND_TYPES))
    if unknown:
        raise ValueError(f"diffusion.cond: unknown condition types {unknown}; valid: {sorted(COND_TYPES)}")
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
        raise ValueError(f"diffusion.cond: weights must be >= 0, got {negative}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"diffusion.cond: at least one weight must be positive, got {weights}")
    return weights


def needed_images(weights: Mapping[str, float] | None) -> tuple[str, ...]:
    """The given images ("head", "tail") that some type of positive weight places: what a cache must store."""
    if not weights:
        return ()
    return tuple(name for name in ("head", "tail") if any(name in COND_TYPES[k] for k, w in weights.items() if w > 0))


def cond_seed(seed: int, index: int) -> int:
    """The seed of one sample's condition-type draw: a hash of (seed, index), unrelated to its noise seed."""
    digest = hashlib.blake2b(f"kiln/cond/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def draw_types(weights: Mapping[str, float], indices: torch.Tensor, seed: int) -> list[str]:
    """One condition type per sample, P(type) = weight / sum of weights, from (seed, global sample index) alone."""
    names = list(weights)
    probs = torch.tensor([weights[n] for n in names], dtype=torch.float64)
    cdf = torch.cumsum(probs / probs.sum(), 0)
    cdf[-1] = 1.0  # no rounding gap above the last type
    types = []
    for index in indices.tolist():
        u = torch.rand(1, generator=torch.Generator().manual_seed(cond_seed(seed, index)), dtype=torch.float64)
        types.append(names[int(torch.searchsorted(cdf, u, right=True).clamp(max=len(names) - 1))])
    return types


def build_condition(
    types: list[str],
    latent_shape: tuple[int, ...],
    head: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's `cond` (B, 1 + C, T', H', W') for one condition type per sample: cat(mask, mask * given latents).

    latent_shape: (B, C, T', H', W') of the video latents; head / tail: (B, C, 1, H', W') latents of the first and
    last frame encoded alone (needed when a sample's type places them; their device and dtype are the result's).
    """
    B, C, T, H, W = latent_shape
    if len(types) != B:
        raise ValueError(f"{len(types)} condition types for a batch of {B}")
    given = {"head": head, "tail": tail}
    like = next((g for g in given.values() if g is not None), None)
    device, dtype = (like.device, like.dtype) if like is not None else (torch.device("cpu"), torch.float32)
    mask = torch.zeros(B, 1, T, H, W, device=device, dtype=dtype)
    placed = torch.zeros(B, C, T, H, W, device=device, dtype=dtype)
    for name, image in given.items():
        rows = [i for i, kind in enumerate(types) if name in COND_TYPES[kind]]
        if not rows:
            continue
        if image is None:
            raise ValueError(f"condition types {sorted({types[i] for i in rows})} need the {name} image latents")
        if tuple(image.shape) != (B, C, 1, H, W):
            raise ValueError(f"{name} image latents {tuple(image.shape)}, expected {(B, C, 1, H, W)}")
        frame = 0 if name == "head" else T - 1
        mask[rows, :, frame] = 1
        placed[rows, :, frame] = image[rows, :, 0]  # i2v_loop with T' = 1: the tail overwrites the head
    return torch.cat([mask, mask * placed], dim=1)  # (B, 1 + C, T', H', W')


def unconditioned(cond: torch.Tensor) -> torch.Tensor:
    """The t2v condition of the same shape: no frame given (mask and latents 0), the image-free branch of guidance."""
    return torch.zeros_like(cond)


def image_guidance_scale(scale: float, step: int, steps: int, frames: int, temporal: bool = True) -> torch.Tensor:
    """Open-Sora's image-guidance scale per latent frame at Euler step `step` of `steps`: (T',).

    With `temporal` (Open-Sora's `scale_temporal_osci`, on in its inference configs) and scale > 1, the step's upper
    scale falls linearly from `scale` at the first step towards 1 at the last (`linspace(scale, 1, steps + 1)[step]`),
    and across the clip it rises from 1 on the first latent frame (the given image) to that upper scale on the last.
    """
    if temporal and scale > 1.0:
        upper = float(torch.linspace(scale, 1.0, steps + 1, dtype=torch.float64)[step])
        return torch.linspace(1.0, upper, frames, dtype=torch.float64).float()
    return torch.full((frames,), float(scale))


def oscillating(scale: float, step: int, from_step: int = 10) -> float:
    """Open-Sora's guidance oscillation: the full scale before `from_step` and on even steps, 1 on odd steps after."""
    return scale if step < from_step or step % 2 == 0 else 1.0


def guided_velocity_i2v(
    v_full: torch.Tensor,
    v_no_text: torch.Tensor,
    v_none: torch.Tensor,
    text_scale: float,
    image_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Open-Sora's two-scale guidance: v_none + s_img (v_no_text - v_none) + s_txt (v_full - v_no_text).

    v_full: text and image given; v_no_text: empty text, image given; v_none: neither; each (B, C, T', H', W').
    image_scale: a number or (T',) per latent frame. Both scales 1 give v_full."""
    if isinstance(image_scale, torch.Tensor):
        image_scale = image_scale.to(v_full).view(1, 1, -1, 1, 1)
    return v_none + image_scale * (v_no_text - v_none) + text_scale * (v_full - v_no_text)


def place_given(z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The sampled latents with the given frames put back where the mask is 1 (Open-Sora does this before decoding).

    z: (B, C, T', H', W'); cond: (B, 1 + C, T', H', W') from `build_condition`."""
    mask, given = cond[:, :1].to(z), cond[:, 1:].to(z)
    return torch.where(mask > 0, given, z)


def cond_channels(model: torch.nn.Module) -> int | None:
    """The channels per latent voxel the model's `cond_in` takes (1 + C for Open-Sora's condition), or None without
    one. Read from the layer's declared shape, so a sharded or meta-device model answers too."""
    cond_in = getattr(model, "cond_in", None)
    return None if cond_in is None else cond_in.in_features // math.prod(model.patch_size)


def check_condition_input(model: torch.nn.Module, weights: Mapping[str, float] | None, latent_channels: int) -> None:
    """ValueError unless a recipe with a condition feeds a model whose `cond_in` takes 1 + C channels per latent voxel
    (the mask and the C latent channels), naming both values and the fix. A model with `cond_in` may train T2V only."""
    if weights is None:
        return
    channels = cond_channels(model)
    if channels != 1 + latent_channels:
        raise ValueError(
            f"diffusion.cond {dict(weights)} feeds the model cat(mask, masked latent): 1 + {latent_channels} channels, "
            f"but its cond_in takes {channels}; set model.cond_channels={1 + latent_channels}"
        )
