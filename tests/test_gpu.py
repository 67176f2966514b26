"""GPU-only checks (skipped without CUDA): the attention backends agree, the model runs in fp32 and bf16 on CUDA, a
step never waits for the GPU, and the real entry point trains ZeRO-3 on CUDA over NCCL + gloo, saves and resumes."""

import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from src.models.attention import attention, resolve_backend
from src.models.mmdit import MMDiT
from src.run.metrics import read_metrics
from tests.conftest import ROOT, clean_env, tiny_model_kwargs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_backend_uses_flash_attn_when_installed_else_cudnn_on_hopper():
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    expected = "flash" if importlib.util.find_spec("flash_attn") else ("cudnn" if hopper else "sdpa")
    assert resolve_backend("auto", torch.device("cuda")) == expected


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="cuDNN SDPA: Hopper+"
)
def test_cudnn_sdpa_matches_the_default_sdpa_in_bf16_forward_and_backward():
    qkv = [torch.randn(2, 4096, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    out = attention(*qkv, "cudnn")
    out.sum().backward()
    grads = [x.grad.clone() for x in qkv]
    for x in qkv:
        x.grad = None
    ref = attention(*qkv, "sdpa")
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for g, x in zip(grads, qkv, strict=True):
        torch.testing.assert_close(g, x.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attn_matches_sdpa_in_bf16():
    q, k, v = (torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "flash"), attention(q, k, v, "sdpa"), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("length", [4096, 4223])  # 4223: not a multiple of 128, where cuDNN < 9.15 goes wrong
@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "flash"])
def test_attention_backends_match_fp32_sdpa(backend, length):
    try:
        kind = resolve_backend(backend, torch.device("cuda"), torch.bfloat16, length)
    except ValueError as refused:  # not on this machine (no flash-attn, not Hopper, or a cuDNN wrong at this length)
        pytest.skip(str(refused))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, length, 8, 128, device="cuda") for _ in range(3))
    ref = attention(q, k, v, "sdpa")  # fp32
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=f"{backend} ran as {kind}")


def test_fp32_model_runs_on_cuda_with_the_auto_backend():
    # fp32 inputs (src.sample, parallel=local in fp32): auto must not hand them to flash-attn
    model = MMDiT(**tiny_model_kwargs()).cuda()
    out = model(
        torch.randn(2, 48, 2, 8, 8, device="cuda"),
        torch.randn(2, 5, 384, device="cuda"),
        torch.randn(2, 384, device="cuda"),
        torch.rand(2, device="cuda"),
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_model_on_cuda_matches_fp32():
    torch.manual_seed(0)
    model = MMDiT(**tiny_model_kwargs()).cuda()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 48, 2, 8, 8, device="cuda")
    txt, vec, t = (
        torch.randn(2, 5, 384, device="cuda"),
        torch.randn(2, 384, device="cuda"),
        torch.rand(2, device="cuda"),
    )
    ref = model(x, txt, vec, t)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, txt, vec, t)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_training_step_never_makes_the_host_wait_for_the_gpu():
    # what the loop does between two log lines: draw the step's noise and timesteps on the host, copy them and the
    # batch over, forward, backward, clip, fused AdamW, schedule. Any synchronising call raises in "error" mode.
    import functools

    from src.diffusion.flow import drop_text, training_inputs
    from src.parallel.local import LocalEngine
    from src.run.param_groups import warmup_schedule

    torch.manual_seed(0)
    engine = LocalEngine(
        MMDiT(**tiny_model_kwargs()),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, fused=True),
        scheduler=functools.partial(warmup_schedule, warmup_steps=10),
        device=torch.device("cuda"),
        precision="bf16",
    )
    host = {
        "latent": torch.randn(2, 48, 2, 8, 8).pin_memory(),
        "txt": torch.randn(2, 5, 384).pin_memory(),
        "vec": torch.randn(2, 384).pin_memory(),
    }
    null_txt, null_vec = torch.zeros(5, 384, device="cuda"), torch.zeros(384, device="cuda")

    def step(first_index: int) -> torch.Tensor:
        x0, txt, vec = (host[k].to("cuda", non_blocking=True) for k in ("latent", "txt", "vec"))
        x_t, t, target, drop = training_inputs(x0, torch.tensor([first_index, first_index + 1]), seed=0, drop_prob=0.5)
        txt, vec = drop_text(txt, vec, null_txt, null_vec, drop)
        loss = (engine(x_t, txt, vec, t).float() - target).pow(2).mean()
        engine.backward(loss)
        engine.step()
        return loss

    step(0)  # the first step creates the optimizer state and the kernels' caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(2 * i) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)  # read after the steps, as the loop does when it logs


def _train(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "src.train", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)


def test_the_entry_point_trains_zero3_bf16_on_cuda_over_nccl_and_gloo_saves_and_resumes(tmp_path):
    # one rank through python -m src.train: the process group carries the logged counters (CPU, gloo) beside the
    # ZeRO-3 collectives (CUDA, NCCL); every step is logged, a checkpoint at step 2 is resumed by the second run
    for steps in (2, 4):
        proc = _train(tmp_path, f"steps={steps}", "parallel.precision=bf16")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    log = (tmp_path / "train.log").read_text()
    assert "process group cpu:gloo,cuda:nccl over 1 rank(s)" in log
    assert f"resumed from {tmp_path / 'checkpoints'} at step 2" in log
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and "skipped" in r and r["peak_mem_gb"] > 0 for r in rows)
