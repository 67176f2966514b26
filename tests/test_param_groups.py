"""Freeze rules, per-group learning rates and schedules (src/run/param_groups.py).

- the rules give the expected trainable counts and LR factors; bad rules are refused by name;
- with the plain engine, frozen weights stay bit-identical and never enter the optimizer, and a schedule
  unfreezes at its step;
- through the real entry point on 2 ZeRO-3 ranks: frozen weights are bit-identical in the checkpoint, the
  report records each phase, and a run resumed exactly at the unfreeze step equals the straight one.
"""

import functools
import json

import pytest
import torch

from src.checkpoint import load_model_weights
from src.models.mmdit import MMDiT
from src.parallel.local import LocalEngine
from src.run.param_groups import ParamPlan, enter_phase, warmup_schedule
from tests.conftest import tiny_model_kwargs
from tests.test_engine import batch
from tests.test_train import PARITY_EPS, train

NEW = r"^(img_in|final_layer\.linear)\."
FREEZE_THEN_ALL = {
    "groups": [{"pattern": NEW, "warmup_steps": 4, "lr_scale": 2.0}, {"pattern": ".", "trainable": False}],
    "schedule": [{"step": 3, "groups": [{"pattern": NEW, "lr_scale": 2.0}]}],
}


def tiny():
    torch.manual_seed(0)
    return MMDiT(**tiny_model_kwargs())


def numel(model, pattern=None):
    import re

    return sum(p.numel() for n, p in model.named_parameters() if pattern is None or re.search(pattern, n))


def test_rules_give_trainable_counts_and_lr_factors():
    model = tiny()
    plan = ParamPlan([n for n, _ in model.named_parameters()], **FREEZE_THEN_ALL)
    assert len(plan.members) == 2 and plan.never_trainable == []
    first, later = plan.report(model, 0), plan.report(model, 1)
    assert first["trainable_params"] == numel(model, NEW) > 0
    assert later["trainable_params"] == numel(model) == first["total_params"]
    assert len(first["frozen_keys"]) == len(dict(model.named_parameters())) - 4 and later["frozen_keys"] == []
    assert [plan.phase(s) for s in range(5)] == [0, 0, 0, 1, 1]
    # the new layers: lr x2, warming up over 4 steps from step 0; at step 3 a new rule without warmup takes over
    assert [plan.lr_factor(0, s) for s in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert [plan.lr_factor(1, s) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert plan.unfrozen_at(1) == [1] and plan.unfrozen_at(0) == []


def test_never_trainable_parameters_are_kept_out_of_the_optimizer():
    model = tiny()
    plan = ParamPlan([n for n, _ in model.named_parameters()], [{"pattern": "^double_blocks", "trainable": False}])
    groups = plan.optimizer_groups(model)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        frozen = name.startswith("double_blocks")
        assert (id(p) in in_optimizer) != frozen and p.requires_grad != frozen, name
    assert plan.report(model, 0)["trainable_params"] == numel(model) - numel(model, "^double_blocks")


@pytest.mark.parametrize(
    ("groups", "schedule", "message"),
    [
        ([{"pattern": "^no_such_layer"}], [], r"match no parameter: '\^no_such_layer' \(phase from step 0\)"),
        ([{"pattern": ".", "trainable_": False}], [], r"only the keys .*got \['trainable_'\]"),
        ([{"pattern": "("}], [], "is not a regular expression"),
        ([{"pattern": ".", "lr_scale": -1}], [], "must be >= 0"),
        ([], [{"step": 0, "groups": []}], "steps > 0 and increasing"),
        ([], [{"step": 5, "groups": []}, {"step": 5, "groups": []}], r"increasing \(previous: 5\)"),
        ([{"pattern": ".", "trainable": False}], [], "freeze every parameter in every phase"),
    ],
)
def test_bad_rules_are_refused_by_name(groups, schedule, message):
    with pytest.raises(ValueError, match=message):
        ParamPlan([n for n, _ in tiny().named_parameters()], groups, schedule)


def test_a_schedule_unfreezes_at_its_step_and_frozen_weights_stay_bit_identical(tmp_path):
    model = tiny()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ParamPlan([n for n, _ in model.named_parameters()], **FREEZE_THEN_ALL)
    engine = LocalEngine(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        scheduler=functools.partial(warmup_schedule, group_factors=plan.lr_factor),
        device=torch.device("cpu"),
        param_groups=plan.optimizer_groups(model),
    )
    phase, lrs, changed = None, [], []
    for step in range(5):
        if plan.phase(step) != phase:
            phase = enter_phase(plan, engine, step, 0.1, tmp_path)
        x, txt, vec, t = batch(step)
        engine.backward((engine(x, txt, vec, t) - x).pow(2).mean())
        lrs.append([g["lr"] for g in engine.param_groups])
        engine.step()
        now = model.state_dict()
        changed.append({k for k in now if not torch.equal(now[k], initial[k])})
        if step < 3:  # frozen: no gradient, no optimizer state, not one bit changed (weight decay 0.1 included)
            frozen = [p for n, p in model.named_parameters() if not n.startswith(("img_in", "final_layer.linear"))]
            assert all(p.grad is None and p not in engine.optimizer.state for p in frozen)
    new = {k for k in initial if k.startswith(("img_in.", "final_layer.linear."))}
    assert changed[0] == changed[2] == new  # only the new layers moved in phase 0
    assert changed[3] == set(initial) - {k for k in initial if torch.equal(initial[k], model.state_dict()[k])}
    assert len(changed[4]) > len(new) + 10  # everything trains from step 3
    assert [round(a / 1e-3, 6) for a, _ in lrs] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert [b for _, b in lrs] == [0.0, 0.0, 0.0, 1e-3, 1e-3]
    assert [g["weight_decay"] for g in engine.param_groups] == [0.1, 0.1]
    report = [json.loads(line) for line in (tmp_path / "trainable.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in report] == [(0, 0), (3, 1)]
    assert report[0]["trainable_params"] < report[1]["trainable_params"] == report[1]["total_params"]


SCHEDULE = [
    "optim.groups=[{pattern:'^double_blocks',trainable:false}]",
    "optim.schedule=[{step:2,groups:[{pattern:'^double_blocks',trainable:true,lr_scale:0.5}]}]",
    PARITY_EPS,
]


@pytest.mark.dist
def test_zero3_freeze_schedule_is_bit_identical_and_resumes_at_the_unfreeze_step(tmp_path):
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    rows = train(straight, *SCHEDULE)
    w0 = _initial_weights()
    w2, _ = load_model_weights(straight, "step_00000002")
    w4, _ = load_model_weights(straight, "step_00000004")
    frozen = [k for k in w0 if k.startswith("double_blocks")]
    assert frozen and all(torch.equal(w2[k], w0[k]) for k in frozen)  # bit-identical under ZeRO-3 for 2 steps
    assert all(not torch.equal(w4[k], w0[k]) for k in frozen if k.endswith("weight"))  # unfrozen at step 2
    assert not torch.equal(w2["final_layer.linear.weight"], w0["final_layer.linear.weight"])
    report = [json.loads(line) for line in (straight / "trainable.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in report] == [(0, 0), (2, 1)]
    assert report[0]["trainable_params"] == report[0]["total_params"] - sum(w0[k].numel() for k in frozen)
    assert "trainable" in (straight / "train.log").read_text()
    train(parts, *SCHEDULE, "steps=2")
    resumed = train(parts, *SCHEDULE, "steps=4")  # resumes exactly at the unfreeze step
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    w_resumed, _ = load_model_weights(parts)
    assert all(torch.equal(w_resumed[k], w4[k]) for k in w4)


def _initial_weights() -> dict[str, torch.Tensor]:
    """The smoke experiment's model as train() builds it: seed 0, then instantiate."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["+experiment=smoke"])
    torch.manual_seed(cfg.seed)
    return {k: v.float() for k, v in instantiate(cfg.model).state_dict().items()}
