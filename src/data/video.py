"""Video clip decoding and encoding with PyAV: the public API.

`decode_clip` turns the video (or image) bytes stored in a shard into the float tensor the model trains on. It
seeks to the keyframe at or before the clip and decodes forward only until the clip's last frame;
`decode_clip_naive` decodes every frame of the file first and is the benchmark baseline and the tests' oracle.
`clip_frames_needed` and `fits` tell from a probe alone whether a video can supply a clip, so the loader can
bucket samples without decoding them. `encode_mp4` / `write_mp4` go the other way, for the synthetic data set
and for writing samples.

Which frames a clip takes: with a target `fps`, clip frame i is the source frame shown at time
start + i * frame_stride / fps, i.e. the frame at or just before it (30 fps sampled at 15 takes every 2nd
frame, 8 fps sampled at 16 repeats each frame); with fps=None it is source frame start_frame + i * frame_stride.
Decoded frames are placed on the source frame grid by their timestamps,
index = round((pts - pts of the first frame) * time_base * source_fps), so seeking agrees with counting the
frames of a full decode for constant-frame-rate video, and variable-rate video gets the frame shown at each
time. Where timestamps are missing or made up by the container (H.264 in AVI), frames are counted instead.
How the frames are found, decoded, resized and cropped is in `src.data.video_frames`.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from src.data.video_frames import (
    VideoDecodeError,
    _clip_span,
    _Clock,
    _decode_errors,
    _decode_image,
    _decode_image_clip,
    _decode_video,
    _naive_picks,
    _open,
    _Request,
    _rgb,
    _to_clip,
    _video_stream,
    _window_frames,
)
from src.data.video_memo import VideoMemo

CROPS = ("center", "random")
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; WebP is RIFF....WEBP


def decode_clip(
    data: bytes,
    num_frames: int,
    height: int,
    width: int,
    frame_stride: int = 1,
    *,
    fps: float | None = None,
    start: float | None = None,
    window: tuple[float, float] | None = None,
    rng: random.Random | None = None,
    crop: str = "center",
    source_fps: float | None = None,
    memo: VideoMemo | None = None,
) -> torch.Tensor:
    """Decode a training clip from in-memory video (or image) bytes, decoding only the part it needs.

    Clip frame i is the source frame shown at start + i * frame_stride / fps when `fps` is set, and source
    frame start_frame + i * frame_stride when it is None (see the module docstring). The decoder seeks to
    the keyframe at or before the clip's first frame and stops after its last one. Frames are resized keeping
    the aspect ratio so that they cover (height, width), cropped to it and mapped from uint8 [0, 255] to
    [-1, 1]. With no keyword options this is frames 0, frame_stride, 2 * frame_stride, ... centre-cropped.

    Args:
        data: the file's bytes: any container/codec FFmpeg reads, or a PNG, JPEG or WebP image, which is a
            clip of one frame (start, window and fps are then ignored).
        num_frames, height, width: the clip's shape.
        frame_stride: step between clip frames, in source frames (fps=None) or in target frames.
        fps: target frame rate; None samples source frames by index.
        start: where the clip starts, in seconds from the start of the video; None picks it (see rng).
        window: (start, end) seconds of the usable part of the video (e.g. a cut from a CSV), None for all of
            it. A clip whose start is picked takes only frames that start inside it; an explicit `start` must
            lie in it, and every clip must end before its end.
        rng: when given and `start` is None, the clip starts at a source frame drawn uniformly from those
            where the whole clip fits in the window (then the crop offsets are drawn, for crop="random").
            Without it the clip starts at the window's first frame (frame 0 without a window).
        crop: "center", or "random" for a crop position drawn uniformly with `rng`.
        source_fps: the video's frame rate when its container states none or a wrong one (a list's `fps`
            column, see `src.data.write`): fps, start and window are turned into source frames at this rate.
            Frame k is still the container's k-th frame; None uses the container's rate.
        memo: whole decoded videos to pick the clip from, the video decoded into it on first use
            (`src.data.video_memo`); the clip is bitwise the one decoded without it.

    Returns:
        float32 tensor of shape (3, num_frames, height, width) with values in [-1, 1].

    Raises:
        VideoDecodeError: the bytes are not a decodable video or image, or the video (or window) is too
            short for the clip; the message says how many frames it has and how many are needed.
        ValueError: a size is not positive, or fps, start, window or crop is invalid.
    """
    request = _check_request(num_frames, height, width, frame_stride, fps, start, window, source_fps)
    _check_crop(crop, rng)
    still = is_image(data)
    frames = _decode_image_clip(data, request, rng) if still else _decode_video(data, request, rng, memo)  # T (h, w, 3)
    return _to_clip(frames, height, width, crop, rng)


def decode_clip_naive(
    data: bytes, num_frames: int, height: int, width: int, frame_stride: int = 1, fps: float | None = None
) -> torch.Tensor:
    """The clip `decode_clip` returns for the same request (start 0, centre crop), decoded the slow way.

    Decodes every frame of the whole video to an RGB array first, then picks the clip's frames and resizes
    them. It is the baseline of `src.bench.decode` and an independent check of `decode_clip`'s seeking: frames
    are chosen by position in the decoded list (fps=None) or by comparing their timestamps with the sample
    times (fps set), not by `decode_clip`'s frame-grid arithmetic.

    Returns:
        float32 tensor of shape (3, num_frames, height, width) with values in [-1, 1].
    """
    request = _check_request(num_frames, height, width, frame_stride, fps, None, None)
    if is_image(data):
        return _to_clip(_decode_image(data, num_frames), height, width, "center", None)
    with _decode_errors("video"), _open(data) as container:
        stream = _video_stream(container)
        rate = _Clock.of(stream).rate
        reformatter = VideoReformatter()
        rgb: list[np.ndarray] = []  # T x (h, w, 3)
        times: list[float] = []
        for frame in container.decode(stream):
            size = (rgb[0].shape[1], rgb[0].shape[0]) if rgb else (frame.width, frame.height)
            rgb.append(_rgb(frame, size, reformatter))
            times.append(float(frame.time) if frame.time is not None else len(times) / float(rate or 1))
    if not rgb:
        raise VideoDecodeError("not a decodable video: no frame could be decoded")
    picks = _naive_picks([t - times[0] for t in times], rate, request)
    return _to_clip([rgb[k] for k in picks], height, width, "center", None)


def clip_frames_needed(num_frames: int, frame_stride: int, fps: float | None, source_fps: float | None) -> float:
    """How many consecutive source frames a clip spans, first to last inclusive, for a start on a source frame.

    This is a number of source FRAMES (a whole number, returned as float); divide by source_fps for seconds.
    With fps=None it is (num_frames - 1) * frame_stride + 1 and source_fps is not used. With a target fps it
    is the index of the frame shown at (num_frames - 1) * frame_stride / fps, plus one: 33 frames at 24 fps
    from 24 fps video need 33 frames, from 30 fps video 41 frames, and 16 frames at 16 fps from 8 fps video 8.
    """
    _check_positive(num_frames=num_frames, frame_stride=frame_stride)
    if fps is None:
        return float((num_frames - 1) * frame_stride + 1)
    _check_fps(fps)
    if source_fps is None or source_fps <= 0:
        raise ValueError(f"source_fps must be > 0 to sample at fps={fps:g}, got {source_fps}")
    return float(_clip_span(num_frames, frame_stride, fps, float(source_fps)))


def fits(
    probe: Mapping[str, Any],
    num_frames: int,
    frame_stride: int,
    fps: float | None,
    window: tuple[float, float] | None = None,
) -> bool:
    """Whether a sample with this probe can supply the clip, without decoding it.

    Args:
        probe: the sample's probe: `kind` ("video", the default, or "image"), `frames` (frame count) and
            `fps` (source frame rate; 0 or missing when unknown).
        num_frames, frame_stride, fps: the clip, as for `decode_clip`.
        window: (start, end) seconds of the usable part of the video, as for `decode_clip`.

    An image supplies exactly one frame. A video fits when the source frames inside the window (all of them
    without one) are at least `clip_frames_needed`. A video of unknown frame rate fits only by frame count
    (fps=None and no window).
    """
    _check_positive(num_frames=num_frames, frame_stride=frame_stride)
    if fps is not None:
        _check_fps(fps)
    if window is not None:
        _check_window(window)
    kind = probe.get("kind", "video")
    if kind == "image":
        return num_frames == 1
    if kind != "video":
        raise ValueError(f"probe kind must be 'video' or 'image', got {kind!r}")
    if "frames" not in probe:
        raise ValueError(f"probe has no 'frames': {dict(probe)}")
    frames = int(probe["frames"])
    source_fps = float(probe.get("fps") or 0.0)
    if source_fps <= 0:
        return fps is None and window is None and frames >= clip_frames_needed(num_frames, frame_stride, None, None)
    first, end = _window_frames(window, source_fps, frames)
    return end - first >= clip_frames_needed(num_frames, frame_stride, fps, source_fps)


def is_image(data: bytes) -> bool:
    """Whether the bytes start like a PNG, JPEG or WebP file."""
    return data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


# ---------------------------------------------------------------- argument checks


def _check_positive(**values: int) -> None:
    """ValueError naming the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_fps(fps: float, name: str = "fps") -> None:
    """ValueError unless the frame rate `name` is a positive finite number."""
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{name} must be a positive number or None, got {fps}")


def _check_window(window: tuple[float, float]) -> None:
    """ValueError unless window is (start, end) seconds with 0 <= start < end."""
    if len(window) != 2 or not 0 <= window[0] < window[1]:
        raise ValueError(f"window must be (start, end) seconds with 0 <= start < end, got {window}")


def _check_request(
    num_frames: int,
    height: int,
    width: int,
    frame_stride: int,
    fps: float | None,
    start: float | None,
    window: tuple[float, float] | None,
    source_fps: float | None = None,
) -> _Request:
    """Validate `decode_clip`'s arguments (ValueError naming the bad one) and bundle the frame selection."""
    _check_positive(num_frames=num_frames, height=height, width=width, frame_stride=frame_stride)
    for name, rate in (("fps", fps), ("source_fps", source_fps)):
        if rate is not None:
            _check_fps(rate, name)
    if window is not None:
        _check_window(window)
        window = (float(window[0]), float(window[1]))
    if start is not None:
        if not math.isfinite(start) or start < 0:
            raise ValueError(f"start must be >= 0 seconds, got {start}")
        if window is not None and not window[0] <= start < window[1]:
            raise ValueError(f"start {start} s is outside the window [{window[0]}, {window[1]}) s")
    return _Request(num_frames, frame_stride, fps, start, window, source_fps)


def _check_crop(crop: str, rng: random.Random | None) -> None:
    """ValueError for an unknown crop, or a random crop without an rng."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs rng (a random.Random), got rng=None")


def encode_mp4(video: torch.Tensor, fps: int, crf: int = 18) -> bytes:
    """Encode a clip as H.264 (yuv420p) in an mp4 container and return the file bytes.

    Args:
        video: (3, T, H, W) tensor with values in [-1, 1] (values outside are clipped).
            yuv420p needs even sizes, so an odd height or width is padded by repeating the
            last row or column.
        fps: frame rate written into the container.
        crf: x264 constant rate factor; lower is higher quality (0 is lossless luma).
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must have shape (3, T, H, W), got {tuple(video.shape)}")
    if video.shape[1] < 1:
        raise ValueError(f"video must have at least one frame, got shape {tuple(video.shape)}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = ((video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return encode_frames_mp4(frames, fps, crf)


def encode_frames_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """Encode RGB uint8 frames of shape (T, H, W, 3), H and W even, as H.264 mp4 bytes."""
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {height}x{width}")
    time_base = Fraction(1, fps)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            frame.pts = index
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed (B-)frames
    return buffer.getvalue()


def write_mp4(path: str | Path, video: torch.Tensor, fps: int) -> Path:
    """Encode a (3, T, H, W) clip in [-1, 1] with `encode_mp4` and write it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(video, fps))
    return path
