"""Declared stage transitions: stage 1 (HunyuanVideo latents, patch 2) -> stage 2 (DC-AE latents, patch 1)."""

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from src.checkpoint import Moments, load_model_weights
from src.models.mmdit import MMDiT
from src.run.metrics import read_metrics
from src.run.transitions import apply_transition, plan_transition
from tests.conftest import ROOT, clean_env, tiny_model_kwargs
from tests.numerics import EPS32, accumulation_length, adam_drift_bound
from tests.test_train import EVERY_STEP, PARITY_EPS, _adamw, _within, first_step_atols, run

RULES = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/experiment/stage2_tiny.yaml").transition)
REINIT = ["final_layer.linear.bias", "final_layer.linear.weight", "img_in.bias", "img_in.weight"]
NEW = sorted([*REINIT, "cond_in.bias", "cond_in.weight"])  # stage2_tiny's I2V input is new too (zeroed)


def stage_models(cond_channels=None):
    torch.manual_seed(0)
    one = MMDiT(**tiny_model_kwargs(in_channels=16, patch_size=[1, 2, 2], cond_channels=cond_channels))
    torch.manual_seed(1)
    two = MMDiT(**tiny_model_kwargs(in_channels=128, patch_size=[1, 1, 1], cond_channels=cond_channels))
    return one, two


def fake_run(tmp_path, model):
    (tmp_path / "checkpoints" / "step_00000010").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tmp_path / "checkpoints" / "step_00000010" / "local_engine.pt")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    return tmp_path


def test_stage1_to_stage2_reinitialises_exactly_the_input_and_output_layers(tmp_path):
    one, two = stage_models()
    fresh = {k: v.clone() for k, v in two.state_dict().items()}
    plan = apply_transition(two, fake_run(tmp_path, one), RULES, tmp_path / "transition.json")
    counts = Counter(e["action"] for e in plan)
    report = json.loads((tmp_path / "transition.json").read_text())
    assert sorted(e["key"] for e in report["keys"] if e["action"] == "reinit") == REINIT
    assert counts == {"load": len(fresh) - 4, "reinit": 4}
    for key, value in two.state_dict().items():
        expected = fresh[key] if key in REINIT else one.state_dict()[key]
        assert torch.equal(value, expected), key  # loaded keys identical, re-initialised ones the new init


def test_cond_in_is_zeroed_when_present(tmp_path):
    one, two = stage_models(cond_channels=17)
    two_cond = MMDiT(**tiny_model_kwargs(in_channels=128, patch_size=[1, 1, 1], cond_channels=129))
    plan = plan_transition(one.state_dict(), two_cond.state_dict(), RULES)
    assert sorted(e["key"] for e in plan if e["action"] == "zero") == ["cond_in.bias", "cond_in.weight"]


def test_an_undeclared_shape_change_fails_listing_the_keys():
    one, two = stage_models()
    with pytest.raises(ValueError, match=r"does not say what to do with: final_layer\.linear\.bias.*img_in\.weight"):
        plan_transition(one.state_dict(), two.state_dict(), [])
    extra = {**one.state_dict(), "old_head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"old_head\.weight \(previous stage \[2\], this stage None\)"):
        plan_transition(extra, two.state_dict(), RULES)
    drop = [*RULES, {"pattern": "^old_head", "action": "drop", "reason": "gone in stage 2"}]
    assert {e["action"] for e in plan_transition(extra, two.state_dict(), drop)} == {"load", "reinit", "drop"}
    with pytest.raises(ValueError, match="needs pattern, action"):
        plan_transition(extra, two.state_dict(), [{"pattern": "x", "action": "keep", "reason": "?"}])


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The tiny curriculum through its one command: stage1_tiny then stage2_tiny, each preprocessed and trained."""
    root = tmp_path_factory.mktemp("stages")
    command = [sys.executable, "-m", "src.stages", "conf/curriculum/tiny.yaml", "parallel=local", "--out-dir", root]
    first = run([str(c) for c in command])
    again = run([str(c) for c in command])  # resumable: both stages are finished, nothing runs
    stage2 = [f"out_dir={root}", f"init_from={root / 'stage1_tiny'}", "+experiment=stage2_tiny"]
    return root, stage2, first.stderr, again.stderr


def test_one_command_runs_stage1_then_stage2_and_resumes(stages):
    root, _, first, again = stages
    assert first.count("$ ") == 4 and "stage 2/2 (stage2_tiny" in first  # preprocess + train, twice
    assert again.count("$ ") == 0 and again.count("finished (step 4), skipped") == 2
    assert [r["step"] for r in read_metrics(root / "stage1_tiny")] == [1, 2, 3, 4]
    assert list((root / "cache" / "stage2_tiny").glob("*.tar"))  # the cache under the same out dir


def test_a_stage_waits_for_the_previous_stages_final_checkpoint(tmp_path):
    from src.stages import run_curriculum

    (tmp_path / "one" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (tmp_path / "one" / "checkpoints" / "latest").write_text("step_00000002")
    one = {"experiment": "stage1_tiny", "run_dir": tmp_path / "one", "steps": 4, "previous": None}
    two = {"experiment": "stage2_tiny", "run_dir": tmp_path / "two", "steps": 4, "previous": one}
    with pytest.raises(RuntimeError, match=r"needs the final checkpoint of .*one \(step 4\), which stopped at step 2"):
        run_curriculum([{**one, "steps": 2}, two])  # stage 1 counted as done at 2, but stage 2 expects 4


def test_a_signal_to_the_curriculum_stops_the_running_stage_cleanly_and_the_same_command_resumes(tmp_path):
    import signal
    import time

    command = [sys.executable, "-m", "src.stages", "conf/curriculum/tiny.yaml", "parallel=local", "log_every=1",
               "--out-dir", str(tmp_path)]  # fmt: skip
    env = clean_env()
    with open(tmp_path / "stages.out", "w") as out:  # a file, not a pipe: an unread pipe would block the stages
        proc = subprocess.Popen([*command, "steps=500"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    run_dir, deadline = tmp_path / "stage1_tiny", time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stages.out").read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, which passes it on to the running stage
    assert proc.wait(timeout=120) == 75, (tmp_path / "stages.out").read_text()[-3000:]
    err = (tmp_path / "stages.out").read_text()
    step = int((run_dir / "checkpoints" / "latest").read_text().rsplit("_", 1)[1])
    assert 2 <= step < 500 and "stopped at step" in err and not (tmp_path / "stage2_tiny").exists()
    run([*command, f"steps={step + 3}"])  # resumes stage 1 to its end, then runs stage 2
    assert [r["step"] for r in read_metrics(run_dir)][-4:] == [step, step + 1, step + 2, step + 3]
    assert len(read_metrics(tmp_path / "stage2_tiny")) == step + 3


def test_stage2_from_the_cache_with_a_freeze_schedule(stages):
    root = stages[0]
    run_dir = root / "stage2_tiny"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    report = json.loads((run_dir / "transition.json").read_text())
    assert report["tag"] == "step_00000004" and report["counts"]["reinit"] == 4
    assert "stage transition from" in (run_dir / "train.log").read_text()
    phases = [json.loads(line) for line in (run_dir / "trainable.jsonl").read_text().splitlines()]
    assert [(p["step"], p["phase"]) for p in phases] == [(0, 0), (2, 1)]
    assert sorted(phases[0]["groups"][0]["keys"]) == NEW and phases[0]["groups"][1]["trainable"] is False
    loaded, _ = load_model_weights(root / "stage1_tiny")
    at2, _ = load_model_weights(run_dir, "step_00000002")
    at4, _ = load_model_weights(run_dir)
    for key in at2:  # frozen for 2 steps: exactly stage 1's weights; then trained
        if key not in NEW:
            assert torch.equal(at2[key], loaded[key]), key
    assert not torch.equal(
        at4["double_blocks.0.img_attn.q_proj.weight"], loaded["double_blocks.0.img_attn.q_proj.weight"]
    )


# the new layers in a group of their own (all trainable from step 0), so the loaded group can carry its moments
CARRY = [
    "optim.schedule=[]",
    r"optim.groups=[{pattern:'^(img_in|final_layer\.linear|cond_in)\.',warmup_steps:2}]",
    "steps=2",
    PARITY_EPS,
    EVERY_STEP,
]


def stage2_accumulation_length() -> int:
    """n of tests/numerics.py for one training step of stage2_tiny on the global batch of 4: Video DC-AE latents of
    the 8-frame 32x32 fixture clips, 128 x 2 x 1 x 1 at patch 1 (2 video tokens), 16 MiniLM text tokens."""
    torch.manual_seed(0)
    model = MMDiT(**tiny_model_kwargs(in_channels=128, patch_size=[1, 1, 1]))
    x, txt, vec, t = torch.randn(4, 128, 2, 1, 1), torch.randn(4, 16, 384), torch.randn(4, 384), torch.rand(4)
    return accumulation_length(lambda: model(x, txt, vec, t), backward=True)


@pytest.mark.dist
def test_carried_adam_moments_reach_zero3_ranks_like_one_process(stages):
    root, stage2 = stages[:2]
    single, sharded, reset = root / "carry1", root / "carry2", root / "reset"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    carry = [*stage2, *CARRY, "transition_optimizer=carry"]
    run([sys.executable, "-m", "src.train", *carry, "parallel=local", "data.buckets.batch_scale=2",
         f"hydra.run.dir={single}"])  # fmt: skip
    run([*launch, "-m", "src.train", *carry, f"hydra.run.dir={sharded}"])
    run([*launch, "-m", "src.train", *stage2, *CARRY, f"hydra.run.dir={reset}"])
    assert "carried over the AdamW moments of" in (sharded / "train.log").read_text()
    assert read_metrics(single)[0]["bucket"] == "32px/8f/32x32"  # the shapes stage2_accumulation_length assumes
    # step 1 starts both runs from the same weights and carried moments: gradients, moments and the update agree to
    # rounding (tests/test_train.first_step_atols); step 2 within what two AdamW steps can move a weight
    atols = first_step_atols(sharded, single, stage2_accumulation_length())
    w1, _ = load_model_weights(single, "step_00000001")
    w2, _ = load_model_weights(sharded, "step_00000001")
    for key in w1:
        _within(w2[key], w1[key], atols[key], f"{key}: weights after step 1")
    lr, betas, _ = _adamw(single)
    drift = adam_drift_bound([lr, lr], betas, first_step=4 + 1)  # the loaded moments' steps 5 and 6 (at most)
    final1, _ = load_model_weights(single)
    final2, _ = load_model_weights(sharded)
    for key in final1:
        _within(final2[key], final1[key], drift + 4 * EPS32 * final1[key].abs(), key)
    # the carried moments changed the first update of the loaded parameters beyond that rounding
    w_reset, _ = load_model_weights(reset, "step_00000001")
    moved = [k for k in w1 if k not in NEW and ((w2[k] - w_reset[k]).abs() > atols[k]).any()]
    assert len(moved) > len(w1) // 2
    assert Moments(sharded).steps["double_blocks.0.img_attn.q_proj.weight"] == 4 + 2  # stage 1's 4 steps, then 2
    assert Moments(sharded).steps["img_in.weight"] == 2


def test_carry_refuses_a_group_mixing_loaded_and_new_layers(stages):
    root, stage2 = stages[:2]
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", *stage2, "optim.schedule=[]", "optim.groups=[]", "parallel=local",
         "transition_optimizer=carry", f"hydra.run.dir={root / 'mixed'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode != 0
    assert re.search(
        r"optimizer group 0 \(no optim.groups rule\) mixes parameters with carried moments and parameters "
        r"without \(img_in\.weight, img_in\.bias, cond_in\.weight, cond_in\.bias, final_layer\.linear\.weight",
        proc.stderr,
    ), proc.stderr[-2000:]


def test_init_from_a_released_checkpoint_single_or_sharded_is_strict(tmp_path):
    from safetensors.torch import save_file

    one, _ = stage_models()
    weights = one.state_dict()
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    release = tmp_path / "release"
    release.mkdir()
    for shard, names in halves.items():
        save_file({k: weights[k].contiguous() for k in names}, release / shard)
    index = {"weight_map": {k: shard for shard, names in halves.items() for k in names}}
    (release / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "single.safetensors")
    for source in (release, tmp_path / "single.safetensors"):
        torch.manual_seed(3)
        fresh = MMDiT(**tiny_model_kwargs(in_channels=16, patch_size=[1, 2, 2]))
        plan = apply_transition(fresh, source, [])
        assert {e["action"] for e in plan} == {"load"} and len(plan) == len(weights)
        assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items()), source
    (release / "model-00002-of-00002.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="names shards that are not there: model-00002-of-00002.safetensors"):
        apply_transition(fresh, release, [])
    save_file({k: v.contiguous() for k, v in weights.items() if k != "txt_in.bias"}, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"txt_in\.bias \(previous stage None"):
        apply_transition(fresh, tmp_path / "short.safetensors", [])  # strict: a key the release lacks is an error
