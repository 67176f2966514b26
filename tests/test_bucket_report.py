"""The bucket report (src/data/bucket_report.py): samples per bucket, the batch each gets, who fits none and why."""

import logging

import pytest

from src.data.bucket_report import main
from src.data.bucket_table import collapsed_aspect_ratios, format_report
from src.data.buckets import BucketConfig
from src.data.catalog import SampleInfo, ShardInfo
from src.data.plan import Planner
from src.data.shards import VideoShardDataset, unfit_samples
from tests.conftest import ROOT

SHARDS = str(ROOT / "tests/fixtures/shards")  # 16 clips of 32x32, 12 frames at 8 fps


def enough_frames(meta, num_frames):
    return meta["frames"] >= num_frames


def plan(metas: list[dict], buckets: BucketConfig, ranks: int = 2) -> tuple[Planner, list]:
    samples = [SampleInfo(f"{i:04d}", "mp4", meta) for i, meta in enumerate(metas)]
    shards = [ShardInfo("shard-0.tar", samples)]
    unfit = unfit_samples(shards, lambda meta: buckets.why_no_bucket(meta, enough_frames))
    return Planner(shards, buckets, enough_frames, ranks), unfit


def row(report: str, bucket: str) -> list[str]:
    return next(line.split() for line in report.splitlines() if line.startswith(bucket + " "))


def test_the_table_counts_each_bucket_its_batches_and_names_who_fits_none():
    buckets = BucketConfig({"32px": {"8": [1.0, 2], "4": [1.0, 3]}}, aspect_ratios=["1:1", "16:9"], size_multiple=8)
    square, wide, small, short = (
        {"width": 32, "height": 32, "frames": 12, "fps": 8},
        {"width": 64, "height": 36, "frames": 6, "fps": 8},
        {"width": 16, "height": 16, "frames": 12, "fps": 8},
        {"width": 32, "height": 32, "frames": 2, "fps": 8},
    )
    planner, unfit = plan([square] * 9 + [wide] * 3 + [small, short], buckets)
    report = format_report(planner, unfit)
    assert "buckets of 14 samples in 1 shards on 2 data-parallel ranks" in report
    # bucket, samples, batch per rank, global batch (x 2 ranks), full global batches an epoch
    assert row(report, "32px/8f/32x32") == ["32px/8f/32x32", "9", "2", "4", "2"]
    assert row(report, "32px/4f/24x40") == ["32px/4f/24x40", "3", "3", "6", "0"]  # 16:9 is 24 high, 40 wide
    assert row(report, "32px/8f/24x40") == ["32px/8f/24x40", "0", "2", "4", "0"]  # configured, empty: listed too
    assert "2 samples fit no bucket:" in report
    assert "shard-0.tar:0012: 16x16 (256 px) is smaller than the smallest resolution 32px" in report
    assert "shard-0.tar:0013: 32x32 (1024 px), 2 frames at 8 fps: too short for 4 frames" in report


def test_samples_the_coins_declined_are_counted_apart():
    buckets = BucketConfig({"32px": {"8": [0.5, 1]}}, aspect_ratios=["1:1"], size_multiple=8)
    planner, unfit = plan([{"width": 32, "height": 32, "frames": 12, "fps": 8}] * 40, buckets, ranks=1)
    report = format_report(planner, unfit)
    taken = int(row(report, "32px/8f/32x32")[1])
    assert 0 < taken < 40 and "0 samples fit no bucket" in report
    assert f"{40 - taken} samples fit only buckets of probability < 1 whose coins declined them" in report


def test_aspect_ratios_a_coarse_size_multiple_merges_are_named():
    # the example: at 128px and size_multiple 32, 4:3 and 16:9 both become 96 high and 160 wide
    coarse = BucketConfig({"128px": {"1": [1.0, 1]}}, aspect_ratios=["1:1", "4:3", "16:9"], size_multiple=32)
    assert collapsed_aspect_ratios(coarse) == [
        "128px: aspect ratios 4:3, 16:9 all become 96x160 (height x width): size_multiple 32 is too coarse to keep "
        "them apart"
    ]
    fine = BucketConfig({"128px": {"1": [1.0, 1]}}, aspect_ratios=["1:1", "4:3", "16:9"], size_multiple=16)
    assert collapsed_aspect_ratios(fine) == []


def test_the_command_reads_shards_and_a_bucket_config(capsys):
    main([SHARDS, "--buckets", "smoke", "--ranks", "2"])
    out = capsys.readouterr().out
    assert row(out, "32px/8f/32x32") == ["32px/8f/32x32", "16", "2", "4", "4"]
    # every other source frame: 12 frames give 6, too few for the 8-frame bucket; each sample named with why
    main([SHARDS, "--buckets", "smoke", "--frame-stride", "2"])
    out = capsys.readouterr().out
    assert "16 samples fit no bucket:" in out
    assert out.count("12 frames at 8 fps: too short for 8 frames") == 16


def test_an_unknown_bucket_config_is_named():
    with pytest.raises(
        ValueError, match=r"bucket config 'nope' is neither a file nor one of conf/data/buckets/: .*smoke"
    ):
        main([SHARDS, "--buckets", "nope"])


def test_training_logs_the_table_and_the_merge_warning_at_scan(caplog, tmp_path):
    buckets = BucketConfig({"32px": {"8": [1.0, 2]}}, aspect_ratios=["1:1", "4:3"], size_multiple=32)
    with caplog.at_level(logging.INFO, logger="src.data.bucket_table"):
        VideoShardDataset(SHARDS, buckets, skip_dir=tmp_path)
    messages = [r.getMessage() for r in caplog.records if r.name == "src.data.bucket_table"]
    assert any("32px/8f/32x32" in m and "samples" in m for m in messages), messages
    assert any("aspect ratios 1:1, 4:3 all become 32x32" in m for m in messages), messages
