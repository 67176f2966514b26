"""The one attention op of the model.

Every block calls an `Attention` module, which calls `attention()`; nothing else in `src/models/` computes
attention. This is the seam where kernels are chosen (PyTorch SDPA or flash-attn) and where sequence parallelism
hooks in: `src.parallel.ulysses` registers hooks on the `Attention` modules that turn sequence-sharded q, k, v
into head-sharded ones (all-to-all) and back, without the block code knowing.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "sdpa", "flash")


def flash_available(device: torch.device) -> bool:
    """True when flash-attn is importable and the tensors live on a CUDA device."""
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a configured backend name into the one that will run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "flash" if flash_available(device) else "sdpa"
    if backend == "flash" and not flash_available(device):
        raise ValueError(
            f"attention backend 'flash' needs flash-attn installed and CUDA tensors (got device {device}); "
            "install the `flash` extra or use backend 'sdpa' / 'auto'"
        )
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Full bidirectional attention over the sequence.

    q, k, v: (B, L, H, D), already normalised and rotated. Returns (B, L, H, D).
    """
    kind = resolve_backend(backend, q.device)
    if kind == "flash":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, D)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """`attention()` as a module (no parameters, so state dicts are unchanged): the place a parallel layer hooks."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, L, H, D) -> (B, L, H, D)."""
        return attention(q, k, v, self.backend)
