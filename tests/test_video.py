"""Tests for clip selection in `src.data.video`: fps targeting, starts and windows, seeking, crops, images, `fits`.

Every test video is made here with PyAV and encodes its own frame numbers: frame i is flat red 10 + 4 * i
(robust to compression and resizing) over a green ramp across x and a blue ramp across y (so crops differ),
so `frame_ids` tells WHICH source frames a decoded clip holds. Basic decoding (shape, range, the stride of a
start-0 clip, garbage bytes) is covered by tests/test_data.py.
"""

from __future__ import annotations

import io
import math
import random
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from src.data import video_frames
from src.data.video import VideoDecodeError, clip_frames_needed, decode_clip, decode_clip_naive, fits
from src.data.video_memo import VideoMemo
from tests.media import can_encode

GOP = 10  # keyframe interval of the test videos, so that seeks skip keyframes
X264 = {"preset": "veryfast", "crf": "10", "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0"}  # B-frames on
# name -> (container format, encoder, fps, frames, width, height, encoder options)
VIDEOS: dict[str, tuple[str, str, int, int, int, int, dict[str, str]]] = {
    "h264_30": ("mp4", "libx264", 30, 60, 64, 48, X264),
    "h264_8": ("mp4", "libx264", 8, 24, 64, 48, X264),
    "h264_portrait": ("mp4", "libx264", 30, 30, 48, 64, X264),
    "h264_mkv": ("matroska", "libx264", 30, 60, 64, 48, X264),
    "mpeg4_mp4": ("mp4", "mpeg4", 30, 60, 64, 48, {}),
    "mpeg4_mkv": ("matroska", "mpeg4", 30, 60, 64, 48, {}),
    "vp9_webm": ("webm", "libvpx-vp9", 30, 60, 64, 48, {"deadline": "realtime", "cpu-used": "8", "crf": "10"}),
    # AVI cannot store B-frame timestamps: its mpeg4 frames start at pts 1, its H.264 ones come out of order
    "mpeg4_avi": ("avi", "mpeg4", 30, 60, 64, 48, {}),
    "h264_avi": ("avi", "libx264", 30, 60, 64, 48, X264),
}
SEEKABLE = [name for name, spec in VIDEOS.items() if spec[2:4] == (30, 60)]  # 30 fps, 60 frames, 64x48


def render(frames: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 (frames, height, width, 3): red 10 + 4 * i, green ramp over x, blue ramp over y."""
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[..., 0] = (10 + 4 * np.arange(frames))[:, None, None]
    video[..., 1] = np.linspace(0, 255, width).astype(np.uint8)[None, None, :]
    video[..., 2] = np.linspace(0, 255, height).astype(np.uint8)[None, :, None]
    return video


def make_video(name: str) -> bytes:
    """Encode one of VIDEOS (B-frames on where the codec has them, a keyframe every GOP frames)."""
    fmt, encoder, fps, frames, width, height, options = VIDEOS[name]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = GOP
        if encoder == "mpeg4":
            stream.codec_context.max_b_frames = 2
            stream.codec_context.bit_rate = 4_000_000
        stream.options = options
        for index, rgb in enumerate(render(frames, width, height)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    """Every test video this PyAV can encode, by name."""
    made = {name: make_video(name) for name, spec in VIDEOS.items() if can_encode(spec[1])}
    with av.open(io.BytesIO(made["h264_30"])) as container:  # the seek path must meet real reordering
        assert container.streams.video[0].codec_context.has_b_frames
        assert container.streams.video[0].frames == 60
    with av.open(io.BytesIO(made["h264_mkv"])) as container:  # and a stream that does not store its length
        assert container.streams.video[0].frames == 0
    return made


def video_of(videos: dict[str, bytes], name: str) -> bytes:
    """The named video, or skip when this PyAV cannot encode its codec."""
    if name not in videos:
        pytest.skip(f"this PyAV cannot encode {VIDEOS[name][1]}")
    return videos[name]


def frame_ids(clip: torch.Tensor) -> list[int]:
    """The source frame number of each frame of a (3, T, H, W) clip in [-1, 1], read from its red level."""
    red = (clip[0].mean(dim=(1, 2)) + 1.0) * 127.5  # (T,)
    return [round((float(level) - 10) / 4) for level in red]


def expected_ids(start_frame: float, num_frames: int, stride: int, fps: float | None, source_fps: float) -> list[int]:
    """Source frames of a clip, computed independently: the frame shown at each sample time."""
    if fps is None:
        return [int(start_frame) + i * stride for i in range(num_frames)]
    return [math.floor(start_frame + i * stride * source_fps / fps + 1e-9) for i in range(num_frames)]


def image_bytes(fmt: str, width: int = 64, height: int = 48) -> bytes:
    """A still (frame 5 of the test pattern) as PNG, JPEG or WEBP bytes."""
    buffer = io.BytesIO()
    Image.fromarray(render(6, width, height)[5]).save(buffer, fmt, quality=95)
    return buffer.getvalue()


# ---------------------------------------------------------------- which frames


@pytest.mark.parametrize(
    ("name", "num_frames", "stride", "fps", "expected"),
    [
        ("h264_30", 6, 1, 15, [0, 2, 4, 6, 8, 10]),  # 30 -> 15: every 2nd frame
        ("h264_30", 4, 1, 30, [0, 1, 2, 3]),  # native rate: consecutive
        ("h264_30", 5, 1, 12, [0, 2, 5, 7, 10]),  # 2.5 source frames per sample: the frame at or before
        ("h264_30", 4, 2, 15, [0, 4, 8, 12]),  # stride counts target frames
        ("h264_8", 6, 1, 16, [0, 0, 1, 1, 2, 2]),  # 8 -> 16: each frame twice
        ("h264_8", 4, 3, 16, [0, 1, 3, 4]),
        ("h264_8", 5, 3, None, [0, 3, 6, 9, 12]),  # fps=None: source frames by index
        ("h264_portrait", 3, 1, 10, [0, 3, 6]),
    ],
)
def test_fps_targeting_takes_the_frame_shown_at_each_time(videos, name, num_frames, stride, fps, expected) -> None:
    clip = decode_clip(videos[name], num_frames, 24, 32, stride, fps=fps)
    assert clip.shape == (3, num_frames, 24, 32)
    assert frame_ids(clip) == expected


def test_start_and_window_choose_the_first_frame(videos) -> None:
    data = videos["h264_30"]
    assert frame_ids(decode_clip(data, 3, 24, 32, 3, start=0.5)) == [15, 18, 21]  # by index from frame 15
    assert frame_ids(decode_clip(data, 3, 24, 32, 3, start=0.51)) == [15, 18, 21]  # the frame at or before
    assert frame_ids(decode_clip(data, 3, 24, 32, 2, fps=15, start=0.5)) == [15, 19, 23]
    assert frame_ids(decode_clip(data, 3, 24, 32, fps=20, start=0.51)) == [15, 16, 18]  # t = 0.51, 0.56, 0.61
    # without a start or rng, a clip starts at the first frame inside the window
    assert frame_ids(decode_clip(data, 2, 24, 32, window=(1.0, 1.5))) == [30, 31]
    assert frame_ids(decode_clip(data, 2, 24, 32, window=(0.51, 1.5))) == [16, 17]
    assert frame_ids(decode_clip(data, 2, 24, 32, start=1.2, window=(1.0, 1.5))) == [36, 37]
    # the last frames: frame 59 is shown until 2.0 s
    assert frame_ids(decode_clip(data, 2, 24, 32, 2, fps=15, start=1.8)) == [54, 58]
    assert frame_ids(decode_clip(data, 1, 24, 32, start=1.99)) == [59]


@pytest.mark.parametrize("name", SEEKABLE)
def test_random_start_is_seeded_and_stays_in_the_window(videos, name) -> None:
    data = video_of(videos, name)
    window = (0.5, 1.5)  # source frames 15 to 44
    starts = []
    for seed in range(12):
        clip = decode_clip(data, 5, 24, 32, fps=15, window=window, rng=random.Random(seed))  # spans 9 frames
        ids = frame_ids(clip)
        assert ids == expected_ids(ids[0], 5, 1, 15, 30), ids
        assert ids[0] >= 15 and ids[-1] <= 44, ids
        again = decode_clip(data, 5, 24, 32, fps=15, window=window, rng=random.Random(seed))
        assert torch.equal(clip, again)
        starts.append(ids[0])
    assert len(set(starts)) >= 6, starts
    whole = {frame_ids(decode_clip(data, 20, 24, 32, rng=random.Random(seed)))[0] for seed in range(25)}
    assert min(whole) >= 0 and max(whole) <= 40 and len(whole) >= 10  # 20 frames from 60: starts 0..40


@pytest.mark.parametrize("name", SEEKABLE)
def test_seeking_returns_the_frames_of_a_full_decode(videos, name) -> None:
    """Every start, including those just before a keyframe (where mp4's decode-time index lands too late)."""
    data = video_of(videos, name)
    everything = decode_clip_naive(data, 60, 24, 32)  # (3, 60, 24, 32): every frame, decoded in order
    assert frame_ids(everything) == list(range(60))
    requests = [(start, 1, None) for start in range(58)] + [(start, 2, 15) for start in range(1, 52, 3)]
    for start, stride, fps in requests:  # every start frame by index; every 3rd at 15 fps (ends at start + 8)
        clip = decode_clip(data, 3, 24, 32, stride, fps=fps, start=start / 30)
        ids = expected_ids(start, 3, stride, fps, 30)
        torch.testing.assert_close(clip, everything[:, ids], atol=1e-6, rtol=0, msg=f"start frame {start}")


@pytest.mark.parametrize("name", ["h264_30", "h264_8", "mpeg4_mkv", "vp9_webm"])
@pytest.mark.parametrize(("num_frames", "stride", "fps"), [(7, 2, None), (5, 1, 15), (9, 1, 16), (4, 3, 24)])
def test_naive_decode_agrees_with_decode_clip(videos, name, num_frames, stride, fps) -> None:
    data = video_of(videos, name)
    naive = decode_clip_naive(data, num_frames, 40, 40, stride, fps)
    torch.testing.assert_close(decode_clip(data, num_frames, 40, 40, stride, fps=fps), naive, atol=1e-6, rtol=0)


def test_seeking_decodes_only_from_the_keyframe_before_the_clip(videos, monkeypatch) -> None:
    decoded: list[int] = []
    pick = video_frames._pick

    def counting_pick(frames, *args):
        def counted():
            for frame in frames:
                decoded.append(frame.pts)
                yield frame

        return pick(counted(), *args)

    monkeypatch.setattr(video_frames, "_pick", counting_pick)
    decode_clip(videos["h264_mkv"], 4, 24, 32, start=45 / 30)  # frames 45..48; keyframe at 40
    assert 4 <= len(decoded) <= GOP, decoded
    decoded.clear()
    decode_clip(videos["h264_mkv"], 4, 24, 32)  # from the start, stops after frame 3
    assert len(decoded) <= 4 + 3, decoded  # plus at most the B-frame reorder delay


# ---------------------------------------------------------------- the video memo


def outcome(data: bytes, *args, **kwargs) -> torch.Tensor | str:
    """decode_clip's clip, or the message of the VideoDecodeError it raises."""
    try:
        return decode_clip(data, *args, **kwargs)
    except VideoDecodeError as err:
        return str(err)


def same(a: torch.Tensor | str, b: torch.Tensor | str) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else torch.equal(a, b)


@pytest.mark.parametrize("name", list(VIDEOS))
def test_a_memo_gives_bitwise_the_clips_and_errors_of_a_decode(videos, name) -> None:
    """Random starts and crops, fps targeting, strides and windows, and too-short requests: the memo's clip (its
    first use decodes the whole video, later ones pick from it) is the decoded clip, to the bit."""
    data, fps = video_of(videos, name), VIDEOS[name][2]
    memo = VideoMemo(16)
    requests = [
        ((5, 24, 32, 2), {}),
        ((4, 16, 16), {"fps": fps / 2}),
        ((3, 24, 24), {"fps": fps * 1.5, "window": (0.25, 1.5)}),
        ((6, 20, 28, 3), {"window": (0.5, 10.0)}),
        ((200, 8, 8), {}),  # longer than every test video: the same error
    ]
    for seed in range(4):
        for args, kwargs in requests:
            options = {"rng": random.Random(seed), "crop": "random"} | kwargs
            decoded = outcome(data, *args, **options)
            options["rng"] = random.Random(seed)
            assert same(outcome(data, *args, memo=memo, **options), decoded), (seed, args, kwargs)
    assert len(memo) == 1 and memo.misses == 1 and memo.hits == 4 * len(requests) - 1  # decoded once, all of it
    assert memo.nbytes == VIDEOS[name][3] * 48 * 64 * 3 + len(data)


def test_the_memo_drops_the_least_recently_used_and_never_holds_what_does_not_fit(videos) -> None:
    frames = 60 * 48 * 64 * 3  # RGB bytes of each of these 60-frame videos; each encodes to under a tenth of that
    memo = VideoMemo(3.5 * frames / 2**20)  # room for three
    for name in ("h264_30", "h264_mkv", "mpeg4_mkv", "h264_30"):  # h264_30 used last: h264_mkv is the oldest
        decode_clip(videos[name], 4, 8, 8, memo=memo)
    assert (len(memo), memo.hits, memo.dropped) == (3, 1, 0)
    decode_clip(videos["mpeg4_mp4"], 4, 8, 8, memo=memo)  # over the budget: the least recently used goes
    assert (len(memo), memo.dropped) == (3, 1) and memo.nbytes <= memo.max_bytes
    decode_clip(videos["h264_30"], 4, 8, 8, memo=memo)
    decode_clip(videos["h264_mkv"], 4, 8, 8, memo=memo)
    assert (memo.hits, memo.misses) == (2, 5)  # h264_mkv was the one dropped, h264_30 is still held
    small = VideoMemo(24 * 48 * 64 * 3 / 2**20 / 2)  # half of h264_8: decoded as usual, tried once
    for _ in range(3):
        assert torch.equal(decode_clip(videos["h264_8"], 4, 8, 8, memo=small), decode_clip(videos["h264_8"], 4, 8, 8))
    assert (len(small), small.misses, small.hits) == (0, 1, 0)
    with pytest.raises(ValueError, match=r"data.memo_mb must be > 0 MiB .* got 0"):
        VideoMemo(0)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_video_gives_the_same_clips_and_errors_with_a_memo(videos, damage) -> None:
    """A cut file holds the frames before the cut; bytes overwritten mid-file make FFmpeg conceal or fail. Either
    way the memo (which holds what decodes, or refuses the video) answers as a decode does."""
    data = bytearray(videos[name := "h264_mkv"])  # Matroska: frames before the damage still decode
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2 : len(data) // 2 + 400] = random.Random(0).randbytes(400)
    data = bytes(data)
    memo = VideoMemo(16)
    for start, frames in [(0.0, 4), (0.5, 4), (1.2, 8), (0.0, 60)]:
        assert same(outcome(data, frames, 8, 8, start=start, memo=memo), outcome(data, frames, 8, 8, start=start))
    for seed in range(4):
        kwargs = {"rng": random.Random(seed), "crop": "random", "window": (0.2, 2.0)}
        clip = outcome(data, 6, 8, 8, **kwargs)
        kwargs["rng"] = random.Random(seed)
        assert same(outcome(data, 6, 8, 8, memo=memo, **kwargs), clip), (name, seed)
    assert memo.misses == 1  # held or refused at its first use, never decoded whole again
    assert len(memo) == (damage == "truncated")  # the overwritten bytes leave a corrupt frame: refused


# ---------------------------------------------------------------- crops and images


@pytest.mark.parametrize(("name", "axis"), [("h264_30", -1), ("h264_portrait", -2)])
def test_random_crop_is_seeded_and_a_window_of_the_resized_frame(videos, name, axis) -> None:
    data = videos[name]
    wide_shape = (32, 43) if axis == -1 else (43, 32)  # 64x48 covers 32x32 at 43x32
    full = decode_clip(data, 2, *wide_shape)  # the whole resized frame (3, 2, h, w)
    centre = decode_clip(data, 2, 32, 32)
    offsets = set()
    for seed in range(8):  # start=0: the rng draws only the crop (else it draws the start first)
        crop = decode_clip(data, 2, 32, 32, start=0.0, crop="random", rng=random.Random(seed))
        assert torch.equal(crop, decode_clip(data, 2, 32, 32, start=0.0, crop="random", rng=random.Random(seed)))
        matches = [k for k in range(12) if torch.equal(crop, full.narrow(axis, k, 32))]
        assert len(matches) == 1, f"seed {seed}: not a window of the resized frame"
        offsets.add(matches[0])
    assert len(offsets) >= 3 and offsets != {5}, offsets  # centre offset is (43 - 32) // 2 = 5
    assert torch.equal(centre, full.narrow(axis, 5, 32))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_images_are_one_frame_clips(fmt) -> None:
    data = image_bytes(fmt)
    clip = decode_clip(data, 1, 24, 32, fps=16, start=3.0, window=(2.0, 4.0), rng=random.Random(0))
    assert clip.shape == (3, 1, 24, 32)
    assert frame_ids(clip) == [5]
    torch.testing.assert_close(decode_clip_naive(data, 1, 24, 32), decode_clip(data, 1, 24, 32))
    with pytest.raises(VideoDecodeError, match=r"image has 1 frame but 16 frames were asked"):
        decode_clip(data, 16, 24, 32)
    with pytest.raises(VideoDecodeError, match="not a decodable image"):
        decode_clip(data[:20] + b"\x00" * 64, 1, 24, 32)


# ---------------------------------------------------------------- fits and errors


@pytest.mark.parametrize(
    ("num_frames", "stride", "fps", "source_fps", "needed"),
    [(33, 1, 24, 24, 33), (33, 1, 24, 30, 41), (16, 1, 16, 8, 8), (5, 2, None, None, 9), (3, 1, 15, 30, 5)],
)
def test_clip_frames_needed(num_frames, stride, fps, source_fps, needed) -> None:
    assert clip_frames_needed(num_frames, stride, fps, source_fps) == needed


@pytest.mark.parametrize(
    ("probe", "num_frames", "stride", "fps", "window", "expected"),
    [
        ({"kind": "image", "frames": 1, "fps": 0.0}, 1, 1, 24, None, True),
        ({"kind": "image", "frames": 1, "fps": 0.0}, 2, 1, 24, None, False),
        ({"frames": 60, "fps": 30.0}, 30, 1, 15, None, True),  # 30 -> 15 fps: needs 29 * 2 + 1 = 59
        ({"frames": 60, "fps": 30.0}, 31, 1, 15, None, False),  # needs 61
        ({"frames": 60, "fps": 30.0}, 60, 1, None, None, True),
        ({"frames": 60, "fps": 30.0}, 61, 1, None, None, False),
        ({"frames": 24, "fps": 8.0}, 48, 1, 16, None, True),  # repeats: 48 samples from 24 frames
        ({"frames": 24, "fps": 8.0}, 49, 1, 16, None, False),
        ({"frames": 60, "fps": 30.0}, 15, 1, 30, (1.0, 1.5), True),  # window holds frames 30..44
        ({"frames": 60, "fps": 30.0}, 16, 1, 30, (1.0, 1.5), False),
        ({"frames": 60, "fps": 30.0}, 31, 1, 30, (1.0, 9.0), False),  # window clipped to the video
        ({"frames": 60, "fps": 0.0}, 60, 1, None, None, True),  # unknown rate: by frame count only
        ({"frames": 60, "fps": 0.0}, 2, 1, 30, None, False),
        ({"kind": "video", "frames": 0, "fps": 30.0}, 1, 1, None, None, False),
    ],
)
def test_fits_truth_table(probe, num_frames, stride, fps, window, expected) -> None:
    assert fits(probe, num_frames, stride, fps, window) is expected


def test_fits_agrees_with_decoding(videos) -> None:
    """fits() says yes exactly when decode_clip (random start, as the loader decodes) can supply the clip."""
    data = videos["h264_8"]
    probe = {"kind": "video", "frames": 24, "fps": 8.0}
    for fps, window in ((None, None), (16, None), (4, None), (8, (0.5, 2.0))):
        for num_frames in range(1, 50, 3):
            try:
                decode_clip(data, num_frames, 8, 8, fps=fps, window=window, rng=random.Random(num_frames))
                decoded = True
            except VideoDecodeError as err:
                assert "too short" in str(err)
                decoded = False
            assert fits(probe, num_frames, 1, fps, window) is decoded, (fps, window, num_frames)


def test_too_short_errors_name_the_numbers(videos) -> None:
    with pytest.raises(VideoDecodeError, match=r"has 24 frames but 37 are needed.*3\.000 s of 4\.625 s at 8 fps"):
        decode_clip(videos["h264_8"], 10, 8, 8, fps=2)
    with pytest.raises(VideoDecodeError, match=r"too short: it has 24 frames but 26 are needed.*from frame 16"):
        decode_clip(videos["h264_8"], 10, 8, 8, start=2.0)
    # Matroska stores no frame count: the shortfall is found by decoding (fixed start) or demuxing (random start)
    with pytest.raises(VideoDecodeError, match=r"it has 60 frames but 65 are needed.*2\.000 s of 2\.167 s at 30 fps"):
        decode_clip(videos["h264_mkv"], 5, 8, 8, start=2.0)
    with pytest.raises(VideoDecodeError, match=r"it has 60 frames but 61 are needed"):
        decode_clip(videos["h264_mkv"], 61, 8, 8, rng=random.Random(0))
    with pytest.raises(VideoDecodeError, match=r"window \[1, 1\.5\) s \(frames 30 to 44\) has 15 frames but 16 are"):
        decode_clip(videos["h264_mkv"], 16, 8, 8, window=(1.0, 1.5), rng=random.Random(0))
    with pytest.raises(VideoDecodeError, match=r"window \[1, 1\.5\) s \(frames 30 to 44\) has 15 frames but 21"):
        decode_clip(videos["h264_30"], 3, 8, 8, 5, fps=15, window=(1.0, 1.5))
    truncated = videos["h264_mkv"][: len(videos["h264_mkv"]) // 2]
    with pytest.raises(VideoDecodeError, match="too short|not a decodable"):
        decode_clip(truncated, 60, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop": "left"}, r"crop must be one of .*'left'"),
        ({"crop": "random"}, r"crop='random' needs rng"),
        ({"fps": 0}, r"fps must be a positive number or None, got 0"),
        ({"window": (2.0, 1.0)}, r"window must be .* got \(2\.0, 1\.0\)"),
        ({"start": -1.0}, r"start must be >= 0 seconds, got -1\.0"),
        ({"start": 0.2, "window": (0.5, 1.0)}, r"start 0\.2 s is outside the window \[0\.5, 1\.0\)"),
    ],
)
def test_bad_arguments_are_value_errors_naming_the_value(videos, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        decode_clip(videos["h264_30"], 2, 8, 8, **kwargs)
    assert not isinstance(info.value, VideoDecodeError)


def test_fits_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind.*'audio'"):
        fits({"kind": "audio", "frames": 3, "fps": 8.0}, 1, 1, None)
    with pytest.raises(ValueError, match="no 'frames'"):
        fits({"fps": 8.0}, 1, 1, None)
    with pytest.raises(ValueError, match="frame_stride must be >= 1, got 0"):
        fits({"frames": 3, "fps": 8.0}, 1, 0, None)
    with pytest.raises(ValueError, match="source_fps must be > 0"):
        clip_frames_needed(3, 1, 24, None)
