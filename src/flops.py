"""Honest FLOP accounting for the MMDiT, and model FLOPs utilisation (MFU).

Model FLOPs of one training step (forward + backward), per sample:

    6 x (matmul weights each token passes through) x tokens  +  12 x layers x hidden x sequence^2

Video tokens pass through `img_in` (and `cond_in`), the video stream of every double block, every single
block and `final_layer.linear`; text tokens through `txt_in`, the text stream of every double block and every
single block. Layers that run once per sample (the adaLN modulations, `time_in`, `vector_in`) are left out, as
are biases, norms and RoPE. Attention is full and bidirectional over text + video tokens in every block.
Recomputation by activation checkpointing is not counted: MFU measures useful work.
"""

from __future__ import annotations

import resource

import torch

# bf16 dense tensor-core peaks (FLOP/s) by device-name fragment; the first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("A100", 312e12),
)


def token_weights(model) -> tuple[int, int]:
    """(matmul weights a video token passes through, matmul weights a text token passes through)."""
    hidden = model.img_in.out_features
    patch_dim = model.img_in.in_features
    mlp = model.double_blocks[0].img_mlp[0].out_features if len(model.double_blocks) else 4 * hidden
    stream = 4 * hidden * hidden + 2 * hidden * mlp  # q, k, v, proj + the MLP of one stream of a double block
    single = 2 * hidden * hidden + 2 * hidden * (hidden + mlp)  # q, k, v_mlp, linear2
    blocks = len(model.single_blocks) * single
    video = patch_dim * hidden + len(model.double_blocks) * stream + blocks + hidden * patch_dim
    if model.cond_in is not None:
        video += model.cond_in.in_features * hidden
    text = model.txt_in.in_features * hidden + len(model.double_blocks) * stream + blocks
    return video, text


def step_flops(model, video_tokens: int, text_tokens: int, samples: int) -> float:
    """Model FLOPs of `samples` samples of one shape through forward and backward."""
    w_video, w_text = token_weights(model)
    hidden = model.img_in.out_features
    layers = len(model.double_blocks) + len(model.single_blocks)
    seq = video_tokens + text_tokens
    per_sample = 6 * (w_video * video_tokens + w_text * text_tokens) + 12 * layers * hidden * seq * seq
    return float(per_sample) * samples


def peak_flops(device: torch.device, precision: str, declared_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when it is not in the table (or not bf16): no guessed MFU.

    `declared_tflops` (the `peak_tflops` knob) is the user's statement of the peak of a device the table lacks; it
    never overrides a device the table knows."""
    if precision != "bf16":
        return None
    if device.type != "cuda":
        return declared_tflops * 1e12 if declared_tflops else None
    name = torch.cuda.get_device_name(device)
    known = next((peak for fragment, peak in PEAK_BF16 if fragment in name), None)
    if known and declared_tflops and abs(declared_tflops * 1e12 - known) > 1e9:
        raise ValueError(f"peak_tflops={declared_tflops} but {name} is known to peak at {known / 1e12:g} TFLOP/s bf16")
    return known or (declared_tflops * 1e12 if declared_tflops else None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
