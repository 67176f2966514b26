"""The speed benchmark on CPU (tiny shapes): Kiln's real loop on random features against diffusers' Flux model.
(On a GPU the same command runs the target shapes: docs/BENCHMARKS.md.)"""

import json
import subprocess
import sys

import pytest
import torch

from src.data.random_features import RandomFeatureDataset, build_random_loader
from src.models.mmdit import MMDiT
from tests.conftest import ROOT, clean_env, tiny_model_kwargs


def test_random_features_split_by_data_parallel_rank_and_resume():
    ranks = [RandomFeatureDataset((4, 2, 8, 8), (5, 16), 6, batch_size=3, dp_rank=r, dp_world=2) for r in (0, 1)]
    first = [next(iter(d)) for d in ranks]
    assert first[0]["latent"].shape == (3, 4, 2, 8, 8) and first[0]["txt"].shape == (3, 5, 16)
    assert first[0]["vec"].shape == (3, 6) and first[0]["valid"].all()
    assert first[0]["index"].tolist() == [0, 1, 2] and first[1]["index"].tolist() == [3, 4, 5]  # global indices
    assert not torch.equal(first[0]["latent"], first[1]["latent"])  # different samples on different ranks
    # the same seed draws the same pool; a resumed dataset continues from the batch after its state
    stream = iter(RandomFeatureDataset((4, 2, 8, 8), (5, 16), 6, batch_size=3))
    batches = [next(stream) for _ in range(3)]
    resumed = next(iter(RandomFeatureDataset((4, 2, 8, 8), (5, 16), 6, batch_size=3, state=batches[1]["state"])))
    assert resumed["index"].tolist() == batches[2]["index"].tolist() == [6, 7, 8]
    assert torch.equal(resumed["latent"], batches[2]["latent"]) and torch.equal(resumed["txt"], batches[2]["txt"])
    assert ranks[0].null_features()[0].shape == (1, 5, 16) and ranks[0].latent_shapes == {"random": (4, 2, 8, 8)}


def test_random_features_refuse_impossible_shapes():
    with pytest.raises(ValueError, match=r"data.latent is the latent grid \(T', H', W'\), got \[8, 8\]"):
        build_random_loader([8, 8], 4, 5, 16, 6, 2, dp_rank=0, dp_world=1)
    with pytest.raises(ValueError, match=r"data.latent_shape must be positive sizes, got \[4, 0, 8, 8\]"):
        RandomFeatureDataset((4, 0, 8, 8), (5, 16), 6, batch_size=1)
    with pytest.raises(ValueError, match="data.pin_memory must be true, false or auto, got 'yes'"):
        build_random_loader([2, 8, 8], 4, 5, 16, 6, 2, dp_rank=0, dp_world=1, pin_memory="yes")


def test_bench_runs_kiln_and_the_diffusers_baseline_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "src.bench", "--model", "mmdit_tiny", "--latent", "2", "8", "8"]
    cmd += ["--text-tokens", "8", "--batch", "2", "--steps", "6", "--log-every", "2", "--profile", "2"]
    cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    (kiln_name, kiln), (base_name, base) = report["results"].items()
    # the default engine, really started; the baseline really diffusers' class, of exactly Kiln's size
    assert kiln_name == "Kiln (DeepSpeedEngine, bf16, 1 rank)"
    assert base_name.startswith("diffusers FluxTransformer2DModel")
    assert base["parameters"] == MMDiT(**tiny_model_kwargs()).num_params()
    assert report["tokens_per_sample"] == {"video": 2 * 4 * 4, "text": 8}
    for r in (kiln, base):
        assert r["windows"] == 2  # 3 windows of 2 steps, the first left out as warm-up
        assert r["tokens_per_s_per_device"] > 0 and r["step_time_s"] > 0 and r["peak_mem_gb"] > 0
        assert r["mfu"] is None  # a CPU has no peak in the table
        # both count the same FLOPs per token: FLOP/s over tokens/s is the same number for both runs
        assert r["tflops_per_device"] * 1e12 / r["tokens_per_s_per_device"] == pytest.approx(
            kiln["tflops_per_device"] * 1e12 / kiln["tokens_per_s_per_device"], rel=0.05
        )
    ratio = kiln["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
    assert report["ratio_kiln_over_baseline"] == pytest.approx(ratio)
    assert f"Kiln / baseline tokens/s: {ratio:.2f}x" in proc.stdout
    assert "| run | tokens/s/device | MFU |" in proc.stdout

    # the profiled steps (3 and 4, inside the measured windows): where the time went, adding up to the step
    profile = report["profile"]
    assert profile["steps"] == 2 and profile["seconds_per_step"]["matmul"] > 0
    assert profile["seconds_per_step"]["attention"] > 0 and profile["seconds_per_step"]["optimizer"] > 0
    assert sum(profile["seconds_per_step"].values()) == pytest.approx(profile["step_time_s"], rel=1e-6)
    assert "where a step's" in proc.stdout


def test_profiler_categories():
    from src.run.profiler import HOST, categorize

    cases = {
        ("aten::_scaled_dot_product_flash_attention_for_cpu", False): "attention",
        ("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", True): "attention",
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", True): "attention",
        ("aten::mm", False): "matmul",
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", True): "matmul",
        ("ncclDevKernel_AllGather_RING_LL", True): "communication",
        ("gloo:all_reduce", False): "communication",
        ("aten::_fused_adamw_", False): "optimizer",
        ("Memcpy HtoD (Pinned -> Device)", True): "memory copies",
        ("aten::gelu", False): "other ops (elementwise, norms, reductions)",
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", True): (
            "other ops (elementwise, norms, reductions)"
        ),
        ("ProfilerStep#3", False): HOST,
        ("autograd::engine::evaluate_function: MulBackward0", False): HOST,
    }
    for (name, kernel), category in cases.items():
        assert categorize(name, kernel) == category, name


def _gpu_trace():
    """One 1 ms step as kineto records it on a GPU: CPU ops that carry their kernels' device time, the kernels as
    events of their own, a memcpy, and the profiler's step range on both timelines (a GPU user annotation)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def cpu(i, name, start, end, kernels=(), annotation=False):
        event = FunctionEvent(i, name, 0, start, end, stack=[], use_device="cuda", is_user_annotation=annotation)
        for kernel, duration in kernels:
            event.append_kernel(kernel, 0, duration)
        return event

    def gpu(i, name, start, end, annotation=False):
        return FunctionEvent(
            i,
            name,
            7,
            start,
            end,
            stack=[],
            use_device="cuda",
            device_type=DeviceType.CUDA,
            is_user_annotation=annotation,
        )

    gemm, flash, copy = "sm90_xmma_gemm_bf16bf16_bf16f32", "flash_fwd_kernel", "Memcpy HtoD (Pinned -> Device)"
    step = cpu(0, "ProfilerStep#1", 0, 1000, annotation=True)
    ops = [
        cpu(1, "aten::mm", 10, 60, [(gemm, 300)]),
        cpu(2, "aten::_flash_attention_forward", 60, 90, [(flash, 200)]),
        cpu(3, "aten::copy_", 0, 10, [(copy, 50)]),
    ]
    kernels = [gpu(4, copy, 20, 70), gpu(5, gemm, 100, 400), gpu(6, flash, 400, 600)]
    trace = EventList([step, *ops, *kernels, gpu(7, "ProfilerStep#1", 20, 600, annotation=True)])
    trace._build_tree()  # parents and children from the time ranges, as torch.profiler does
    return trace.key_averages()


def test_gpu_profile_counts_each_kernel_once():
    from src.run.profiler import breakdown

    report = breakdown(_gpu_trace(), steps=1, wall_s=1e-3, device=torch.device("cuda"))
    seconds = report["seconds_per_step"]
    assert seconds == pytest.approx({"matmul": 300e-6, "attention": 200e-6, "memory copies": 50e-6, "GPU idle": 450e-6})
    assert sum(seconds.values()) == pytest.approx(report["step_time_s"])
    assert [op["name"] for op in report["top_ops"]] == [
        "sm90_xmma_gemm_bf16bf16_bf16f32",
        "flash_fwd_kernel",
        "Memcpy HtoD (Pinned -> Device)",
    ]


def test_cpu_profile_counts_cpu_events_only():
    from src.run.profiler import HOST, OUTSIDE, breakdown

    seconds = breakdown(_gpu_trace(), steps=1, wall_s=2e-3, device=torch.device("cpu"))["seconds_per_step"]
    # the same ops' own CPU time; the step range's self time is host time; the kernels are not CPU events
    assert seconds == pytest.approx(
        {"matmul": 50e-6, "attention": 30e-6, "memory copies": 10e-6, HOST: 910e-6, OUTSIDE: 1000e-6}
    )


def test_a_run_on_random_features_without_checkpoints_profiles_its_steps(tmp_path, monkeypatch):
    # in-process, the local engine: what the bench asks of src.train (ckpt_every=0, profile.steps) and a `null` MFU
    from hydra import compose, initialize_config_dir

    from src.parallel.dist import shutdown
    from src.run.metrics import read_metrics
    from src.train import train

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by the one-process group,
        monkeypatch.delenv(var, raising=False)  # and taken away again after the test
    overrides = ["data=random_features", "parallel=local", "steps=4", "log_every=2", "ckpt_every=0"]
    overrides += ["profile.steps=2", "profile.start=1", "eval.prompts=[]"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    try:
        train(cfg, tmp_path)
    finally:
        shutdown()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4] and all(r["mfu"] is None and r["tokens_per_s"] > 0 for r in rows)
    assert not (tmp_path / "checkpoints").exists()  # ckpt_every=0: nothing written, not even at the end
    report = json.loads((tmp_path / "profile/breakdown_rank0.json").read_text())
    assert report["steps"] == 2 and report["top_ops"][0]["seconds_per_step"] > 0


@pytest.mark.dist
def test_bench_compares_the_engines_on_one_and_two_ranks_in_one_run(tmp_path):
    out = tmp_path / "engines.json"
    cmd = [sys.executable, "-m", "src.bench", "--model", "mmdit_tiny", "--latent", "2", "8", "8", "--text-tokens", "8"]
    cmd += ["--batch", "2", "--steps", "4", "--log-every", "2", "--engines", "local:1", "zero3:2", "fsdp2:2"]
    cmd += ["--no-baseline", "--json", str(out), "parallel.precision=fp32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    names = [
        "Kiln (LocalEngine, fp32, 1 rank)",
        "Kiln (DeepSpeedEngine, fp32, 2 ranks)",
        "Kiln (FSDP2Engine, fp32, 2 ranks)",
    ]
    assert list(results) == names
    for r in results.values():  # 2 windows of 2 steps, the first left out
        assert r["windows"] == 1 and r["tokens_per_s_per_device"] > 0 and r["step_time_s"] > 0
    # both sharded engines train the same model on the same global batch (4): the same losses to fp32 rounding (the
    # 1e-5 of the 2-rank parity tests in tests/test_train.py); the local run's global batch is 2
    zero3, fsdp2 = (results[n]["loss_last"] for n in names[1:])
    assert fsdp2 == pytest.approx(zero3, rel=1e-5) and results[names[0]]["loss_last"] != zero3
    assert all(f"| {name} |" in proc.stdout for name in names)


def test_bench_refuses_an_impossible_engine_entry():
    from src.bench.speed import parse_engines

    assert parse_engines(["local:1", "fsdp2:4"]) == [("local", 1), ("fsdp2", 4)]
    with pytest.raises(SystemExit, match=r"'local:2': the local engine runs one process"):
        parse_engines(["local:2"])
    with pytest.raises(SystemExit, match=r"'ddp:2': expected ENGINE:RANKS with ENGINE one of"):
        parse_engines(["ddp:2"])
