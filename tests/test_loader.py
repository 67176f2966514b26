"""The bucketed shard loader: bucket rules, the catalogue, rank x worker splits, exact resume, bad data."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from src.data.buckets import Bucket, BucketConfig, aspect_shapes, resolution_area
from src.data.catalog import expand_urls, scan_shards
from src.data.shards import VideoShardDataset, build_loader
from src.data.synthetic import write_synthetic_shards
from src.data.video_memo import VideoMemo

CLIPS, PER_SHARD, FRAMES, SIZE = 24, 6, 12, 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, CLIPS, PER_SHARD, FRAMES, SIZE, fps=8, seed=3)
    return out


def one_bucket(batch: int = 2, frames: int = 4) -> BucketConfig:
    return BucketConfig({"16px": {frames: [1.0, batch]}}, aspect_ratios=["1:1"], size_multiple=8)


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def indices(batches: list[dict]) -> list[int]:
    return [g for b in batches for g in b["index"].tolist()]


# ---------------------------------------------------------------- buckets


def test_resolution_names_and_aspect_shapes():
    assert resolution_area("256px") == 256 * 256 and resolution_area("720p") == 720 * 1280
    shapes = aspect_shapes(256 * 256, ["9:16", "1:1", "16:9"], 16)
    assert shapes["1:1"] == (256, 256)
    assert shapes["16:9"] == (192, 336) and shapes["9:16"] == (336, 192)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in shapes.values())
    with pytest.raises(ValueError, match="'<N>px'"):
        resolution_area("big")
    with pytest.raises(ValueError, match="W:H"):
        aspect_shapes(100, ["wide"], 8)


def test_bucket_assignment_rules():
    buckets = BucketConfig(
        {"64px": {"1": [1.0, 16], "8": [1.0, 4]}, "32px": {"8": [1.0, 8], "16": [0.0, 2]}},
        aspect_ratios=["9:16", "1:1", "16:9"],
        size_multiple=8,
    )
    enough = lambda meta, frames: meta["frames"] >= frames  # noqa: E731
    rng = random.Random(0)
    # a large landscape video: the biggest resolution, the longest clip it holds, the nearest aspect
    assert buckets.assign({"width": 128, "height": 72, "frames": 30}, rng, enough) == Bucket("64px", 8, 48, 88, 4)
    # too small for 64px: never upscaled, goes to 32px; 16 frames has probability 0, so 8 frames
    assert buckets.assign({"width": 40, "height": 40, "frames": 30}, rng, enough) == Bucket("32px", 8, 32, 32, 8)
    # an image fits only 1-frame buckets
    assert buckets.assign({"width": 64, "height": 64, "frames": 1}, rng, enough).num_frames == 1
    # smaller than every bucket, or too short for every video bucket at that size
    assert buckets.assign({"width": 16, "height": 16, "frames": 30}, rng, enough) is None
    assert buckets.assign({"width": 40, "height": 40, "frames": 3}, rng, enough) is None
    assert buckets.frame_counts() == [1, 8, 16]


def test_bucket_probability_is_a_seeded_coin():
    buckets = BucketConfig({"32px": {"8": [0.25, 2], "1": [1.0, 2]}}, aspect_ratios=["1:1"], size_multiple=8)
    meta = {"width": 32, "height": 32, "frames": 10}
    picks = [buckets.assign(meta, random.Random(i), lambda m, f: m["frames"] >= f).num_frames for i in range(4000)]
    assert picks.count(8) / len(picks) == pytest.approx(0.25, abs=0.03)
    assert buckets.assign(meta, random.Random(7), lambda m, f: True) == buckets.assign(
        meta, random.Random(7), lambda m, f: True
    )


def test_bad_bucket_configs_name_the_value():
    with pytest.raises(ValueError, match="probability=1.5"):
        BucketConfig({"32px": {"8": [1.5, 2]}})
    with pytest.raises(ValueError, match=r"expected \[probability, batch_size\]"):
        BucketConfig({"32px": {"8": 2}})
    with pytest.raises(ValueError, match="names no resolution"):
        BucketConfig({})
    with pytest.raises(ValueError, match="batch_scale must be > 0, got 0"):
        BucketConfig({"32px": {"8": [1.0, 2]}}, batch_scale=0)
    scaled = BucketConfig({"32px": {"8": [1.0, 3], "1": [1.0, 1]}}, ["1:1"], batch_scale=0.5)
    assert [b.batch_size for b in scaled.all_buckets()] == [2, 1]


def test_a_config_no_sample_fits_is_an_error_at_start(shards):
    too_big = BucketConfig({"256px": {"8": [1.0, 2]}}, aspect_ratios=["1:1"])
    with pytest.raises(ValueError, match=r"no sample of the data \(24\) fits any bucket.*Largest video: 32x32"):
        VideoShardDataset(shards, too_big)
    too_long = BucketConfig({"16px": {"64": [1.0, 2]}}, aspect_ratios=["1:1"], size_multiple=8)
    with pytest.raises(ValueError, match="longest: 12 frames"):
        VideoShardDataset(shards, too_long)


# ---------------------------------------------------------------- catalogue


def test_catalogue_reads_probes_and_locations(shards):
    found, skips = scan_shards(expand_urls(shards))
    assert not skips and [len(s.samples) for s in found] == [PER_SHARD] * (CLIPS // PER_SHARD)
    sample = found[0].samples[0]
    assert sample.media == "mp4" and sample.meta["frames"] == FRAMES and sample.meta["width"] == SIZE
    with open(found[0].url, "rb") as f:
        f.seek(sample.caption_loc[0])
        assert f.read(sample.caption_loc[1]).decode().startswith("a")
    with pytest.raises(ValueError, match="matches no tar files"):
        expand_urls(str(shards / "nope-{0..3}.tar"))
    assert len(expand_urls(str(shards / "shard-{000000..000001}.tar"))) == 2


# ---------------------------------------------------------------- splits and order


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_two_ranks_by_two_workers_cover_the_epoch_exactly_once(shards):
    per_rank = []
    for rank in range(2):
        loader = build_loader(shards, one_bucket(batch=3), rank, 2, seed=1, num_workers=2)
        per_rank.append(take(loader, CLIPS // 6))  # 4 global batches of 2 ranks x 3 = one epoch
    seen = [set(indices(batches)) for batches in per_rank]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(CLIPS))
    # every batch of the pair is the same global batch: same bucket, interleaved slices
    for a, b in zip(*per_rank, strict=True):
        assert a["state"] == b["state"] and a["bucket"] == b["bucket"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_batches_do_not_depend_on_the_worker_count(shards):
    runs = [take(build_loader(shards, one_bucket(), 0, 2, seed=4, num_workers=w), 6) for w in (0, 1, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_the_video_memo_gives_bitwise_the_same_batches_over_epochs(shards, monkeypatch):
    """Three epochs with random starts and crops: the memo's batches (each video decoded once, every later clip
    picked from its frames) are the decoded ones; in a worker process as in the loop's own."""
    options = dict(seed=5, crop="random", frame_stride=2)
    plain = take(build_loader(shards, one_bucket(batch=4), 0, 1, **options), 3 * CLIPS // 4)
    for workers in (0, 1):
        memo = take(build_loader(shards, one_bucket(batch=4), 0, 1, num_workers=workers, memo_mb=8, **options), 18)
        for a, b in zip(plain, memo, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
    answered, fetch = [], VideoMemo.fetch  # whether the memo held each clip's video, in this process

    def spy(self, *args):
        hits = self.hits
        held = fetch(self, *args)
        answered.append(self.hits > hits)
        return held

    monkeypatch.setattr(VideoMemo, "fetch", spy)
    take(build_loader(shards, one_bucket(batch=4), 0, 1, memo_mb=8, **options), 3 * CLIPS // 4)
    assert answered == [False] * CLIPS + [True] * 2 * CLIPS  # decoded in the first epoch only
    with pytest.raises(ValueError, match=r"data.memo_mb must be >= 0 MiB .* got -1"):
        VideoShardDataset(shards, one_bucket(), memo_mb=-1)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1), (1, 3)])
def test_resume_with_another_rank_count_continues_exactly(shards, before, after):
    # two buckets of different batch sizes, so queues hold samples at the checkpoint
    buckets = BucketConfig({"16px": {"8": [0.5, 2], "4": [1.0, 3]}}, aspect_ratios=["1:1"], size_multiple=8)
    first = [take(build_loader(shards, buckets, r, before, seed=2), 3) for r in range(before)]
    state = first[0][-1]["state"]
    assert all(run[-1]["state"] == state for run in first)
    second = [take(build_loader(shards, buckets, r, after, seed=2, state=state), 8) for r in range(after)]
    consumed = [g for run in first + second for g in indices(run)]
    assert len(consumed) == len(set(consumed)), "a sample was repeated"
    final = second[0][-1]["state"]
    # nothing skipped: every sample read so far is consumed or still waiting in a queue
    assert set(consumed) | set(final["pending"]) == set(range(final["next"]))
    assert not set(consumed) & set(final["pending"])


@pytest.mark.parametrize("after", [1, 3])
def test_resume_on_another_rank_count_sees_the_uninterrupted_samples(shards, after):
    # one bucket: samples are consumed in stream order, so the same number of samples is the same set
    straight = take(build_loader(shards, one_bucket(), 0, 1, seed=6), 12)  # 24 samples
    before = [take(build_loader(shards, one_bucket(), r, 2, seed=6), 2) for r in range(2)]  # 8 samples
    state = before[0][-1]["state"]
    per_rank = 16 // (2 * after)
    rest = [take(build_loader(shards, one_bucket(), r, after, seed=6, state=state), per_rank) for r in range(after)]
    resumed = [g for run in before + rest for g in indices(run)]
    assert len(resumed) == len(set(resumed)) == 8 + per_rank * 2 * after
    expected = indices(straight)[: len(resumed)]
    assert sorted(resumed) == sorted(expected)


def test_pipe_urls_are_catalogued_and_read_by_streaming(shards):
    urls = [f"pipe:cat {p}" for p in expand_urls(shards)]
    piped = take(build_loader(urls, one_bucket(), 0, 1, seed=8), 5)
    local = take(build_loader(shards, one_bucket(), 0, 1, seed=8), 5)
    for a, b in zip(piped, local, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
        assert a["caption"] == b["caption"]


def test_resume_equals_the_uninterrupted_run(shards):
    straight = take(build_loader(shards, one_bucket(), 0, 1, seed=5), 10)
    part = take(build_loader(shards, one_bucket(), 0, 1, seed=5), 4)
    rest = take(build_loader(shards, one_bucket(), 0, 1, seed=5, state=part[-1]["state"]), 6)
    for a, b in zip(straight, part + rest, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
        assert a["caption"] == b["caption"]


def test_resume_refuses_changed_data(shards, tmp_path):
    state = take(build_loader(shards, one_bucket(), 0, 1), 1)[0]["state"]
    with pytest.raises(ValueError, match="the data changed since the checkpoint"):
        build_loader(expand_urls(shards)[:2], one_bucket(), 0, 1, state=state)
    with pytest.raises(ValueError, match="seed was 0, is 9"):
        build_loader(shards, one_bucket(), 0, 1, seed=9, state=state)


# ---------------------------------------------------------------- bad data


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def copy_samples(src: Path, dst: Path, edit) -> None:
    """Rewrite a shard, passing each (key, ext, data) through `edit` (None drops the member)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin:
            key, ext = info.name.split(".", 1)
            data = edit(key, ext, tin.extractfile(info).read())
            if data is not None:
                add_member(tout, info.name, data)


def test_bad_data_is_skipped_counted_and_named(shards, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tars = sorted(shards.glob("*.tar"))

    def corrupt(key, ext, blob):
        if key == "00000000" and ext == "mp4":
            return blob[:48] + bytes(len(blob) - 48)  # header kept, frames zeroed: the probe passes, decoding fails
        if key == "00000001" and ext == "txt":
            return None  # caption missing
        if key == "00000002" and ext == "json":
            return json.dumps({**json.loads(blob), "frames": 200}).encode()  # the probe lies: too short at decode
        return blob

    copy_samples(tars[0], data / "shard-000000.tar", corrupt)
    raw = tars[1].read_bytes()
    (data / "shard-000001.tar").write_bytes(raw[: len(raw) // 2])  # truncated tar
    (data / "shard-000002.tar").write_bytes(b"not a tar at all" * 100)  # unreadable shard
    (data / "shard-000003.tar").write_bytes(tars[3].read_bytes())

    # the lying probe (200 frames) sends sample 2 to the 16-frame bucket; its 12 real frames are too few
    buckets = BucketConfig({"16px": {"16": [1.0, 1], "12": [1.0, 2]}}, aspect_ratios=["1:1"], size_multiple=8)
    dataset = VideoShardDataset(data, buckets, seed=0, skip_dir=tmp_path / "skipped", shuffle=False)
    scan = {(s.key.rsplit("/", 1)[-1], s.reason) for s in dataset.scan_skips}
    assert ("00000001", "missing_txt") in scan
    assert ("shard-000001.tar", "truncated_shard") in scan
    assert ("shard-000002.tar", "unreadable_shard") in scan
    batches = take(dataset, 6)
    failed = {k: sum(b["failed"][k] for b in batches) for k in batches[0]["failed"]}
    bad = {key for b in batches for key, ok in zip(b["key"], b["valid"].tolist(), strict=True) if not ok}
    assert bad == {"00000000", "00000002"}
    assert failed["decode_error"] == 1 and failed["too_short"] == 1
    named = [json.loads(line) for line in (tmp_path / "skipped/rank0.jsonl").read_text().splitlines()]
    assert {(r["key"].rsplit(":", 1)[-1], r["reason"]) for r in named} == {
        ("00000000", "decode_error"),
        ("00000002", "too_short"),
    }
    catalog = (tmp_path / "skipped/catalog.jsonl").read_text()
    assert "missing_txt" in catalog and "unreadable_shard" in catalog and "truncated_shard" in catalog
    for b in batches:  # invalid clips are zeros and every clip has the bucket's shape
        frames = int(b["bucket"].split("/")[1].removesuffix("f"))
        assert b["video"].shape == ({16: 1, 12: 2}[frames], 3, frames, 16, 16)
        assert torch.count_nonzero(b["video"][~b["valid"]]) == 0


# ---------------------------------------------------------------- from a folder of media to batches


def test_written_shards_of_mixed_codecs_and_images_load_in_their_buckets(tmp_path):
    from src.data.write import write_shards
    from tests.media import make_media_folder

    planted = make_media_folder(tmp_path / "media")
    index = write_shards(planted["root"], tmp_path / "shards", workers=2, min_frames=planted["min_frames"])
    assert index["totals"]["samples"] == len(planted["good"])
    buckets = BucketConfig(
        {"32px": {"1": [1.0, 2], "4": [1.0, 2]}}, aspect_ratios=["3:4", "1:1", "16:9"], size_multiple=8
    )
    dataset = VideoShardDataset(tmp_path / "shards", buckets, fps=8.0, crop="random", seed=1)
    assert not dataset.scan_skips and dataset.fitting == len(planted["good"])
    batches = take(dataset, 12)
    seen = {key for b in batches for key in b["key"]}
    assert len(seen) == len(planted["good"])  # every written sample came out, images and every codec
    assert all(b["valid"].all() for b in batches)
    shapes = {tuple(b["video"].shape[1:]) for b in batches}
    assert {(3, 1, 24, 40), (3, 1, 40, 24)} <= shapes  # the two images: clips of one frame, in their aspect
    assert {(3, 4, 24, 40), (3, 4, 40, 24), (3, 4, 32, 32)} <= shapes  # landscape, portrait and square videos
    for b in batches:
        assert b["video"].min() >= -1 and b["video"].max() <= 1


def test_shards_without_probes_are_probed_like_the_writer_does(shards, tmp_path):
    src = sorted(shards.glob("*.tar"))[0]
    copy_samples(src, tmp_path / "shard-000000.tar", lambda key, ext, blob: None if ext == "json" else blob)
    found, skips = scan_shards(expand_urls(tmp_path))
    assert not skips and len(found[0].samples) == PER_SHARD
    meta = found[0].samples[0].meta
    assert (meta["frames"], meta["width"], meta["height"], meta["codec"]) == (FRAMES, SIZE, SIZE, "h264")
    assert meta["fps"] == pytest.approx(8.0)


def repeated_frames(clip: torch.Tensor) -> int:
    """How many frames of a (3, T, H, W) clip equal the frame before them."""
    return sum(torch.equal(clip[:, t], clip[:, t + 1]) for t in range(clip.shape[1] - 1))


def test_a_list_fps_column_is_the_videos_frame_rate_for_windows_bucketing_and_sampling(tmp_path):
    from src.data.catalog import MemberReader
    from src.data.shards import ClipOptions
    from src.data.write import write_shards
    from tests.media import make_video

    video = str(make_video(tmp_path / "clip.mp4", fps=8, frames=16))  # muxed at 8 fps, declared 16 below
    rows = [
        {"path": video, "caption": "as muxed"},
        {"path": video, "caption": "shot at 16 fps", "fps": 16},
        {"path": video, "caption": "its second half", "fps": 16, "start": 0.5},
        {"path": video, "caption": "the container's rate, confirmed", "fps": 8.004},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_shards(tmp_path / "list.jsonl", tmp_path / "shards", workers=1)
    [shard], skips = scan_shards(expand_urls(tmp_path / "shards"))
    assert not skips
    muxed, declared, half, confirmed = (s.meta for s in shard.samples)
    assert (muxed["fps"], muxed["duration"], "container_fps" in muxed) == (8.0, 2.0, False)
    assert (declared["fps"], declared["container_fps"], declared["duration"]) == (16.0, 8.0, 1.0)
    assert half["window_frames"] == 8  # [0.5 s, end) is frames 8-15 at 16 fps (12 frames at the container's 8)
    assert (confirmed["fps"], "container_fps" in confirmed) == (8.0, False)

    clips = ClipOptions(fps=16.0)
    assert clips.can_supply(muxed, 32) and not clips.can_supply(declared, 32)  # 2 s of video, or 1 s
    reader = MemberReader()

    def decode(sample: int, frames: int) -> torch.Tensor:
        return clips.decode(reader, shard, shard.samples[sample], Bucket("x", frames, 48, 64, 1), "seed")[0]

    as_muxed, at_16, second_half = decode(0, 16), decode(1, 16), decode(2, 8)
    reader.close()
    assert repeated_frames(as_muxed) == 8  # 8 fps sampled at 16: every frame twice
    assert repeated_frames(at_16) == 0  # the declared rate: 16 consecutive frames
    assert torch.equal(second_half, at_16[:, 8:])  # the window measured on the declared clock


def test_a_tar_cut_inside_its_first_member_is_reported_truncated_not_unreadable(shards, tmp_path):
    source = sorted(shards.glob("*.tar"))[0]
    with tarfile.open(source) as tar:
        first = tar.next()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(source.read_bytes()[: first.offset_data + first.size // 2])
    for url in (str(cut), f"pipe:cat {cut}"):
        found, skips = scan_shards([url], retries=3, retry_wait=60.0)  # a retry would take a minute
        assert [s.samples for s in found] == [[]]  # the shard is known, with no sample
        assert [(s.key, s.reason) for s in skips] == [(url, "truncated_shard")]
        assert "no sample kept" in skips[0].detail and "tries" not in skips[0].detail


def test_samples_that_fit_no_bucket_are_named_with_why(shards, tmp_path):
    from src.data.write import write_shards
    from tests.media import make_video

    # three 32x32 clips of 12 frames: the bucket wants 8 frames at stride 2 (15 source frames) at 32px or 48px
    for name, frames, size in (("long", 20, 32), ("short", 12, 32), ("small", 20, 16)):
        make_video(tmp_path / "in" / f"{name}.mp4", fps=8, frames=frames, width=size, height=size)
        (tmp_path / "in" / f"{name}.txt").write_text(f"a {name} clip")
    write_shards(tmp_path / "in", tmp_path / "shards", workers=1)
    buckets = BucketConfig({"32px": {"8": [1.0, 1]}}, aspect_ratios=["1:1"], size_multiple=8)
    dataset = VideoShardDataset(tmp_path / "shards", buckets, frame_stride=2, skip_dir=tmp_path / "skipped")
    assert dataset.fitting == 1
    named = [json.loads(line) for line in (tmp_path / "skipped" / "catalog.jsonl").read_text().splitlines()]
    assert [(r["key"].rsplit(":", 1)[-1], r["reason"]) for r in named] == [
        ("000000001", "no_bucket"),
        ("000000002", "no_bucket"),
    ]
    assert named[0]["detail"] == (
        "32x32 (1024 px), 12 frames at 8 fps: too short for 8 frames, the shortest bucket of the resolutions it "
        "covers (32px), at the run's fps and frame_stride"
    )
    assert (
        named[1]["detail"]
        == "16x16 (256 px) is smaller than the smallest resolution 32px (1024 px); videos are never upscaled"
    )


def test_a_cached_sample_whose_bucket_the_run_does_not_configure_is_named_with_why():
    from src.data.cached import CachedBuckets

    buckets = CachedBuckets(BucketConfig({"32px": {"5": [1.0, 2]}}, aspect_ratios=["1:1"], size_multiple=8))
    meta = {"bucket": {"resolution": "32px", "num_frames": 9, "height": 32, "width": 32}}
    assert buckets.why_no_bucket(meta) == (
        "encoded in bucket 32px/9f/32x32, which this run's bucket config does not list "
        "(configured: 32px (area 1024): 5f p=1 b=2)"
    )
    assert buckets.why_no_bucket({"bucket": {**meta["bucket"], "num_frames": 5}}) is None


def test_many_skips_are_all_written_but_logged_in_one_line_past_the_first(tmp_path, caplog):
    from src.data.catalog import Skip
    from src.data.shards import LOGGED_SKIPS, write_skips

    skips = [Skip(f"shard.tar:{i:09d}", "no_bucket", "too short") for i in range(LOGGED_SKIPS + 5)]
    with caplog.at_level("WARNING", logger="src.data.shards"):
        write_skips(tmp_path, "catalog", skips)
    assert len(caplog.records) == LOGGED_SKIPS + 1
    assert caplog.records[-1].getMessage() == f"skipping 5 more samples ({tmp_path / 'catalog.jsonl'})"
    assert len((tmp_path / "catalog.jsonl").read_text().splitlines()) == LOGGED_SKIPS + 5
