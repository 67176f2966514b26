"""Tests for the synthetic shards and clip decoding/encoding (the loader is tested in test_loader.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from src.data.synthetic import main as synthetic_main
from src.data.synthetic import write_synthetic_shards
from src.data.video import VideoDecodeError, decode_clip, encode_mp4, write_mp4
from tests.media import read_tar

NUM_CLIPS = 24
PER_SHARD = 8
FRAMES = 12
SIZE = 32
FPS = 8


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with 3 synthetic shards of 8 clips (12 frames, 32x32)."""
    out = tmp_path_factory.mktemp("shards")
    paths = write_synthetic_shards(out, NUM_CLIPS, PER_SHARD, FRAMES, SIZE, FPS, seed=0)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    return out


def all_samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, keyed by sample key."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(shard_dir.glob("*.tar")):
        samples.update(read_tar(path))
    return samples


def decode_all_frames(data: bytes) -> np.ndarray:
    """All frames of an mp4 as RGB uint8 (T, H, W, 3), decoded directly with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


# ---------------------------------------------------------------- synthetic shards


def test_shards_hold_real_mp4_clips(shard_dir: Path) -> None:
    samples = all_samples(shard_dir)
    assert list(samples) == [f"{i:08d}" for i in range(NUM_CLIPS)]
    for key, members in samples.items():
        assert set(members) == {"mp4", "txt", "json"}, key
        meta = json.loads(members["json"])
        assert (meta["frames"], meta["fps"], meta["width"], meta["height"]) == (FRAMES, FPS, SIZE, SIZE)
        caption = members["txt"].decode("utf-8")
        assert all(meta[field] in caption for field in ("colour", "shape", "direction")), caption
        frames = decode_all_frames(members["mp4"])  # (T, H, W, 3)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3), key
        with av.open(io.BytesIO(members["mp4"])) as container:
            assert container.streams.video[0].codec_context.name == "h264"


def test_captions_are_truthful(shard_dir: Path) -> None:
    """The centroid of the bright pixels moves in the captioned direction (checked for every clip)."""
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coords
    for key, members in all_samples(shard_dir).items():
        direction = json.loads(members["json"])["direction"]
        assert direction in members["txt"].decode("utf-8")
        frames = decode_all_frames(members["mp4"])  # (T, H, W, 3)
        centroids = []
        for frame in (frames[0], frames[-1]):
            ys, xs = np.nonzero(frame.max(axis=-1) > 110)
            assert len(xs) > 10, f"{key}: shape not visible"
            centroids.append((xs.mean(), ys.mean()))
        moved = np.subtract(centroids[1], centroids[0])  # (dx, dy)
        along = float(np.dot(moved, step[direction]))
        across = abs(float(moved[0] * step[direction][1] - moved[1] * step[direction][0]))
        assert along > 0.25 * SIZE, f"{key}: moved {moved} but the caption says {direction}"
        assert across < 2.0, f"{key}: drifted {moved} across the {direction} motion"


def test_synthetic_rejects_bad_arguments_and_cli_prints_summary(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="33"):
        write_synthetic_shards(tmp_path, num_clips=2, size=33)
    with pytest.raises(ValueError, match="num_clips.*0"):
        write_synthetic_shards(tmp_path, num_clips=0)
    synthetic_main([str(tmp_path / "cli"), "--num-clips", "3", "--clips-per-shard", "2", "--frames", "4"])
    assert "wrote 3 clips" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]


# ---------------------------------------------------------------- decoding and encoding


def test_decode_clip_shape_range_and_stride(shard_dir: Path) -> None:
    data = all_samples(shard_dir)["00000005"]["mp4"]
    video = decode_clip(data, FRAMES, SIZE, SIZE)
    assert video.shape == (3, FRAMES, SIZE, SIZE) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert video.min() < -0.6 and video.max() > 0.6  # dark background, bright shape
    strided = decode_clip(data, 6, SIZE, SIZE, frame_stride=2)
    torch.testing.assert_close(strided, video[:, ::2])
    resized = decode_clip(data, 3, 24, 40)  # 32x32 -> covers 40 wide at 40x40, centre crop 24 rows
    assert resized.shape == (3, 3, 24, 40)
    assert resized.min() >= -1.0 and resized.max() <= 1.0


def test_decode_clip_errors(shard_dir: Path) -> None:
    with pytest.raises(VideoDecodeError, match="not a decodable video"):
        decode_clip(b"definitely not a video" * 50, 4, SIZE, SIZE)
    with pytest.raises(VideoDecodeError, match="not a decodable video"):
        decode_clip(b"", 4, SIZE, SIZE)
    data = all_samples(shard_dir)["00000000"]["mp4"]
    with pytest.raises(VideoDecodeError, match=r"has 12 frames but 13 are needed") as info:
        decode_clip(data, 7, SIZE, SIZE, frame_stride=2)
    assert isinstance(info.value, ValueError)
    decode_clip(data, 6, SIZE, SIZE, frame_stride=2)  # needs 11: fine
    with pytest.raises(ValueError, match="frame_stride.*0"):
        decode_clip(data, 4, SIZE, SIZE, frame_stride=0)


def test_encode_mp4_round_trip(tmp_path: Path) -> None:
    t = torch.linspace(0, 1, 5).view(5, 1, 1)
    y = torch.linspace(-1, 1, 18).view(1, 18, 1)
    x = torch.linspace(-1, 1, 21).view(1, 1, 21)
    channels = [0.8 * torch.sin(3 * x + 2 * t), 0.5 * y, t - 0.5]
    video = torch.stack([c.expand(5, 18, 21) for c in channels])  # (3, T, H, W), odd width
    data = encode_mp4(video, fps=4)
    decoded = decode_clip(data, 5, 18, 22)  # padded to an even width
    assert (decoded[..., :21] - video).abs().mean() < 0.05
    path = write_mp4(tmp_path / "out" / "clip.mp4", video, fps=4)
    assert decode_all_frames(path.read_bytes()).shape == (5, 18, 22, 3)
    with pytest.raises(ValueError, match=r"\(2, 5, 18, 21\)"):
        encode_mp4(video[:2], fps=4)


# ---------------------------------------------------------------- shard reader
