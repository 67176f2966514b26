"""The one seam between the training loop and a parallel engine.

An engine owns the (sharded) model, its optimizer and LR schedule. The loop only ever does:

    pred = engine(x, txt, vec, t)       # forward
    engine.backward(loss)
    grad_norm = engine.step()           # clip, optimizer step, schedule step, zero grads; a non-finite norm:
                                        # nothing applied (the NaN sentinel, src/run/sentinel.py, counts it)
    engine.count_nonfinite()            # this rank's non-finite weights: a checkpoint of them is never written
    engine.save(dir, tag, state) / state = engine.load(dir)   # save: the files only (src.integrity seals
                                        # them and moves `latest`); load: the checkpoint `latest` names
    engine.full_state_dict()            # consolidated weights on rank 0
    engine.param_groups                 # the optimizer's live groups (lr, weight_decay), in the order given
    engine.reset_optimizer_state(gs) / engine.load_moments(moments, group_steps)   # freeze schedules, stages
    engine.init_ema() / engine.update_ema(decay)   # an fp32 EMA of the trainable weights, sharded like them

Implementations: `DeepSpeedEngine` (ZeRO-1/2/3, the default), `FSDP2Engine` (torch's `fully_shard`) and
`LocalEngine` (plain PyTorch, one process: the reference that sharded runs are tested against). Each applies the
shared model transforms first (`src.parallel.transforms.prepare_model`). A backend is imported only when its config
is chosen.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from src.parallel.formats import CheckpointReader

PRECISIONS = ("fp32", "bf16")
log = logging.getLogger(__name__)


class Engine(Protocol):
    module: nn.Module
    checkpoint_format: ClassVar[type[CheckpointReader]]  # reads its checkpoints offline (`src.parallel.formats`)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor | float: ...

    def count_nonfinite(self) -> int: ...

    def lr(self) -> float: ...

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None: ...

    def load(self, ckpt_dir: Path) -> dict | None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...

    @property
    def param_groups(self) -> list[dict]: ...

    def reset_optimizer_state(self, groups: Sequence[int]) -> None: ...

    def init_ema(self) -> None: ...

    def update_ema(self, decay: float) -> None: ...

    def load_moments(
        self, moments: Iterable[tuple[str, torch.Tensor, torch.Tensor]], steps: dict[int, int]
    ) -> None: ...


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 0, group_factors: Callable[[int, int], float] | None = None
) -> LambdaLR:
    """Linear warmup from lr / warmup_steps to lr over `warmup_steps` steps, then constant (Open-Sora).

    `group_factors(group, step)` multiplies each param group's LR (freeze rules, lr_scale and per-group warmup
    from `src.run.param_groups.ParamPlan.lr_factor`).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(group: int, step: int) -> float:
        base = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return base * (group_factors(group, step) if group_factors else 1.0)

    return LambdaLR(optimizer, [functools.partial(factor, g) for g in range(len(optimizer.param_groups))])


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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named in `ckpt_dir/latest`, or None when there is no checkpoint yet.

    Raises ValueError when `latest` names a checkpoint folder that does not exist.
    """
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise ValueError(
            f"{latest} is empty, so it names no checkpoint (a save was interrupted while writing it): "
            "resume=latest_intact resumes from the newest intact checkpoint"
        )
    if not (Path(ckpt_dir) / tag).is_dir():
        found = sorted(p.name for p in Path(ckpt_dir).glob("step_*"))
        raise ValueError(f"{latest} names {tag!r}, which does not exist; checkpoints present: {found}")
    return tag


def refuse_unreadable(ckpt_dir: Path, tag: str, err: Exception) -> ValueError:
    """The error for a checkpoint that exists but cannot be read: never train on from a half-loaded state."""
    return ValueError(
        f"checkpoint {Path(ckpt_dir) / tag} cannot be loaded ({type(err).__name__}: {err}); "
        "it is not used. Restore it, or resume from the newest intact checkpoint with resume=latest_intact."
    )
