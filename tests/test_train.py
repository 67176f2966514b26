"""End to end through the real entry point: torchrun + Hydra + DeepSpeed ZeRO-3 over gloo on CPU.

- a 2-rank ZeRO-3 run equals a single-process plain-PyTorch run on the same global batch, and so do runs with
  sequence parallelism (sp_size 2 on 2 ranks; sp_size 2 x 2 data-parallel groups on 4 ranks);
- resume is exact: 4 steps straight == 2 steps, stop, 2 more steps in the same run directory;
- the sampler turns the final checkpoint into a decodable mp4.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from omegaconf import OmegaConf

from src.checkpoint import Moments, load_model_weights
from src.integrity import resume_tag
from src.run.metrics import read_metrics
from src.rundir import step_tag
from tests.conftest import ROOT, clean_env
from tests.numerics import (
    EPS32,
    adam_drift_bound,
    adam_moments_atol,
    adam_update_atol,
    rounding_atol,
)
from tests.test_integrity import flip_bytes

pytestmark = pytest.mark.dist

# The recipe's AdamW eps of 1e-15 turns a gradient of ~1e-12 into a full lr-sized step whose sign is decided by
# rounding; the parity runs use eps 1e-8 so that fewer elements sit in that regime (tests/numerics.py: Adam).
PARITY_EPS = "optim.optimizer.eps=1e-8"
# Parity runs keep every step's checkpoint: step 1 is where both runs start from the same weights and moments.
EVERY_STEP = "ckpt_every=1"


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = clean_env() | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def train(run_dir, *overrides: str, nproc: int = 2, entry: tuple[str, ...] = ("src.train",)) -> list[dict]:
    args = ["-m", *entry, "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    if nproc == 1:
        run([sys.executable, *args])
    else:
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args])
    return read_metrics(run_dir)


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
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [step_tag(s) for s in (1, 2, 3, 4)]
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra/config.yaml").is_file()
    # the loss of the untrained model is E|noise - x0|^2 > 1 and training moves it
    assert rows[0]["loss"] > 1.0 and rows[-1]["loss"] != rows[0]["loss"]


# -- parity: what two engines must agree on, with tolerances derived in tests/numerics.py ------------------------

SMOKE_BUCKET = "32px/8f/32x32"


def _adamw(run_dir) -> tuple[float, tuple[float, float], float]:
    """(lr, betas, eps) of a run's AdamW. lr is the largest any group takes at any step: warmup only lowers it, and
    the runs compared here scale no group's lr up."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.optim.optimizer.weight_decay == 0 and cfg.parallel.precision == "fp32"
    assert all(group.get("lr_scale", 1.0) <= 1 for group in cfg.optim.groups)
    return cfg.optim.optimizer.lr, tuple(cfg.optim.optimizer.betas), cfg.optim.optimizer.eps


def _within(value: torch.Tensor, reference: torch.Tensor, atol, what: str) -> None:
    """|value - reference| <= atol elementwise (atol a number or a tensor), naming the worst element if not."""
    excess = (value.double() - reference.double()).abs() - atol
    assert excess.max() <= 0, f"{what}: off by {excess.max().item():.3g} beyond its tolerance"


def first_step_atols(run_dir, ref_dir, n_grad: int) -> dict[str, torch.Tensor]:
    """Step 1, where both runs start from the same weights and moments (zero, or carried over from one checkpoint):
    the gradients agree to the rounding of their reductions, per tensor k * eps * G * sqrt(n_grad) with G >= max|g|
    read from the moments (v >= (1 - b2) g^2; equal for zero moments), so do the moments, m by (1 - b1) times that
    and v by (1 - b2) (2 |g| dg + dg^2). Returns, per parameter, how far AdamW's update can then put the weights
    apart (tests/numerics.adam_update_atol: far only where a gradient is within rounding of zero)."""
    tag = step_tag(1)
    lr, (b1, b2), adam_eps = _adamw(ref_dir)
    moments, reference = Moments(run_dir, tag), Moments(ref_dir, tag)
    assert moments.steps == reference.steps
    weights, _ = load_model_weights(ref_dir, tag)
    atols = {}
    for (name, m, v), (name1, m1, v1) in zip(moments, reference.select(moments.steps), strict=True):
        assert name == name1 and m.shape == m1.shape == v.shape == v1.shape, name
        g_max = (torch.maximum(v.abs().max(), v1.abs().max()) / (1 - b2)).sqrt()
        dg = rounding_atol(g_max, n_grad)
        m_atol, v_atol = adam_moments_atol(m1, v1, dg, (b1, b2))
        _within(m, m1, m_atol, f"{name}: exp_avg after step 1 (the gradient)")
        _within(v, v1, v_atol, f"{name}: exp_avg_sq after step 1")
        atols[name] = adam_update_atol(m1, v1, weights[name], reference.steps[name], lr, (b1, b2), adam_eps, dg)
    return atols


def assert_same_training(run_dir, ref_dir, n: dict[str, int]) -> None:
    """`run_dir` trained like `ref_dir` (same global batches, same optimizer), up to the rounding of reductions:

    - step 1, from the same weights: the loss to k * eps * sqrt(n_loss) (relative: the loss is a mean of positive
      terms, its partial sums stay below its value), the gradient norm to k * eps * sqrt(n_grad + N) (the norm adds a
      reduction over the N gradient elements), the gradients and the first update per element (first_step_atols);
    - each later step t: the loss to the same rounding plus what the weights it was computed at, w_(t-1), already
      differ by, to first order: |dL| <= |grad L| |dw| (Cauchy-Schwarz with the logged gradient norm), doubled for the
      second-order remainder (|dw| is ~1e-5 here, its square is negligible). The gradient norms of later steps are
      not compared: they move with the loss's curvature times dw, which no arithmetic bound covers;
    - the final weights to what any AdamW steps can move an element (tests/numerics.adam_drift_bound).
    """
    rows, ref_rows = read_metrics(run_dir), read_metrics(ref_dir)
    lr, betas, _ = _adamw(ref_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] and ref_rows[0]["bucket"] == SMOKE_BUCKET
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["lr"] == b["lr"] and a["samples_seen"] == b["samples_seen"], (a, b)
    weights = [load_model_weights(run_dir, step_tag(r["step"]))[0] for r in rows]
    reference = [load_model_weights(ref_dir, step_tag(r["step"]))[0] for r in ref_rows]
    count = sum(w.numel() for w in reference[0].values())
    assert ref_rows[0]["grad_norm"] < 1.0  # under grad_clip: the gradients are compared unclipped
    loss_rtol = rounding_atol(1.0, n["loss"])
    assert rows[0]["loss"] == pytest.approx(ref_rows[0]["loss"], rel=loss_rtol), (rows[0], ref_rows[0])
    grad_norm_rtol = rounding_atol(1.0, n["grad"] + count)
    assert rows[0]["grad_norm"] == pytest.approx(ref_rows[0]["grad_norm"], rel=grad_norm_rtol), (rows[0], ref_rows[0])
    for name, atol in first_step_atols(run_dir, ref_dir, n["grad"]).items():
        _within(weights[0][name], reference[0][name], atol, f"{name}: weights after step 1")
    for t in range(1, len(rows)):  # the loss of step t + 1 is computed at the weights after step t
        dw = sum((weights[t - 1][k].double() - reference[t - 1][k].double()).square().sum() for k in reference[0])
        bound = loss_rtol * abs(ref_rows[t]["loss"]) + 2 * ref_rows[t]["grad_norm"] * dw.sqrt().item()
        assert abs(rows[t]["loss"] - ref_rows[t]["loss"]) <= bound, (t + 1, rows[t]["loss"], ref_rows[t]["loss"], bound)
    drift = adam_drift_bound([lr] * len(ref_rows), betas)
    assert weights[-1].keys() == reference[-1].keys()
    for name, value in weights[-1].items():
        _within(value, reference[-1][name], drift + 4 * EPS32 * reference[-1][name].abs(), f"{name}: final weights")


@pytest.mark.numerics
def test_zero3_on_two_ranks_matches_one_process_on_the_same_global_batch(zero3_run, single_run, smoke_n):
    assert_same_training(zero3_run[0], single_run[0], smoke_n)
    w_sharded, _ = load_model_weights(zero3_run[0])
    assert w_sharded["final_layer.linear.weight"].abs().max() > 0  # trained away from the zero init


@pytest.mark.numerics
def test_zero3_ema_is_sharded_saved_and_matches_one_process(zero3_run, single_run, smoke_n):
    # each rank averages its own fp32 shard; consolidated, the EMA equals the single-process one: after step 1 as
    # closely as the weights (ema = d w0 + (1 - d) w1, w0 shared), after step 4 within the weights' drift bound (a
    # convex combination of weights that are each within it)
    first = first_step_atols(zero3_run[0], single_run[0], smoke_n["grad"])
    ema1, _ = load_model_weights(zero3_run[0], step_tag(1), ema=True)
    ema1_single, _ = load_model_weights(single_run[0], step_tag(1), ema=True)
    for name, value in ema1.items():
        _within(value, ema1_single[name], first[name] + 4 * EPS32 * value.abs(), f"{name}: EMA after step 1")
    ema_sharded, _ = load_model_weights(zero3_run[0], ema=True)
    ema_single, _ = load_model_weights(single_run[0], ema=True)
    raw, _ = load_model_weights(zero3_run[0])
    assert sorted((zero3_run[0] / "checkpoints/step_00000004").glob("ema_rank_*.pt"))[-1].name == "ema_rank_00001.pt"
    assert ema_sharded.keys() == raw.keys()
    lr, betas, _ = _adamw(single_run[0])
    drift = adam_drift_bound([lr] * len(single_run[1]), betas)
    for name, value in ema_sharded.items():
        assert value.dtype == torch.float32, name
        _within(value, ema_single[name], drift + 4 * EPS32 * value.abs(), f"{name}: EMA after step 4")
    # 4 steps with warmup: decays 2/11, 3/12, 4/13, 5/14 -> the EMA sits between the init and the trained weights
    moved = raw["final_layer.linear.weight"].abs().max()
    gap = (ema_sharded["final_layer.linear.weight"] - raw["final_layer.linear.weight"]).abs().max()
    assert 0 < gap < moved


@pytest.mark.numerics
def test_adam_moments_read_from_zero3_shards_match_one_process(zero3_run, single_run, smoke_n):
    # what transition_optimizer=carry hands to the next stage: consolidated per parameter from the rank shards. The
    # values are compared at step 1 (first_step_atols), where they are the gradients of the same weights; later
    # moments are gradients of weights Adam has already put apart (tests/numerics.py), read by the same code.
    first_step_atols(zero3_run[0], single_run[0], smoke_n["grad"])
    assert set(Moments(zero3_run[0], step_tag(1)).steps.values()) == {1}
    sharded, single = Moments(zero3_run[0]), Moments(single_run[0])
    assert sharded.steps == single.steps and set(sharded.steps.values()) == {4}
    for (name, m, v), (name1, m1, v1) in zip(sharded, single.select(sharded.steps), strict=True):
        assert name == name1 and m.shape == m1.shape == v.shape == v1.shape, name
        assert torch.isfinite(m).all() and (v >= 0).all(), name


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    """The same 4 steps with both ranks in one sequence-parallel group (sp_size 2) on the global batch of 4, the
    batch guard checking every step."""
    run_dir = tmp_path_factory.mktemp("sp2")
    overrides = (PARITY_EPS, EVERY_STEP, "parallel.sp_size=2", "data.buckets.batch_scale=2", "sp_guard_every=1")
    return run_dir, train(run_dir, *overrides)


@pytest.mark.numerics
def test_sequence_parallel_on_two_ranks_matches_one_process(sp_run, single_run, smoke_n):
    run_dir, rows = sp_run
    assert "(1 data-parallel x 2 sequence-parallel)" in (run_dir / "train.log").read_text()
    assert_same_training(run_dir, single_run[0], smoke_n)


def test_sequence_and_data_parallel_on_four_ranks_match_one_process(single_run, tmp_path, smoke_n):
    # 2 groups of 2: each data-parallel rank reads 2 of the 4 samples; ZeRO-3 shards over all 4 ranks
    train(tmp_path, PARITY_EPS, EVERY_STEP, "parallel.sp_size=2", "sp_guard_every=1", nproc=4)
    assert "(2 data-parallel x 2 sequence-parallel)" in (tmp_path / "train.log").read_text()
    assert len(list((tmp_path / "checkpoints/step_00000004").glob("*optim_states.pt"))) == 4
    assert_same_training(tmp_path, single_run[0], smoke_n)


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


def test_resume_is_exact(zero3_run, zero3_two_steps, tmp_path):
    straight_dir, straight = zero3_run
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_two_steps, run_dir)  # 2 steps (tests/conftest.py), continued here in a copy
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    resumed = train(run_dir, "steps=4", PARITY_EPS)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # steps 3-4 appended once, 1-2 kept
    # the smoke experiment's ckpt_every=2: a checkpoint every 2 steps (and at the end), none in between
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == b["loss"], (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        assert a["samples_seen"] == b["samples_seen"]
    for ema in (False, True):  # the EMA shards resume exactly too
        w_straight, _ = load_model_weights(straight_dir, ema=ema)
        w_resumed, _ = load_model_weights(run_dir, ema=ema)
        assert all(torch.equal(w_straight[k], w_resumed[k]) for k in w_straight), ema


def test_activation_checkpointing_under_zero3_recomputes_and_changes_no_number(zero3_run, tmp_path):
    # every double block and the first of the 2 single blocks: each rank's 4 steps run every block forward 4 times
    # for the loss, and recompute exactly the checkpointed ones during backward (tests/block_forwards.py counts)
    _, plain = zero3_run
    checkpointing = ("parallel.checkpoint_double=-1", "parallel.checkpoint_single=1")
    recomputed = train(tmp_path, PARITY_EPS, *checkpointing, entry=("tests.block_forwards", str(tmp_path / "counts")))
    for rank in (0, 1):
        counts = json.loads((tmp_path / "counts" / f"rank{rank}.json").read_text())
        assert counts == {"DoubleStreamBlock": [2 * 4, 2 * 4], "SingleStreamBlock": [2 * 4, 1 * 4]}, (rank, counts)
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


ZERO3_DAMAGE = {
    "flipped optimizer shard": (flip_bytes, "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its SHA-256"),
    "flipped EMA shard": (flip_bytes, "ema_rank_00000.pt does not match its SHA-256"),
    "flipped model states": (flip_bytes, "zero_pp_rank_0_mp_rank_00_model_states.pt does not match its SHA-256"),
    "deleted EMA shard": (Path.unlink, r"ema_rank_00001.pt is missing \(listed in manifest.json\)"),
    "deleted model states": (Path.unlink, r"zero_pp_rank_1_mp_rank_00_model_states.pt is missing \(listed in"),
}


@pytest.mark.parametrize("damage", ZERO3_DAMAGE)
def test_a_damaged_zero3_checkpoint_is_refused_naming_the_file(zero3_run, tmp_path, damage):
    run_dir, _ = zero3_run
    shutil.copytree(run_dir / "checkpoints", tmp_path, dirs_exist_ok=True)
    harm, message = ZERO3_DAMAGE[damage]
    harm(tmp_path / "step_00000004" / re.search(r"\w+\.pt", message)[0])
    with pytest.raises(ValueError, match=message):
        resume_tag(tmp_path, "latest")
    assert resume_tag(tmp_path, "latest_intact") == "step_00000003"


def test_a_corrupt_sharded_checkpoint_is_refused_and_latest_intact_resumes_exactly(zero3_run, tmp_path):
    run_dir, straight = zero3_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    shard = tmp_path / "checkpoints/step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_bytes(shard)  # 64 bytes inverted: torch.load would read it without complaint
    args = ["-m", "src.train", "+experiment=smoke", f"hydra.run.dir={tmp_path}", "steps=4", PARITY_EPS, EVERY_STEP]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launch, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"{shard} does not match its SHA-256" in proc.stderr + proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # nothing trained on from it
    proc = subprocess.run(
        [*launch, *args, "resume=latest_intact"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 4 trained again from step 3's checkpoint ...
    assert rows[-1]["loss"] == straight[-1]["loss"]  # ... exactly as the first time
    assert resume_tag(tmp_path / "checkpoints", "latest") == "step_00000004"  # rewritten and sealed


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


def keys_of(step: int, dp_rank: int = 0, dp_world: int = 2) -> list[str]:
    """The sample keys data-parallel rank `dp_rank` trains on at `step` (1-based) of the smoke run: the plan is
    deterministic, so the test can aim a fault at them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=smoke"])
    batches = iter(instantiate(cfg.data)(dp_rank=dp_rank, dp_world=dp_world, seed=cfg.seed))
    for _ in range(step - 1):
        next(batches)
    return next(batches)["key"]


@pytest.mark.parametrize("parallel", ["zero3", "fsdp2"])
def test_the_sentinel_on_two_sharded_ranks(tmp_path, parallel):
    # steps 3 and 4: a NaN sample on rank 0, skipped twice in a row: roll back to step 2's checkpoint, quarantine
    # both samples, train on without them; step 6 (the last): an infinite gradient, skipped
    nan = [keys_of(3)[0], keys_of(4)[0]]
    rows = train(
        tmp_path,
        f"parallel={parallel}",
        "steps=6",
        EVERY_STEP,
        "faults.inf_grad_steps=[6]",
        f"faults.nan_samples=[{','.join(nan)}]",
        "sentinel.skips_in_row=2",
    )
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 logged once, after the rollback
    assert [r["skipped_steps"] for r in rows] == [0, 0, 2, 2, 2, 3] and rows[-1]["rollbacks"] == 1
    quarantined = [json.loads(x)["key"] for x in (tmp_path / "skipped/quarantine.jsonl").read_text().splitlines()]
    assert sorted(quarantined) == sorted(nan)
    weights = {tag: load_model_weights(tmp_path, step_tag(tag))[0] for tag in range(1, 7)}
    assert all(torch.isfinite(w).all() for ws in weights.values() for w in ws.values())
    assert all(torch.equal(weights[5][k], weights[6][k]) for k in weights[5])  # the skipped step applied nothing
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # training went on
