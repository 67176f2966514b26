"""Declared stage transitions: stage 1 (HunyuanVideo latents, patch 2) -> stage 2 (DC-AE latents, patch 1)."""

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from src.curriculum import apply_transition, plan_transition
from src.metrics import read_metrics
from src.models.mmdit import MMDiT
from tests.conftest import ROOT, tiny_model_kwargs
from tests.test_train import run

RULES = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/experiment/stage2_tiny.yaml").transition)
REINIT = ["final_layer.linear.bias", "final_layer.linear.weight", "img_in.bias", "img_in.weight"]


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
    counts = apply_transition(two, fake_run(tmp_path, one), RULES, tmp_path / "transition.json")
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


def test_stage1_then_stage2_from_the_cache(tmp_path):
    one, two = tmp_path / "stage1", tmp_path / "stage2"
    for name, run_dir, extra in (("stage1_tiny", one, []), ("stage2_tiny", two, [f"init_from={one}"])):
        common = [f"+experiment={name}", f"data.urls={tmp_path / name / 'cache'}", "parallel=local", "steps=2"]
        run([sys.executable, "-m", "src.preprocess", *common])
        run([sys.executable, "-m", "src.train", *common, *extra, f"hydra.run.dir={run_dir}"])
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    report = json.loads((two / "transition.json").read_text())
    assert report["tag"] == "step_00000002" and report["counts"]["reinit"] == 4
    assert "stage transition from" in (two / "train.log").read_text()
