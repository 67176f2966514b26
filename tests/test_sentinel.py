"""The NaN / spike sentinel (src/run/sentinel.py): a non-finite step is skipped with no update, a diverging run rolls
back to its last checkpoint and quarantines the samples, and no checkpoint ever holds a non-finite weight.

The drills run the real loop in this process on the local engine over random features (seconds each), with the
fault injection of src/run/faults.py; tests/test_train.py's `test_the_sentinel_on_two_sharded_ranks` does the same on
2 ZeRO-3 ranks and on 2 FSDP2 ranks through torchrun (a rollback there reloads a DCP checkpoint mid-run).
"""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from src.checkpoint import load_model_weights
from src.parallel.dist import shutdown
from src.run.metrics import read_metrics
from src.run.sentinel import Diverged, Quarantine, Sentinel, blame, standouts
from src.rundir import step_tag
from tests.conftest import ROOT


def test_a_non_finite_step_is_skipped_and_three_in_a_row_roll_back():
    sentinel = Sentinel(skips_in_row=3)
    assert sentinel.observe(1.0, 0.5).action == "ok"
    assert sentinel.observe(math.nan, 0.5).action == "skipped"
    assert sentinel.observe(1.0, math.inf).action == "skipped"
    verdict = sentinel.observe(math.inf, math.nan)
    assert verdict.action == "rollback" and "3 skipped steps in a row" in verdict.reason
    assert sentinel.skipped == 3
    sentinel.rolled_back(at=4, to=2, reason=verdict.reason, samples=["b", "a"])
    assert sentinel.observe(math.nan, 1.0).action == "skipped"  # the count in a row starts again


def test_a_spike_is_judged_against_the_median_of_recent_good_losses():
    sentinel = Sentinel(spike_factor=10.0, window=4, min_history=3)
    for loss in (1.0, 0.5, 0.4):
        assert sentinel.observe(loss, 1.0).action == "ok"
    assert sentinel.median() == 0.5 and sentinel.spike_level() == 5.0
    assert sentinel.observe(4.9, 1.0).action == "ok"  # under 10 x the median: kept, and joins the window
    verdict = sentinel.observe(100.0, 1.0)
    assert verdict.action == "rollback" and "spike" in verdict.reason
    assert sentinel.median() == pytest.approx(0.75)  # the spike did not join: the median of 1.0, 0.5, 0.4, 4.9
    assert Sentinel(spike_factor=None, min_history=1).spike_level() == math.inf


def test_past_max_rollbacks_the_run_stops_naming_steps_and_samples():
    sentinel = Sentinel(max_rollbacks=1)
    sentinel.rolled_back(at=7, to=5, reason="loss spike", samples=["k1"])
    with pytest.raises(Diverged, match=r"step 7 -> 5: loss spike; samples \['k1'\].*step 9 -> 5.*'k2'"):
        sentinel.rolled_back(at=9, to=5, reason="loss spike", samples=["k2"])


def test_the_sentinel_state_round_trips_and_bad_settings_are_refused():
    sentinel = Sentinel(window=3, min_history=1)
    for loss in (1.0, 2.0, 3.0, 4.0):
        sentinel.observe(loss, 1.0)
    sentinel.observe(math.nan, 1.0)
    again = Sentinel(window=3, min_history=1)
    again.load_state_dict(json.loads(json.dumps(sentinel.state_dict())))
    assert again.median() == 3.0 and again.skipped == 1
    for bad in ({"spike_factor": 1.0}, {"window": 0}, {"skips_in_row": 0}, {"max_rollbacks": -1}):
        with pytest.raises(ValueError, match=f"sentinel.{next(iter(bad))}"):
            Sentinel(**bad)


def test_the_blame_falls_on_the_samples_whose_own_loss_stands_out_or_else_on_all():
    keys = ["a", "b", "c"]
    assert standouts(keys, torch.tensor([0.1, math.nan, 0.2]), math.inf) == ["b"]
    assert standouts(keys, torch.tensor([0.1, 9.0, 0.2]), 5.0) == ["b"]
    assert standouts(keys, torch.tensor([0.1, 0.2, 0.3]), 5.0) == []
    # (standouts, keys) per rank and step: one rank's NaN sample clears the other rank's normal batch
    assert blame([(["b"], keys), ([], ["d", "e"])]) == ["b"]
    assert blame([([], keys), ([], ["d"])]) == ["a", "b", "c", "d"]


def test_the_quarantine_is_kept_on_disk_and_read_back(tmp_path):
    first = Quarantine(tmp_path, writer=True)
    first.add(["x", "y"], step=3, reason="spike")
    first.add(["y"], step=4, reason="spike")  # already there: not written twice
    assert len((tmp_path / "skipped" / "quarantine.jsonl").read_text().splitlines()) == 2
    assert Quarantine(tmp_path, writer=False).mask(["y", "z"]).tolist() == [True, False]


DRILL = (
    "data=random_features",
    "parallel=local",
    "parallel.precision=fp32",
    "optim.scheduler.warmup_steps=0",
    "steps=4",
    "log_every=1",
    "ckpt_every=1",
)


def drill(run_dir, *overrides: str, monkeypatch) -> list[dict]:
    """4 steps of the tiny model on the local engine over random features, a checkpoint after every step."""
    from src.train import train

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*DRILL, *overrides],
        )
    try:
        train(cfg, run_dir)
    finally:
        shutdown()
    return read_metrics(run_dir)


def all_finite(run_dir) -> bool:
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    return bool(tags) and all(
        all(torch.isfinite(v).all() for v in load_model_weights(run_dir, tag, ema=ema)[0].values())
        for tag in tags
        for ema in (False, True)
    )


def test_an_infinite_gradient_skips_its_step_with_no_update(tmp_path, monkeypatch):
    rows = drill(tmp_path, "faults.inf_grad_steps=[2,4]", monkeypatch=monkeypatch)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2] and rows[-1]["rollbacks"] == 0
    assert math.isnan(rows[1]["grad_norm"]) and all(math.isfinite(r["loss"]) for r in rows)
    # a checkpoint follows a good step (not step 2) and the last one; step 4 applied nothing: weights, EMA as at 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [step_tag(s) for s in (1, 3, 4)]
    for ema in (False, True):
        before, _ = load_model_weights(tmp_path, step_tag(3), ema=ema)
        after, _ = load_model_weights(tmp_path, step_tag(4), ema=ema)
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all_finite(tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "skipped" / "nonfinite_rank0.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged} == {2, 4} and {r["action"] for r in logged} == {"skipped"}


def test_nan_data_rolls_back_and_its_sample_is_never_drawn_again(tmp_path, monkeypatch):
    bad = "random-000000005"  # drawn by step 3 (batch 2 of samples 4, 5)
    rows = drill(tmp_path, f"faults.nan_samples=[{bad}]", "sentinel.skips_in_row=1", "steps=6", monkeypatch=monkeypatch)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 3 is logged once, after the rollback
    assert rows[-1]["rollbacks"] == 1 and all(math.isfinite(r["loss"]) for r in rows)
    quarantined = [json.loads(line) for line in (tmp_path / "skipped" / "quarantine.jsonl").read_text().splitlines()]
    assert [q["key"] for q in quarantined] == [bad] and quarantined[0]["step"] == 3
    assert all_finite(tmp_path)


def test_an_absurd_learning_rate_stops_after_the_rollbacks_and_never_saves_non_finite_weights(tmp_path, monkeypatch):
    overrides = ("optim.optimizer.lr=1e30", "sentinel.min_history=1", "sentinel.max_rollbacks=2", "steps=10")
    with pytest.raises(Diverged, match=r"diverged 3 times .*max_rollbacks=2.*step \d+ -> \d+"):
        drill(tmp_path, *overrides, monkeypatch=monkeypatch)
    assert all_finite(tmp_path)  # every checkpoint written, `latest` too, holds finite weights
    assert len((tmp_path / "skipped" / "quarantine.jsonl").read_text().splitlines()) > 0
