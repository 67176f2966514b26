"""Learning you can see, on real (short) training runs: negative controls raise the right alarm, a healthy run raises
none, and a tiny run learns time, text and the direction of motion (the learning regression test).

All in-process on the local engine (one process, the CPU's threads) over a freshly generated synthetic set, with
conf/experiment/learning_check.yaml (the demo's stage 1 recipe on a 1.9M-parameter model, 600 steps; see
docs/learning.md); the negative controls start from its final weights. Marked `slow`: a few minutes on 2 cores.
"""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from src.data.judge import judge_run
from src.data.synthetic import write_synthetic_shards
from src.evaluation import LearningAlarm
from src.parallel.dist import shutdown
from src.run.metrics import read_metrics
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The learning check's data (conf/experiment/learning_check.yaml), generated in a few seconds."""
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(out, 512, 64, frames=24, size=64, radius=(0.12, 0.2), slack=0.05, lane=0.3)  # as demo.sh
    return out


def run(run_dir, clips, *overrides: str, monkeypatch=None) -> list[dict]:
    """Train the learning-check experiment in this process; returns the eval rows of metrics.jsonl."""
    from src.train import train

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if monkeypatch is not None:
            monkeypatch.delenv(var, raising=False)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=learning_check", f"data.urls={clips}", *overrides])
    try:
        train(cfg, run_dir)
    finally:
        shutdown()
    return read_metrics(run_dir, "eval")


def report(run_dir) -> dict:
    return json.loads((run_dir / "stage_report.json").read_text())


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, clips):
    run_dir = tmp_path_factory.mktemp("healthy")
    with pytest.MonkeyPatch.context() as mp:
        rows = run(run_dir, clips, monkeypatch=mp)
    return run_dir, rows


def test_a_healthy_run_learns_motion_and_text_and_raises_no_alarm(healthy):
    run_dir, rows = healthy
    final = report(run_dir)
    assert final["alarms"] == [] and final["healthy"]
    probes = final["probes"]
    for probe in ("time", "order", "text"):  # clearly positive: well above the alarm's bounds
        assert probes[f"{probe}_gap"] > 0.02 and probes[f"{probe}_gap"] > 5 * probes[f"{probe}_se"], probes
    assert [r["step"] for r in rows if "val_loss" in r] == [600]


def test_the_learning_check_draws_the_captions_colour_and_direction(healthy):
    run_dir, _ = healthy
    result = judge_run(run_dir, steps=10)
    summary = {k: result[k] for k in ("colour_acc", "direction_acc", "directions_read")}
    assert result["colour_acc"] >= 0.7 and result["direction_acc"] >= 0.75, summary


def control(healthy, tmp_path, clips, *overrides: str, monkeypatch) -> list[str]:
    """A short run from the healthy run's final weights with one thing taken away: the alarms it ends with. The
    healthy model had clear gaps with these very weights, so a gap that vanishes is the removal's doing."""
    steps = ["steps=20", "eval.val_every=20", "eval.every=20", "eval.alarm_after=20", "ckpt_every=20"]
    run(tmp_path, clips, f"init_from={healthy[0]}", *steps, *overrides, monkeypatch=monkeypatch)
    return report(tmp_path)["alarms"]


def test_time_removed_the_time_probes_raise_the_alarm(healthy, tmp_path, clips, monkeypatch):
    # no temporal RoPE (head_dim 64 = 0 + 32 + 32): the model cannot tell one frame from another
    probes = "eval.alarm_probes=[time,order,text]"
    alarms = control(healthy, tmp_path, clips, "model.axes_dim=[0,32,32]", probes, monkeypatch=monkeypatch)
    assert any(a.startswith("time probe gap") for a in alarms), alarms
    assert any(a.startswith("order probe gap") for a in alarms), alarms
    assert not any(a.startswith("text probe gap") for a in alarms), alarms


def test_text_removed_the_text_probe_raises_the_alarm(healthy, tmp_path, clips, monkeypatch):
    # a wrongly loaded encoder: every caption's features are the same (zeros), as are the empty prompt's
    from src.models.text import HFTextEncoder

    def zeros(self, captions):
        return torch.zeros(len(captions), self.max_length, self.dim), torch.zeros(len(captions), self.pooled_dim)

    monkeypatch.setattr(HFTextEncoder, "forward", zeros)
    alarms = control(healthy, tmp_path, clips, "text.canary=false", monkeypatch=monkeypatch)  # the canary refuses it
    assert any(a.startswith("text probe gap") for a in alarms), alarms


def test_a_model_that_draws_black_video_raises_the_brightness_alarm_and_stops(healthy, tmp_path, clips, monkeypatch):
    from src.models.mmdit import MMDiT

    trained = MMDiT.forward

    def black(self, x, txt, vec, t, cond=None):
        if torch.is_grad_enabled():  # training as usual; sampling goes straight to a black video (-1 everywhere)
            return trained(self, x, txt, vec, t, cond)
        return (x + 1) / t.view(-1, 1, 1, 1, 1)  # x_t = (1 - t) (-1) + t x1  ->  v = x1 + 1 = (x_t + 1) / t

    monkeypatch.setattr(MMDiT, "forward", black)
    with pytest.raises(LearningAlarm, match="brightness ratio 0.000"):
        control(healthy, tmp_path, clips, "eval.alarms=stop", monkeypatch=monkeypatch)
    final = report(tmp_path)
    assert any(a.startswith("brightness ratio") for a in final["alarms"]) and not final["healthy"]
    assert (tmp_path / "checkpoints" / "latest").is_file()  # the stopping step is checkpointed
