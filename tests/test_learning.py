"""Learning you can see, the pure parts: hold-out choice, validation loss and probes, sample health, the judge,
the per-bin training loss, the stage report gate. Runs that train are in tests/test_learning_runs.py."""

import json

import numpy as np
import pytest
import torch

from src.data.catalog import SampleInfo, ShardInfo
from src.data.holdout import choose, split
from src.data.judge import demo_prompts, judge_data, read_video, score
from src.data.synthetic import ClipSpec, render_clip, write_synthetic_shards
from src.evaluation.evaluator import probe_alarms
from src.evaluation.health import health_alarms, health_ratios, video_stats
from src.evaluation.validation import ValidationSet, bin_times, evaluate, gap
from src.run.metrics import LossBreakdown
from src.stages import UNHEALTHY, describe_report, run_curriculum


def shards(order=(0, 1, 2)) -> list[ShardInfo]:
    made = [ShardInfo(f"/d/shard-{i}.tar", [SampleInfo(f"{i}{k:03d}", "mp4", {}) for k in range(20)]) for i in range(3)]
    return [made[i] for i in order]


def test_the_held_out_clips_depend_only_on_their_keys():
    picked = [(sh.url, s.key) for sh, s in choose(shards(), 5, lambda s: True)]
    assert picked == [(sh.url, s.key) for sh, s in choose(shards((2, 0, 1)), 5, lambda s: True)]
    kept, held = split(shards(), 5, lambda s: True)
    assert sum(len(sh.samples) for sh in kept) == 55
    held_keys = {s.key for _, s in held}
    assert not held_keys & {s.key for sh in kept for s in sh.samples}  # never trained on
    assert all(s.key.startswith("1") for _, s in choose(shards(), 3, lambda s: s.key.startswith("1")))
    with pytest.raises(ValueError, match="eval.val=61 clips asked for, but only 60"):
        choose(shards(), 61, lambda s: True)


def _val(n=6) -> ValidationSet:
    g = torch.Generator().manual_seed(0)
    return ValidationSet(
        torch.randn(n, 4, 3, 2, 2, generator=g), torch.randn(n, 5, 8, generator=g), torch.randn(n, 8, generator=g),
        [f"k{i}" for i in range(n)], [f"c{i}" for i in range(n)],
    )  # fmt: skip


def test_a_model_that_ignores_text_and_time_shows_no_gap_and_one_that_reads_them_does():
    val = _val()

    def blind(x, txt, vec, t):  # the best guess without knowing x0: zero clean latent
        return x / t.view(-1, 1, 1, 1, 1)

    row = evaluate(blind, val, torch.zeros(5, 8), torch.zeros(8), bins=4)
    assert row["probe_text_gap"] == 0 and row["probe_empty_gap"] == 0  # the text changes no output
    assert len(row["val_loss_by_t"]) == 4

    lookup = {tuple(v.tolist()): x0 for v, x0 in zip(val.vec, val.x0, strict=True)}

    def oracle(x, txt, vec, t):  # knows each clip's x0 from its caption: exact velocity x1 - x0
        x0 = torch.stack([lookup.get(tuple(v.tolist()), torch.zeros_like(val.x0[0])) for v in vec])
        tt = t.view(-1, 1, 1, 1, 1)
        return (x - x0) / tt  # x = (1 - t) x0 + t x1  ->  x1 - x0 = (x - x0) / t

    row = evaluate(oracle, val, torch.zeros(5, 8), torch.zeros(8), bins=4)
    assert row["val_loss"] < 1e-9
    for probe in ("time", "order", "text", "empty"):
        assert row[f"probe_{probe}_gap"] > 3 * row[f"probe_{probe}_se"] > 0


def test_gap_and_its_standard_error():
    true = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    g, se = gap(true + torch.tensor([[0.1], [0.3], [0.2]]), true)
    assert g == pytest.approx(0.2 / 2.0)
    assert se == pytest.approx(0.1 / 3**0.5 / 2.0)  # std 0.1 of the per-clip differences, over sqrt(3), / mean
    assert bin_times(4).tolist() == [0.125, 0.375, 0.625, 0.875]


def test_probe_alarms_fire_on_no_gap_only():
    quiet = {"probe_order_gap": 0.002, "probe_order_se": 0.002, "probe_text_gap": 0.2, "probe_text_se": 0.01}
    (alarm,) = probe_alarms(quiet, 0.01, 3.0)
    assert alarm.startswith("order probe gap +0.0020") and "frame order" in alarm
    assert probe_alarms({**quiet, "probe_order_gap": 0.05}, 0.01, 3.0) == []
    assert len(probe_alarms({**quiet, "probe_order_gap": 0.05, "probe_order_se": 0.02}, 0.01, 3.0)) == 1  # z 2.5
    assert probe_alarms(quiet, 0.01, 3.0, probes=("text",)) == []


def _clip(direction="right", frames=8, size=32) -> torch.Tensor:
    spec = ClipSpec("red", "square", direction, "", 5.0, 8.0, 24.0, 16.0, 20)
    if direction == "left":
        spec = ClipSpec("red", "square", direction, "", 5.0, 24.0, 8.0, 16.0, 20)
    video = torch.from_numpy(render_clip(spec, frames, size)).float()  # (T, H, W, 3)
    return (video.permute(3, 0, 1, 2) / 127.5 - 1)[None]  # (1, 3, T, H, W)


def test_health_reads_black_static_blurry_and_flickering_video():
    real = video_stats(_clip())
    assert real["motion"] > 0.005 and real["flicker"] < 0.005  # the shape covers whole pixels: a little flicker
    black = health_ratios(video_stats(torch.full_like(_clip(), -1.0)), real)
    assert black["brightness"] == 0 and "brightness" in health_alarms(black, {"brightness": (0.5, 2.0)})[0]
    static = health_ratios(video_stats(_clip()[:, :, :1].expand_as(_clip())), real)
    assert static["motion"] == 0 and static["brightness"] == pytest.approx(1, rel=0.05)
    blurred = torch.nn.functional.avg_pool3d(_clip(), (1, 5, 5), stride=1, padding=(0, 2, 2))
    assert health_ratios(video_stats(blurred), real)["sharpness"] < 0.5
    flicker = _clip() + torch.tensor([0.0, 0.3] * 4).view(1, 1, 8, 1, 1)
    contrast_floor = 0.1 * real["contrast"]  # the data hardly flickers: compared with a tenth of its contrast
    expected = video_stats(flicker)["flicker"] / max(real["flicker"], contrast_floor)
    assert health_ratios(video_stats(flicker), real)["flicker"] == pytest.approx(expected) and expected > 3
    assert health_alarms(static, {"motion": (0.4, None), "flicker": (None, 3.0)}) == [
        "motion ratio 0.000 outside [0.4, None] of the data's"
    ]
    with pytest.raises(ValueError, match="eval.health bounds name 'blur'"):
        health_alarms(static, {"blur": (0.5, 2)})


def test_the_judge_reads_colour_and_direction_of_rendered_clips():
    readings = []
    for direction in ("left", "right"):
        frames = ((_clip(direction)[0].permute(1, 2, 3, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
        readings.append(read_video(frames))
        assert (readings[-1].colour, readings[-1].direction) == ("red", direction)
    still = np.repeat(frames[:1], 8, axis=0)
    assert read_video(still).direction == "static"
    assert read_video(np.zeros((8, 32, 32, 3), np.uint8)).colour == "none"
    assert len(demo_prompts()) == 96 and len({p for p, *_ in demo_prompts()}) == 96
    result = score(readings, [("red", "left"), ("blue", "up")])
    assert (result["colour_acc"], result["direction_acc"], result["both_acc"]) == (0.5, 0.5, 0.5)


def test_the_judge_scores_the_generated_clips_perfectly(tmp_path):
    write_synthetic_shards(tmp_path, num_clips=48, clips_per_shard=24, frames=16, size=32)
    result = judge_data(str(tmp_path))
    assert result["n"] == 48 and result["colour_acc"] == 1.0 and result["direction_acc"] == 1.0


def test_training_loss_by_timestep_bin_and_bucket():
    b = LossBreakdown(torch.device("cpu"), bins=4)
    b.add(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.2, 0.9]), torch.tensor([True, True, False]), "a")
    b.add(torch.tensor([5.0]), torch.tensor([1.0]), torch.tensor([True]), "b")
    fields = b.fields()
    assert fields["loss_by_t"] == [1.5, None, None, 5.0]  # t = 1.0 falls in the last bin; invalid clips count 0
    assert fields["loss_by_bucket"] == {"a": 1.5, "b": 5.0}
    assert b.fields()["loss_by_t"] == [None] * 4  # reset after each row


def test_require_healthy_refuses_a_stage_after_an_alarm(tmp_path, caplog):
    first, second = tmp_path / "one", tmp_path / "two"
    (first / "checkpoints" / "step_00000002").mkdir(parents=True)
    (first / "checkpoints" / "latest").write_text("step_00000002")
    report = {"step": 2, "evaluated_step": 2, "val_loss": 0.5, "probes": {"time_gap": 0.0, "time_se": 0.01},
              "health": {"motion": 0.1}, "alarms": ["motion ratio 0.100 outside [0.4, 2.5] of the data's"],
              "healthy": False}  # fmt: skip
    (first / "stage_report.json").write_text(json.dumps(report))
    stages = [
        {"experiment": "a", "run_dir": first, "steps": 2, "previous": None, "preprocess": None, "train": ["false"]},
        {"experiment": "b", "run_dir": second, "steps": 2, "preprocess": None, "train": ["false"]},
    ]
    stages[1]["previous"] = stages[0]
    assert run_curriculum(stages, require_healthy=True) == UNHEALTHY
    assert "ended unhealthy: motion ratio 0.100" in caplog.text
    assert "ALARM: motion ratio" in describe_report("stage 1", report)
    assert run_curriculum(stages, require_healthy=False) == 1  # without the gate, stage 2 starts (and `false` fails)
