"""Fault drills: break a run on purpose to watch the sentinel act (`faults:` in conf/train.yaml; docs/design.md).

    torchrun ... -m src.train +experiment=smoke faults.nan_samples=[00000003] faults.inf_grad_steps=[5]

- `nan_samples`: these samples' latents are NaN whenever they are drawn (what a corrupt cache entry or a VAE
  overflow gives): the step's loss is NaN and the step is skipped; once quarantined they are never drawn again.
- `inf_grad_steps`: at these steps (1-based, the step being computed) the gradient reaching the model's output is
  made infinite while the loss stays finite (what an overflow in backward gives): the step is skipped.
- `lr`: for the third drill, the absurd learning rate, no fault is needed: `optim.optimizer.lr=1e4`.

Both are off (empty) by default and cost nothing then.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Faults:
    def __init__(self, nan_samples: Sequence[str] = (), inf_grad_steps: Sequence[int] = ()):
        self.nan_samples = {str(k) for k in nan_samples}
        self.inf_grad_steps = {int(s) for s in inf_grad_steps}
        self._armed = False

    def install(self, model: nn.Module) -> None:
        """Hook the model's output, so that an armed step's output gradient becomes infinite."""
        if self.inf_grad_steps:
            model.register_forward_hook(self._poison_gradient)

    def _poison_gradient(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self._armed and output.requires_grad:
            output.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    def arm(self, step: int) -> None:
        """Called before the forward of `step` (1-based): poison its gradient if it is listed."""
        self._armed = step in self.inf_grad_steps

    def corrupt(self, x0: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """x0 (B, C, T', H', W') with the listed samples' latents replaced by NaN."""
        hit = [i for i, k in enumerate(keys) if str(k) in self.nan_samples]
        if not hit:
            return x0
        x0 = x0.clone()
        x0[hit] = float("nan")
        return x0
