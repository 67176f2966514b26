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

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from src.parallel.formats import CheckpointReader

PRECISIONS = ("fp32", "bf16")


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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
