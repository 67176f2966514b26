"""Fixed-prompt evaluation during training: when it runs, and the videos of a 2-rank ZeRO-3 run."""

import av
import pytest

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
