"""What every engine keeps beside the weights, written once: the EMA maths (decay schedule, update, the checks on
resume) and AdamW state created for moments carried in from another run."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay after `step` optimizer steps (1-based): `decay`, or with warmup min(decay, (1 + step) / (10 + step)),
    so that the average is not dominated by the initial weights early in a run."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {decay}")
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * current, in fp32, tensor by tensor."""
    for e, c in zip(ema, current, strict=True):
        e.lerp_(c.detach().float(), 1.0 - decay)


def check_ema(saved, fresh, where):
    """The EMA to resume with: the saved one, or (a checkpoint from a run without EMA) the current weights.

    Raises ValueError when the saved EMA does not have the fresh one's layout (names or shapes)."""
    if saved is None:
        log.warning("%s holds no EMA (the run had ema: null): the EMA starts again from the current weights", where)
        return fresh

    def layout(ema):  # names and shapes (plain engine), or the shard shapes (ZeRO)
        return {k: tuple(v.shape) for k, v in ema.items()} if isinstance(ema, dict) else [t.shape for t in ema]

    if layout(saved) != layout(fresh):
        raise ValueError(f"{where}: the saved EMA does not match this model's trainable parameters")
    return saved


def init_moments(optimizer: torch.optim.Optimizer, tensors: Iterable[torch.Tensor], step: int) -> None:
    """Create AdamW state (step, zero moments) for `tensors`, so that carried-over moments can be written in.

    The step counter sits where torch's AdamW keeps it: on the parameter's device for the fused (and capturable)
    kernels, on the host otherwise."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for t in tensors:
        optimizer.state[t] = {
            "step": torch.tensor(float(step), device=t.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format),
        }
