"""What src.sample draws by default and how it names the weights (the sampling itself: tests/test_train.py)."""

import json

from omegaconf import OmegaConf

from src.sample import default_shape, trained_buckets, weights_label

SMOKE_BUCKETS = {"_target_": "src.data.buckets.BucketConfig", "resolutions": {"32px": {"8": [1.0, 2]}}}
WIDE = {
    "_target_": "src.data.buckets.BucketConfig",
    "resolutions": {"256px": {"33": [1.0, 4], "65": [1.0, 1]}, "128px": {"65": [1.0, 4]}},
    "aspect_ratios": ["9:16", "1:1", "16:9"],
}


def test_the_default_shape_is_the_largest_bucket_the_run_trained_on():
    cfg = OmegaConf.create({"data": {"buckets": WIDE}})
    # all clips were 16:9: the square 256px bucket, configured but never trained on, is not drawn
    trained = {"128px/65f/96x176", "256px/33f/192x336", "256px/65f/192x336"}
    assert default_shape(cfg, trained) == (65, 192, 336, "the largest bucket the run trained on")


def test_without_metrics_the_largest_configured_bucket_closest_to_square():
    cfg = OmegaConf.create({"data": {"buckets": WIDE}})
    assert default_shape(cfg) == (65, 256, 256, "the largest configured bucket (256px, closest to square)")
    cfg = OmegaConf.create({"data": {"buckets": SMOKE_BUCKETS}})
    assert default_shape(cfg)[:3] == (8, 32, 32)


def test_trained_buckets_are_read_from_the_logged_rows(tmp_path):
    assert trained_buckets(tmp_path) == set()  # an export: no metrics.jsonl
    rows = [
        {"step": 1, "loss": 1.0, "loss_by_bucket": {"32px/8f/32x32": 1.0}},
        {"step": 2, "loss": 0.9, "loss_by_bucket": {"32px/8f/32x32": 0.8, "32px/8f/24x40": 1.0}},
        {"step": 2, "val_loss": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trained_buckets(tmp_path) == {"32px/8f/32x32", "32px/8f/24x40"}


def test_the_weights_are_named_once():
    assert weights_label("step_00000004", ema=True) == "step_00000004 (EMA)"
    assert weights_label("step_00000004", ema=False) == "step_00000004"
    # an export's tag already says what it holds: not "(EMA) (EMA)"
    assert weights_label("export:step_00000004 (EMA)", ema=True) == "export:step_00000004 (EMA)"
