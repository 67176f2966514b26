"""Tolerances of the numerics parity tests, derived from fp32 arithmetic instead of tuned on one CPU.

Two computations of the same function (another batch size, ZeRO-3 shards, sequence parallelism, compiled blocks, or
another ATen kernel set: ATEN_CPU_CAPABILITY=default|avx2|avx512) differ by the order of their float reductions.

Rounding model. One fp32 addition rounds by at most eps/2 of its result (EPS32 = 2^-23 = 1.19e-7); modelled as
uniform noise of standard deviation eps/sqrt(12) times the partial sum. A reduction of n terms whose partial sums stay
within the scale S of the compared tensor (max |x|) accumulates a standard deviation <= eps * S * sqrt(n / 12); the
difference of two orders <= eps * S * sqrt(n / 6). A chain of reductions (layer after layer, forward then backward)
adds up in quadrature when each layer keeps its scale (normalised blocks): n is then the sum of the accumulation
lengths of every reduction the computation runs (`accumulation_length`), which over-counts a single chain and is
therefore an upper estimate. The bound k * eps * S * sqrt(n) with K_SIGMA = 3 is 3 * sqrt(6) = 7.3 standard
deviations: a false alarm has probability < 1e-12 per element, < 1e-6 over the million elements a test compares.
Blocked and vectorised kernels (the AVX2 / AVX-512 ones) keep shorter partial sums, so they round less than this.

Adam. One AdamW update is lr * m_hat / (sqrt(v_hat) + eps_adam): near a zero gradient, a rounding-sized change of the
gradient can move it by up to `adam_ratio_bound` * lr each way (its sign is decided by rounding), so after the first
step two runs follow trajectories that the curvature of the loss keeps apart, which no arithmetic bound covers.
Parity tests therefore compare tightly what one step computes from the same state (gradients and moments, then the
update through `adam_update_atol`), and bound later weights only by what any Adam step can move them
(`adam_drift_bound`), and later losses by the weights' observed difference (first order in it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
K_SIGMA = 3.0  # k of k * eps * scale * sqrt(n): 3 * sqrt(6) = 7.3 standard deviations of a difference of two orders


def rounding_atol(scale: float | torch.Tensor, n: int, k: float = K_SIGMA) -> float:
    """k * eps * scale * sqrt(n): how far two reduction orders can put values of magnitude <= `scale` (see top)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().abs().max().item() if scale.numel() else 0.0
    return k * EPS32 * float(scale) * math.sqrt(n)


class _CountReductions(TorchFunctionMode):
    """Adds up the accumulation length of every reduction that runs (forward only; backward is estimated)."""

    def __init__(self, backward: bool):
        super().__init__()
        self.backward = backward
        self.total = 0

    def _add(self, forward: int, backward: int = 0) -> None:
        self.total += forward + (backward if self.backward else 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            x, w = args[0], args[1]
            # forward x @ W^T sums over in_features; backward: grad_x over out_features, grad_W over all rows
            self._add(w.shape[1], w.shape[0] + x.numel() // w.shape[1])
        elif func in (F.conv1d, F.conv2d, F.conv3d):
            x, w = args[0], args[1]
            groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
            window = math.prod(w.shape[2:])
            # forward: in_channels / groups x kernel volume; backward: the same transposed, and grad_W over B x space
            self._add(w.shape[1] * window, w.shape[0] // groups * window + out.numel() // out.shape[1])
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]  # (B, H, L, D)
            n = q.shape[-1] + 2 * k.shape[-2]  # q.k over D, softmax sum and weights x v over L
            self._add(n, n)
        elif func is F.layer_norm:
            n = math.prod(args[1])  # mean and variance over the normalised shape
            self._add(2 * n, 2 * n)
        elif func is torch.einsum:
            equation, operands = args[0], args[1:]
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = operands[0]
            inputs, output = equation.replace(" ", "").split("->")
            specs = zip(inputs.split(","), operands, strict=True)
            sizes = {c: s for spec, t in specs for c, s in zip(spec, t.shape, strict=True)}  # no "..." here
            n = math.prod(size for c, size in sizes.items() if c not in output)
            self._add(n, n)
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm):
            n = args[0].shape[-1]
            self._add(n, n)
        elif func in (torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean):
            x = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim is None:
                n = x.numel()
            else:
                dims = [dim] if isinstance(dim, int) else list(dim)
                n = math.prod(x.shape[d] for d in dims)
            self._add(n, n)
        elif isinstance(out, torch.Tensor) and out.is_floating_point():
            self._add(1, 1)  # an elementwise op (or a view): at most one rounding per element, fused or not
        return out


def accumulation_length(run: Callable[[], object], backward: bool = False) -> int:
    """The summed accumulation length n of every reduction `run()` performs: linear layers, convolutions,
    attention, layer norms, einsums, matmuls, sums and means, plus 1 for every other op (an elementwise op rounds
    once per element, however a compiler fuses it); with `backward`, also the reductions of the backward pass of the
    same ops (grad of inputs and of weights), estimated from the forward shapes. Run it on the shapes the compared
    computation uses; it is the n of `rounding_atol`."""
    with torch.no_grad(), _CountReductions(backward) as counter:
        run()
    return counter.total


def adam_ratio_bound(step: int, betas: Sequence[float]) -> float:
    """The largest |m_hat / sqrt(v_hat)| AdamW can reach at `step` (the moments' step count since they were zero,
    carried over from an earlier stage or not; any gradients).

    Cauchy-Schwarz on m_t = (1 - b1) sum_s b1^(t-s) g_s against v_t = (1 - b2) sum_s b2^(t-s) g_s^2, with the bias
    corrections: sqrt(1 - b2^t) / (1 - b1^t) * (1 - b1) / sqrt(1 - b2) * sqrt(sum_k<t (b1^2 / b2)^k). It is 1 at
    step 1 (the update is lr * sign(g)), 1.006 at step 4 with betas (0.9, 0.999), 7.3 in the limit.
    """
    b1, b2 = betas
    series = sum((b1 * b1 / b2) ** k for k in range(step))
    return math.sqrt(1 - b2**step) / (1 - b1**step) * (1 - b1) / math.sqrt(1 - b2) * math.sqrt(series)


def adam_drift_bound(lrs: Sequence[float], betas: Sequence[float], first_step: int = 1) -> float:
    """How far apart two AdamW runs can put one element after the steps taking learning rates `lrs`, whatever
    their gradients: each update moves it by at most adam_ratio_bound * lr (+ eps_adam's shrinking), each way."""
    return 2 * sum(lr * adam_ratio_bound(first_step + i, betas) for i, lr in enumerate(lrs))


def adam_moments_atol(
    m: torch.Tensor, v: torch.Tensor, grad_atol: float, betas: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: how far apart AdamW's moments can be after a step that both runs started from the same moments,
    when their gradients differ by at most `grad_atol`; `m`, `v` are the reference's moments after the step.

    |dm| <= (1 - b1) grad_atol and |dv| <= (1 - b2) (2 |g| grad_atol + grad_atol^2), with |g| <= sqrt(v / (1 - b2))
    (v >= (1 - b2) g^2). Plus the rounding of the update m = b1 m + (1 - b1) g on both sides, three roundings of
    eps/2 each: 2 * EPS32 * (|m| + (1 - b1) |g|); for v likewise, 2 * EPS32 * (v + (1 - b2) g^2) <= 4 * EPS32 * v.
    """
    b1, b2 = betas
    m, v = m.detach().double(), v.detach().double().clamp(min=0)
    g = (v / (1 - b2)).sqrt()
    m_atol = (1 - b1) * grad_atol + 2 * EPS32 * (m.abs() + (1 - b1) * g)
    v_atol = (1 - b2) * (2 * g * grad_atol + grad_atol**2) + 4 * EPS32 * v
    return m_atol, v_atol


def adam_update_atol(
    m: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    step: int,
    lr: float,
    betas: Sequence[float],
    eps: float,
    grad_atol: float,
) -> torch.Tensor:
    """Per element: how far apart the weights `w` can be after AdamW step `step`, when both runs started it from the
    same weights and moments and their gradients of this step differ by at most `grad_atol`; `m`, `v` are the
    reference run's moments after the step.

    The update u = lr / bc1 * m / (sqrt(v / bc2) + eps) moves with the moments: |dm| <= (1 - b1) * grad_atol and
    |dv| <= (1 - b2) * (2 |g| grad_atol + grad_atol^2) with |g| <= sqrt(v / (1 - b2)); then
    |du| <= lr / bc1 * (|dm| / (s_lo + eps) + |m| * ds / ((s_lo + eps) * (s + eps))), s = sqrt(v / bc2), ds its
    change, s_lo = max(s - ds, 0): large only where the gradient is within grad_atol of zero, and never more than
    2 * adam_ratio_bound * lr. Plus the rounding of the update and of w - u on both sides: at most 8 roundings of
    eps/2 each, 4 * EPS32 * (|w| + |u|).
    """
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    m, v, w = m.detach().double(), v.detach().double().clamp(min=0), w.detach().double()
    g = (v / (1 - b2)).sqrt()
    dm = (1 - b1) * grad_atol
    dv = (1 - b2) * (2 * g * grad_atol + grad_atol**2)
    s = (v / bc2).sqrt()
    ds = torch.minimum((dv / bc2).sqrt(), dv / bc2 / (2 * s).clamp(min=1e-300))
    s_lo = (s - ds).clamp(min=0)
    du = lr / bc1 * (dm / (s_lo + eps) + m.abs() * ds / ((s_lo + eps) * (s + eps)))
    cap = adam_ratio_bound(step, betas) * lr
    du = du.clamp(max=2 * cap)
    return du + 4 * EPS32 * (w.abs() + cap)
