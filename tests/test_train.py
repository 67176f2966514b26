"""End to end through the real entry point: torchrun + Hydra + DeepSpeed ZeRO-3 over gloo on CPU.

- a 2-rank ZeRO-3 run equals a single-process plain-PyTorch run on the same global batch, and so do runs with
  sequence parallelism (sp_size 2 on 2 ranks; sp_size 2 x 2 data-parallel groups on 4 ranks);
- resume is exact: 4 steps straight == 2 steps, stop, 2 more steps in the same run directory;
- the sampler turns the final checkpoint into a decodable mp4.
"""

import json
import shutil
import subprocess
import sys

import av
import pytest
import torch

from src.checkpoint import Moments, load_model_weights
from src.metrics import read_metrics
from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.dist

# fp32 on CPU: the sharded run differs from the single-process one only by the order of float reductions.
LOSS_RTOL = 1e-5
# A tenth of one AdamW step (lr 1e-4): Adam normalises each gradient element by its own magnitude, so where an
# element is near zero, reduction-order noise becomes a visible fraction of that element's step.
PARAM_ATOL = 1e-5
# The recipe's AdamW eps of 1e-15 turns a gradient of ~1e-12 into a full lr-sized step whose sign is decided by
# rounding; the parity runs use eps 1e-8 so that reduction-order noise cannot flip an update.
PARITY_EPS = "optim.optimizer.eps=1e-8"


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = clean_env() | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def train(run_dir, *overrides: str, nproc: int = 2) -> list[dict]:
    args = ["-m", "src.train", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    if nproc == 1:
        run([sys.executable, *args])
    else:
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args])
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """4 steps of the smoke experiment on 2 ZeRO-3 ranks, batch 2 per rank."""
    run_dir = tmp_path_factory.mktemp("zero3")
    return run_dir, train(run_dir, PARITY_EPS)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The same 4 steps in one plain-PyTorch process on the same global batch (batch 4)."""
    run_dir = tmp_path_factory.mktemp("single")
    return run_dir, train(run_dir, "parallel=local", "data.buckets.batch_scale=2", PARITY_EPS, nproc=1)


def test_smoke_run_writes_metrics_checkpoints_and_one_config(zero3_run):
    run_dir, rows = zero3_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "step_time_s",
        "data_wait_frac",
        "tflops_per_device",
        "peak_mem_gb",
    ):
        assert all(isinstance(r[key], float) and r[key] == r[key] for r in rows), key
    assert rows[-1]["samples_seen"] == 4 * 2 * 2
    assert all(r["mfu"] is None for r in rows)  # a CPU has no entry in the peak table: no guessed MFU
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra/config.yaml").is_file()
    # the loss of the untrained model is E|noise - x0|^2 > 1 and training moves it
    assert rows[0]["loss"] > 1.0 and rows[-1]["loss"] != rows[0]["loss"]


def test_zero3_on_two_ranks_matches_one_process_on_the_same_global_batch(zero3_run, single_run):
    run_dir, sharded = zero3_run
    single_dir, single = single_run
    for a, b in zip(sharded, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        assert a["lr"] == b["lr"] and a["samples_seen"] == b["samples_seen"]
    w_sharded, _ = load_model_weights(run_dir)
    w_single, _ = load_model_weights(single_dir)
    assert w_sharded.keys() == w_single.keys()
    for name, value in w_sharded.items():
        assert torch.allclose(value, w_single[name], atol=PARAM_ATOL, rtol=0), name
    assert w_sharded["final_layer.linear.weight"].abs().max() > 0  # trained away from the zero init


def test_zero3_ema_is_sharded_saved_and_matches_one_process(zero3_run, single_run):
    # each rank averages its own fp32 shard; consolidated, the EMA equals the single-process one
    ema_sharded, _ = load_model_weights(zero3_run[0], ema=True)
    ema_single, _ = load_model_weights(single_run[0], ema=True)
    raw, _ = load_model_weights(zero3_run[0])
    assert sorted((zero3_run[0] / "checkpoints/step_00000004").glob("ema_rank_*.pt"))[-1].name == "ema_rank_00001.pt"
    assert ema_sharded.keys() == raw.keys()
    for name, value in ema_sharded.items():
        assert value.dtype == torch.float32 and torch.allclose(value, ema_single[name], atol=PARAM_ATOL, rtol=0), name
    # 4 steps with warmup: decays 2/11, 3/12, 4/13, 5/14 -> the EMA sits between the init and the trained weights
    moved = raw["final_layer.linear.weight"].abs().max()
    gap = (ema_sharded["final_layer.linear.weight"] - raw["final_layer.linear.weight"]).abs().max()
    assert 0 < gap < moved


def test_adam_moments_read_from_zero3_shards_match_one_process(zero3_run, single_run):
    # what transition_optimizer=carry hands to the next stage: consolidated per parameter from the rank shards
    sharded, single = Moments(zero3_run[0]), Moments(single_run[0])
    assert sharded.steps == single.steps and set(sharded.steps.values()) == {4}
    for (name, m, v), (name1, m1, v1) in zip(sharded, single.select(sharded.steps), strict=True):
        assert name == name1 and m.shape == m1.shape == v.shape
        scale = m1.abs().max().clamp(min=1e-12)
        assert torch.allclose(m, m1, atol=1e-4 * scale, rtol=1e-3), name
        assert torch.allclose(v, v1, atol=1e-4 * v1.abs().max().clamp(min=1e-20), rtol=1e-3), name


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    """The same 4 steps with both ranks in one sequence-parallel group (sp_size 2) on the global batch of 4, the
    batch guard checking every step."""
    run_dir = tmp_path_factory.mktemp("sp2")
    return run_dir, train(run_dir, PARITY_EPS, "parallel.sp_size=2", "data.buckets.batch_scale=2", "sp_guard_every=1")


def _same_training(rows, weights_dir, reference_rows, reference_dir) -> None:
    for a, b in zip(rows, reference_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        assert a["samples_seen"] == b["samples_seen"]
    weights, _ = load_model_weights(weights_dir)
    reference, _ = load_model_weights(reference_dir)
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        assert torch.allclose(value, reference[name], atol=PARAM_ATOL, rtol=0), name


def test_sequence_parallel_on_two_ranks_matches_one_process(sp_run, single_run):
    run_dir, rows = sp_run
    assert "(1 data-parallel x 2 sequence-parallel)" in (run_dir / "train.log").read_text()
    _same_training(rows, run_dir, single_run[1], single_run[0])


def test_sequence_and_data_parallel_on_four_ranks_match_one_process(single_run, tmp_path):
    # 2 groups of 2: each data-parallel rank reads 2 of the 4 samples; ZeRO-3 shards over all 4 ranks
    rows = train(tmp_path, PARITY_EPS, "parallel.sp_size=2", "sp_guard_every=1", nproc=4)
    assert "(2 data-parallel x 2 sequence-parallel)" in (tmp_path / "train.log").read_text()
    assert len(list((tmp_path / "checkpoints/step_00000004").glob("*optim_states.pt"))) == 4
    _same_training(rows, tmp_path, single_run[1], single_run[0])


def test_a_sequence_parallel_run_resumes_exactly(sp_run, tmp_path):
    straight_dir, straight = sp_run
    overrides = (PARITY_EPS, "parallel.sp_size=2", "data.buckets.batch_scale=2", "sp_guard_every=1")
    train(tmp_path, "steps=2", *overrides)
    resumed = train(tmp_path, "steps=4", *overrides)  # the guard checks the resumed step's batch first
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == b["loss"] and a["samples_seen"] == b["samples_seen"], (a, b)
    w_straight, _ = load_model_weights(straight_dir)
    w_resumed, _ = load_model_weights(tmp_path)
    assert all(torch.equal(w_straight[k], w_resumed[k]) for k in w_straight)


def test_resume_is_exact(zero3_run, tmp_path):
    straight_dir, straight = zero3_run
    first = train(tmp_path, "steps=2", PARITY_EPS)
    assert [r["step"] for r in first] == [1, 2]
    resumed = train(tmp_path, "steps=4", PARITY_EPS)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # steps 3-4 appended once, 1-2 kept
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == b["loss"], (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        assert a["samples_seen"] == b["samples_seen"]
    for ema in (False, True):  # the EMA shards resume exactly too
        w_straight, _ = load_model_weights(straight_dir, ema=ema)
        w_resumed, _ = load_model_weights(tmp_path, ema=ema)
        assert all(torch.equal(w_straight[k], w_resumed[k]) for k in w_straight), ema


def test_activation_checkpointing_under_zero3_changes_no_number(zero3_run, tmp_path):
    _, plain = zero3_run
    recomputed = train(tmp_path, PARITY_EPS, "parallel.checkpoint_double=-1", "parallel.checkpoint_single=1")
    for a, b in zip(plain, recomputed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-5
        )


def test_bf16_mixed_precision_trains_close_to_fp32(zero3_run, tmp_path):
    # bf16 compute with fp32 master weights (the GPU default): same losses to bf16 accuracy
    run_dir, fp32 = zero3_run
    bf16 = train(tmp_path, PARITY_EPS, "parallel.precision=bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a, b)
    weights, _ = load_model_weights(tmp_path)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_a_corrupt_sharded_checkpoint_is_refused(zero3_run, tmp_path):
    run_dir, _ = zero3_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    shard = tmp_path / "checkpoints/step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:2000])  # truncated, as by a node dying mid-save
    args = ["-m", "src.train", "+experiment=smoke", f"hydra.run.dir={tmp_path}", "steps=6"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "step_00000004 cannot be loaded" in proc.stderr + proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # nothing trained on from it


def test_sampler_writes_a_decodable_video(zero3_run, tmp_path):
    run_dir, _ = zero3_run
    run(
        [
            sys.executable,
            "-m",
            "src.sample",
            str(run_dir),
            "--prompt",
            "a red square moves left",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1
    with av.open(str(videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    cfg_frames = 8  # smoke experiment: data.num_frames
    assert len(frames) == cfg_frames and frames[0].shape == (32, 32, 3)


def test_config_json_round_trip(zero3_run):
    # the resolved config the sampler rebuilds from names the smoke run
    run_dir, _ = zero3_run
    assert "run_name: smoke" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def _start(run_dir, *args: str) -> subprocess.Popen:
    env = clean_env()
    cmd = [*args, "+experiment=smoke", f"hydra.run.dir={run_dir}", "steps=500", "ckpt_every=1000"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_dir, proc: subprocess.Popen, steps: int = 2) -> None:
    import time

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no training steps logged: {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}")


@pytest.mark.parametrize("how", ["SIGUSR1", "STOP file on 2 ranks"])
def test_a_stop_request_checkpoints_and_the_same_command_resumes(tmp_path, how):
    import signal

    run_dir = tmp_path / "run"
    if how == "SIGUSR1":
        proc = _start(run_dir, sys.executable, "-m", "src.train", "parallel=local")
        _wait_for_steps(run_dir, proc)
        proc.send_signal(signal.SIGUSR1)  # what SLURM's --signal delivers before the time limit
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        proc = _start(run_dir, *launcher, "-m", "src.train")
        _wait_for_steps(run_dir, proc)
        (run_dir / "STOP").touch()  # what slurm/*.sh touch: reaches every rank through the shared run dir
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    stopped = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(stopped.rsplit("_", 1)[-1])
    assert 2 <= step < 500 and not (run_dir / "STOP").exists()
    assert "stop requested" in (run_dir / "train.log").read_text()
    extra = ["parallel=local"] if how == "SIGUSR1" else []
    rows = train(run_dir, f"steps={step + 2}", *extra, nproc=1 if how == "SIGUSR1" else 2)
    assert [r["step"] for r in rows][-3:] == [step, step + 1, step + 2]  # resumed, nothing lost or repeated
