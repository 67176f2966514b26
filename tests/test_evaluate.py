"""Evaluation during training on several ranks: fixed-prompt videos, validation, probes and health."""

import json

import av
import pytest

from src.run.metrics import read_metrics
from tests.test_train import train


@pytest.mark.dist
def test_a_zero3_run_writes_the_same_prompts_at_each_evaluation(tmp_path):
    train(tmp_path, "eval.every=2", "eval.steps=2", "eval.prompts=[a red square,a blue circle]")
    for step in ("step_00000002", "step_00000004"):
        videos = sorted((tmp_path / "eval" / step).glob("*.mp4"))
        assert [v.name for v in videos] == ["00_a_red_square.mp4", "01_a_blue_circle.mp4"]
        with av.open(str(videos[0])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)  # the smoke bucket: 8 frames of 32x32


@pytest.mark.dist
@pytest.mark.parametrize("parallel", ["zero3", "sp2"])
def test_validation_probes_and_health_run_on_two_ranks_without_deadlock(tmp_path, parallel):
    # every rank evaluates the held-out clips and samples the prompts in the same order (ZeRO-3 gathers weights in
    # each forward; sequence parallelism splits each forward over both ranks); rank 0 alone writes
    extra = ["parallel.sp_size=2"] if parallel == "sp2" else []
    train(tmp_path, "eval.val=4", "eval.val_every=2", "eval.every=4", "eval.steps=2", "eval.prompts=[a red square]",
          *extra)  # fmt: skip
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert all(len(r["val_loss_by_t"]) == 8 and r["probe_time_se"] > 0 for r in evals)
    assert set(evals[-1]["health"]) == {"brightness", "contrast", "motion", "sharpness", "flicker"}
    report = json.loads((tmp_path / "stage_report.json").read_text())
    assert report["step"] == 4 and report["val_loss"] == evals[-1]["val_loss"]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(rows[0]["loss_by_t"]) == 8


@pytest.mark.dist
def test_a_zero3_run_samples_its_eval_images_with_both_ranks_in_every_forward(tmp_path):
    # rank 1 encodes the image too and takes part in each of the three guidance branches' forwards; rank 0 writes
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "red.png")
    images = f"eval.images=[{{prompt: a red square, image: {tmp_path / 'red.png'}, type: i2v_loop}}]"
    train(tmp_path / "run", "model.cond_channels=49", "diffusion.cond={t2v: 1, i2v_loop: 1}", "eval.every=4",
          "eval.steps=2", images)  # fmt: skip
    (row,) = read_metrics(tmp_path / "run", "eval")
    assert [p.rsplit("/", 2)[-2:] for p in row["eval_videos"]] == [["step_00000004", "00_i2v_loop_a_red_square.mp4"]]
    with av.open(row["eval_videos"][0]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and all(abs(frames[i].mean(axis=(0, 1)) - (200, 40, 40)).max() < 4 for i in (0, -1))
