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
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "cudnn", "flash")
# "cudnn": PyTorch SDPA trying its cuDNN kernel first (about 2x the default flash kernel on H100 at head dim 128,
# pytorch#142132), then flash, memory-efficient and math for inputs cuDNN does not take.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# cuDNN before 9.15 computes wrong attention for sequence lengths not divisible by 128 (fixed in 9.15, the first
# release torch itself prefers); Kiln's bucket and sequence-parallel lengths are rarely multiples of 128.
CUDNN_ANY_LENGTH = 91500  # torch.backends.cudnn.version() of cuDNN 9.15.0
CUDNN_BLOCK = 128
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # all flash-attn's kernels take


# Looked up once: a module search on every attention call would cost a file-system walk (and break compiled graphs).
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_CAPABILITY: dict[torch.device, tuple[int, int]] = {}  # CUDA compute capability by device, asked once


def flash_available(device: torch.device) -> bool:
    """True when flash-attn is importable and the tensors live on a CUDA device."""
    return device.type == "cuda" and HAS_FLASH_ATTN


def cudnn_attention_available(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0 or newer (Hopper, Blackwell) with cuDNN."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device)
    return _CAPABILITY[device] >= (9, 0)


def cudnn_length_ok(length: int) -> bool:
    """Whether this cuDNN computes attention over `length` tokens correctly (any length from 9.15 on)."""
    return length % CUDNN_BLOCK == 0 or (torch.backends.cudnn.version() or 0) >= CUDNN_ANY_LENGTH


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, length: int = CUDNN_BLOCK
) -> str:
    """Turn a configured backend name into the one that will run on `device` for `dtype` tensors of `length` tokens.

    auto: flash-attn when installed (CUDA) and the tensors are fp16/bf16, else SDPA with cuDNN first on Hopper and
    newer where this cuDNN handles `length`, else PyTorch's default SDPA choice (CPU: its fused CPU kernel).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if flash_available(device) and dtype in FLASH_DTYPES:
            return "flash"
        return "cudnn" if cudnn_attention_available(device) and cudnn_length_ok(length) else "sdpa"
    if backend == "flash" and not flash_available(device):
        raise ValueError(
            f"attention backend 'flash' needs flash-attn installed and CUDA tensors (got device {device}); "
            "install the `flash` extra or use backend 'sdpa' / 'auto'"
        )
    if backend == "flash" and dtype not in FLASH_DTYPES:
        raise ValueError(
            f"attention backend 'flash' takes fp16 or bf16 tensors, got {dtype}: train with "
            "parallel.precision=bf16, or use backend 'auto' (SDPA for fp32) / 'sdpa'"
        )
    if backend == "cudnn" and not cudnn_attention_available(device):
        raise ValueError(
            f"attention backend 'cudnn' needs a CUDA device of compute capability >= 9.0 with cuDNN (got {device}); "
            "use backend 'sdpa' / 'auto'"
        )
    if backend == "cudnn" and not cudnn_length_ok(length):
        raise ValueError(
            f"attention backend 'cudnn' on cuDNN {torch.backends.cudnn.version()} computes wrong attention for "
            f"{length} tokens (not a multiple of {CUDNN_BLOCK}; fixed in cuDNN 9.15): use backend 'auto' or "
            "'sdpa', or a torch build with cuDNN >= 9.15"
        )
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Full bidirectional attention over the sequence.

    q, k, v: (B, L, H, D), already normalised and rotated. Returns (B, L, H, D).
    """
    kind = resolve_backend(backend, q.device, q.dtype, q.shape[1])
    if kind == "flash":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    if kind == "cudnn":
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


class Attention(nn.Module):
    """`attention()` as a module (no parameters, so state dicts are unchanged): the place a parallel layer hooks."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, L, H, D) -> (B, L, H, D)."""
        return attention(q, k, v, self.backend)
