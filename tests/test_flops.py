"""FLOP accounting against torch's FlopCounterMode, and the MFU device table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from src.config import model_config
from src.flops import peak_flops, peak_memory_gb, step_flops, token_weights
from src.models.mmdit import MMDiT
from tests.conftest import tiny_model_kwargs


def math_attention(q, k, v, backend="auto"):
    """Attention as explicit matmuls, which FlopCounterMode counts (it does not see SDPA's CPU kernel)."""
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


def counted_flops(model: MMDiT, B: int, T: int, H: int, W: int, L: int, cond: bool) -> float:
    """FlopCounterMode's count of one forward + backward."""
    x = torch.randn(B, model.in_channels, T, H, W, requires_grad=True)
    txt = torch.randn(B, L, model.txt_in.in_features, requires_grad=True)
    vec, t = torch.randn(B, model.vector_in.in_layer.in_features), torch.rand(B)
    c = torch.randn(B, model.cond_in.in_features // 4, T, H, W, requires_grad=True) if cond else None
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, txt, vec, t, c).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("cond", [None, 49])
def test_formula_matches_the_flop_counter(monkeypatch, cond):
    monkeypatch.setattr("src.models.attention.attention", math_attention)
    model = MMDiT(**tiny_model_kwargs(cond_channels=cond))
    B, shapes = 2, [(2, 8, 8, 5), (3, 4, 6, 16), (1, 8, 4, 32)]
    gaps = []
    for T, H, W, L in shapes:
        counted = counted_flops(model, B, T, H, W, L, bool(cond))
        gaps.append(counted - step_flops(model, T * (H // 2) * (W // 2), L, B))
    # what the counter sees beyond the formula is the same for every shape: the layers that run once per sample
    # (modulations, time and vector embedders), which the formula leaves out on purpose
    assert gaps[0] > 0
    assert gaps[1] == pytest.approx(gaps[0], rel=1e-9) and gaps[2] == pytest.approx(gaps[0], rel=1e-9)


def test_token_weights_of_the_11b_model():
    cfg = model_config("mmdit_11b", vae="hunyuan")
    with torch.device("meta"):
        model = MMDiT(**cfg)
    video, text = token_weights(model)
    per_sample = {"img_mod", "txt_mod", "modulation", "adaLN_modulation", "time_in", "vector_in", "txt_in"}
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not set(n.split(".")) & per_sample)
    # a video token passes through every 2-D weight except the per-sample ones and the text stream
    text_stream = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and (".txt_attn." in n or ".txt_mlp." in n)
    )
    assert video == weights - text_stream
    assert text > 0 and video > 10e9 / 2


def test_mfu_is_only_reported_for_known_devices():
    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert peak_flops(torch.device("cpu"), "bf16", declared_tflops=2.5) == 2.5e12  # `peak_tflops`: stated, not guessed
    assert peak_flops(torch.device("cpu"), "fp32", declared_tflops=2.5) is None  # the peaks are bf16 peaks
    assert peak_memory_gb(torch.device("cpu")) > 0
