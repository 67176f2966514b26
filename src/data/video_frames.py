"""How `src.data.video` finds, decodes and shapes a clip's frames: the internals of `decode_clip`.

`_plan` turns a request (`_Request`) and a stream's timing (`_Clock`) into the source frame index of every clip
frame. `_decode_video` seeks to the keyframe at or before the first of them (`_decode_after_seek`, seeking again
earlier when FFmpeg lands too late) and `_pick` decodes forward, placing decoded frames on the source frame grid by
their timestamps, index = round((pts - pts of the first frame) * time_base * source_fps), and stopping after the
clip's last frame. Where timestamps are missing or made up by the container (H.264 in AVI), or the input cannot
seek, the stream is decoded from its start and its frames are counted instead. `_naive_picks` chooses the frames
for `decode_clip_naive` from a full decode, by timestamp, as an independent check. `_rgb` converts frames to RGB
and `_to_clip` resizes them to cover the clip, crops and scales them to [-1, 1]. For a `VideoMemo`
(`src.data.video_memo`), `_decode_all` decodes a whole video once into a `_HeldVideo`, which picks each later
clip's frames by `_pick`'s rules.

The public API, and which frames a clip takes, are in `src.data.video`.
"""

from __future__ import annotations

import bisect
import io
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

from src.data.video_memo import VideoMemo

# Tolerance, in source frames, for float round-off when a time is turned into a frame index.
_EPS = 1e-6
# A seek that lands after the clip's first frame is retried this much earlier, doubling each time (seconds).
_SEEK_BACKOFF_S = 1.0
_RESIZE_CHUNK = 8  # frames resized at a time


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video or image, or the video is too short for the requested clip."""


@dataclass(frozen=True)
class _Request:
    """Which frames a clip takes, as `decode_clip` was asked."""

    num_frames: int
    frame_stride: int
    fps: float | None
    start: float | None
    window: tuple[float, float] | None
    source_fps: float | None = None  # the video's declared frame rate, over its container's (see `_plan`)

    def describe(self, start_frame: int | None = None) -> str:
        """The request for error messages, e.g. "num_frames=7, frame_stride=2, fps=15, from frame 40"."""
        parts = [f"num_frames={self.num_frames}", f"frame_stride={self.frame_stride}"]
        if self.fps is not None:
            parts.append(f"fps={self.fps:g}")
        if start_frame:
            parts.append(f"from frame {start_frame}")
        return ", ".join(parts)


@dataclass(frozen=True)
class _Clock:
    """A video stream's timing: puts timestamps on the source frame grid and frame indices back into pts.

    `origin` is the pts of the first frame in presentation order. It is not taken from the stream's start_time,
    which some containers get wrong (AVI with B-frames says 0 while the first frame has pts 1).
    """

    time_base: Fraction
    rate: Fraction | None  # source frames per second; None when the stream does not say
    frames: int  # frame count from the container's metadata, 0 when it has none

    @classmethod
    def of(cls, stream: av.video.stream.VideoStream) -> _Clock:
        """The clock of a stream; the rate is the average frame rate, else FFmpeg's guess."""
        rate = next((Fraction(r) for r in (stream.average_rate, stream.guessed_rate) if r and r > 0), None)
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 90_000)
        return cls(time_base, rate, max(0, stream.frames or 0))

    def index(self, pts: int, origin: int) -> int:
        """Source frame index of a timestamp: the nearest point of the frame grid."""
        return round((pts - origin) * self.time_base * self.rate)

    def pts(self, index: int, origin: int) -> int:
        """Timestamp of source frame `index` (rounded down)."""
        return origin + math.floor(index / (self.rate * self.time_base))


class _LandedLate(Exception):
    """Internal: the seek landed after the clip's first frame: seek again, earlier."""


class _BadTimestamps(Exception):
    """Internal: timestamps go backwards or are missing, so frames must be counted from the start instead."""


# ---------------------------------------------------------------- frame selection


def _target_index(base: float, i: int, frame_stride: int, fps: float | None, source_fps: float) -> int:
    """Source frame index of clip frame i, for a clip starting at source frame position `base` (may be fractional)."""
    if fps is None:
        return math.floor(base + _EPS) + i * frame_stride
    return math.floor(base + i * frame_stride * source_fps / fps + _EPS)


def _clip_span(num_frames: int, frame_stride: int, fps: float | None, source_fps: float | None) -> int:
    """Source frames a clip spans, first to last inclusive: `clip_frames_needed` without its argument checks."""
    if fps is None:
        return (num_frames - 1) * frame_stride + 1
    return _target_index(0.0, num_frames - 1, frame_stride, fps, source_fps) + 1


def _window_frames(window: tuple[float, float] | None, source_fps: float, total: int | None) -> tuple[int, int | None]:
    """[first, end) source frames whose start time lies in the window, clipped to [0, total)."""
    first, end = 0, total
    if window is not None:
        first = max(0, math.ceil(window[0] * source_fps - _EPS))
        window_end = math.ceil(window[1] * source_fps - _EPS)
        end = window_end if total is None else min(total, window_end)
    return first, end


def _plan(request: _Request, clock: _Clock, rng: random.Random | None, count_frames: Callable[[], int]) -> list[int]:
    """The source frame index of every clip frame (non-decreasing).

    Times (fps, start, window) become frame indices at `request.source_fps` when it is given (a frame rate
    declared for a container that has none or a wrong one), else at the stream's own rate; decoded frames are
    still placed by the stream's timestamps, which number them whatever rate they claim.
    Raises VideoDecodeError when the window, or the video as far as its metadata tells, is too short.
    """
    n, stride, fps = request.num_frames, request.frame_stride, request.fps
    rate = request.source_fps or clock.rate
    if rate is None:
        if fps is not None or request.start or request.window is not None or rng is not None:
            raise VideoDecodeError("video has no frame rate, so it cannot be sampled by time or seeked")
        return [i * stride for i in range(n)]
    source_fps = float(rate)
    span = _clip_span(n, stride, fps, source_fps)
    first, window_end = _window_frames(request.window, source_fps, None)
    if request.start is not None:
        base = request.start * source_fps
    elif rng is None:
        base = float(first)
    else:
        total = count_frames()
        first, end = _window_frames(request.window, source_fps, total)
        if end - first < span:
            where = "it" if request.window is None else _describe_window(request.window, first, end)
            raise _too_short(where, max(0, end - first), span, source_fps, request)
        base = float(rng.randint(first, end - span))
    targets = [_target_index(base, i, stride, fps, source_fps) for i in range(n)]
    if window_end is not None and targets[-1] >= window_end:
        where = _describe_window(request.window, first, window_end)
        raise _too_short(where, window_end - first, targets[-1] + 1 - first, source_fps, request, targets[0])
    if clock.frames and targets[-1] >= clock.frames:
        raise _too_short("it", clock.frames, targets[-1] + 1, source_fps, request, targets[0])
    return targets


def _describe_window(window: tuple[float, float], first: int, end: int) -> str:
    """ "the window [2, 3.5) s (frames 48 to 83)" for error messages."""
    return f"the window [{window[0]:g}, {window[1]:g}) s (frames {first} to {end - 1})"


def _too_short(
    where: str, have: int, needed: int, source_fps: float | None, request: _Request, start_frame: int | None = None
) -> VideoDecodeError:
    """The error for a clip that does not fit: frames (and seconds) available and needed."""
    seconds = f"; {have / source_fps:.3f} s of {needed / source_fps:.3f} s at {source_fps:g} fps" if source_fps else ""
    return VideoDecodeError(
        f"video too short: {where} has {have} frames but {needed} are needed ({request.describe(start_frame)}{seconds})"
    )


def _naive_picks(times: list[float], rate: Fraction | None, request: _Request) -> list[int]:
    """Positions in the fully decoded frame list (times in seconds from the first frame) for `decode_clip_naive`."""
    n, stride, fps = request.num_frames, request.frame_stride, request.fps
    source_fps = float(rate) if rate else None
    if fps is None:
        picks = [i * stride for i in range(n)]
        if picks[-1] >= len(times):
            raise _too_short("it", len(times), picks[-1] + 1, source_fps, request)
        return picks
    if source_fps is None:
        raise VideoDecodeError("video has no frame rate, so it cannot be sampled by time")
    tolerance = 0.1 / source_fps  # timestamps may be rounded (e.g. to ms in Matroska)
    sample_times = [i * stride / fps for i in range(n)]
    if sample_times[-1] + tolerance >= times[-1] + 1 / source_fps:
        needed = math.floor(sample_times[-1] * source_fps + _EPS) + 1
        raise _too_short("it", len(times), needed, source_fps, request)
    return [max(0, bisect.bisect_right(times, t + tolerance) - 1) for t in sample_times]


# ---------------------------------------------------------------- decoding


@contextmanager
def _decode_errors(what: str) -> Iterator[None]:
    """Re-raise PyAV's errors on bad input as VideoDecodeError("not a decodable <what>: ...")."""
    try:
        yield
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        # PyAV reports some corrupt inputs with plain Python exceptions rather than FFmpegError
        raise VideoDecodeError(f"not a decodable {what}: {type(exc).__name__}: {exc}") from exc


def _open(data: bytes) -> av.container.InputContainer:
    """Open in-memory bytes; metadata_errors="replace": a non-utf-8 tag must not make a good file unreadable."""
    return av.open(io.BytesIO(data), mode="r", metadata_errors="replace")


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first video stream, or VideoDecodeError."""
    if not container.streams.video:
        raise VideoDecodeError("not a decodable video: the container has no video stream")
    return container.streams.video[0]


def _rgb(frame: av.VideoFrame, size: tuple[int, int], reformatter: VideoReformatter | None = None) -> np.ndarray:
    """A decoded frame as RGB uint8 (h, w, 3) at `size` (width, height): streams may change size mid-way.

    Pass one `reformatter` for all frames of a clip: it keeps its swscale context, which `frame.reformat`
    builds anew for every frame (about 0.5 ms each, more than converting a small frame).
    """
    reformatter = reformatter or VideoReformatter()
    return reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24").to_ndarray()


def _decode_image(data: bytes, num_frames: int) -> np.ndarray:
    """A PNG/JPEG/WebP image as a one-frame clip, RGB uint8 (1, h, w, 3)."""
    if num_frames != 1:
        raise VideoDecodeError(f"image too short: an image has 1 frame but {num_frames} frames were asked for")
    with _decode_errors("image"), _open(data) as container:
        stream = _video_stream(container)
        for frame in container.decode(stream):
            return _rgb(frame, (frame.width, frame.height))[None]
    raise VideoDecodeError("not a decodable image: no frame could be decoded")


def _decode_image_clip(data: bytes, request: _Request, rng: random.Random | None) -> list[np.ndarray]:
    """`_decode_image` with `_decode_video`'s signature; start, window, fps and rng do not apply to a still."""
    return list(_decode_image(data, request.num_frames))


def _decode_video(
    data: bytes, request: _Request, rng: random.Random | None, memo: VideoMemo | None = None
) -> list[np.ndarray]:
    """Seek and decode the clip's frames: num_frames RGB uint8 arrays (h, w, 3).

    Frames are placed on the source frame grid by their timestamps after a seek to the keyframe at or before
    the clip (a clip at frame 0 seeks to the first frame). When that cannot work (no frame rate, timestamps the
    container made up, input that cannot seek) the stream is decoded from its start and its frames are counted,
    as `decode_clip` always did before it could seek. With a `memo` the frames come from the whole video it holds
    (decoded on its first use), picked as `_pick` would pick them from a decode.
    """
    held = memo.fetch(data, _decode_all) if memo is not None else None
    if held is not None:
        with _decode_errors("video"):  # counting the frames of a stream that does not store them demuxes it
            return held.pick(_plan(request, held.clock, rng, lambda: held.frame_count(data)), request)
    with _decode_errors("video"):
        with _open(data) as container:
            stream = _video_stream(container)
            clock = _Clock.of(stream)
            targets = _plan(request, clock, rng, lambda: clock.frames or _count_frames(data, clock))
            picked = None
            if clock.rate is not None:
                origin, trusted = _scan_start(container, stream)
                if trusted:
                    picked = _decode_after_seek(container, stream, clock, targets, request, origin)
        if picked is None:
            with _open(data) as container:
                picked = _pick(container.decode(_video_stream(container)), clock, targets, request)
        return picked


@dataclass
class _HeldVideo:
    """Every frame of a video, decoded to RGB and placed on the source frame grid as `_decode_video` places them."""

    clock: _Clock
    indices: list[int]  # source frame index of each decoded frame, non-decreasing
    frames: list[np.ndarray]  # (h, w, 3) uint8 each, all of one size
    counted: int | None = None  # `_count_frames`, when a plan has needed it

    @property
    def nbytes(self) -> int:
        return sum(frame.nbytes for frame in self.frames)

    def frame_count(self, data: bytes) -> int:
        """What `_plan` is told the video's length is, as `_decode_video` tells it (counted once)."""
        if not self.clock.frames and self.counted is None:
            self.counted = _count_frames(data, self.clock)
        return self.clock.frames or self.counted

    def pick(self, targets: list[int], request: _Request) -> list[np.ndarray]:
        """`_pick`'s choice: clip frame j is the first frame placed at targets[j], else the last placed before it
        (the first frame when none is); VideoDecodeError when no frame is placed at or after the last target."""
        picked = []
        for target in targets:
            j = bisect.bisect_left(self.indices, target)
            if j == len(self.indices):
                source_fps = float(self.clock.rate) if self.clock.rate is not None else None
                raise _too_short("it", self.indices[-1] + 1, targets[-1] + 1, source_fps, request, targets[0])
            picked.append(self.frames[j if self.indices[j] == target or j == 0 else j - 1])
        return picked


def _decode_all(data: bytes, max_bytes: int) -> _HeldVideo | None:
    """The whole video for a `VideoMemo`, or None when it is not to be held: its frames would take over
    `max_bytes` or change size; a frame is corrupt or the decoder fails part-way (what a damaged stream decodes to
    depends on where decoding started, and a clip may still come from its good part); its timestamps go backwards
    or its first frame is not at the first timestamp (`_decode_video` would then place a clip's frames by a
    partial decode or by counting, which a whole decode cannot reproduce)."""
    try:
        with _open(data) as container:
            stream = _video_stream(container)
            clock = _Clock.of(stream)
            origin, trusted = _scan_start(container, stream) if clock.rate is not None else (0, False)
        indices, frames, nbytes, index = [], [], 0, None
        reformatter = VideoReformatter()
        with _open(data) as container:
            for frame in container.decode(_video_stream(container)):
                index = _place(frame, clock, index, origin if trusted else None)
                size = (frame.width, frame.height)
                if frame.is_corrupt or (frames and frames[0].shape[1::-1] != size) or (not frames and index != 0):
                    return None
                frames.append(_rgb(frame, size, reformatter))
                indices.append(index)
                nbytes += frames[-1].nbytes
                if nbytes > max_bytes:
                    return None
    except (av.FFmpegError, ValueError, OSError, EOFError, _BadTimestamps):
        return None
    return _HeldVideo(clock, indices, frames) if frames else None


def _count_frames(data: bytes, clock: _Clock) -> int:
    """Frame count of a stream whose container does not store it, from its packets (demuxed, not decoded)."""
    timestamps, packets = [], 0
    with _open(data) as container:
        for packet in container.demux(_video_stream(container)):
            if packet.size:
                packets += 1
                if packet.pts is not None:
                    timestamps.append(packet.pts)
    if clock.rate is None or len(timestamps) < packets:
        return packets
    return clock.index(max(timestamps), min(timestamps)) + 1


def _scan_start(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[int, bool]:
    """(pts of the first frame in presentation order, whether frame timestamps can be used), from the packets up
    to the second keyframe (at most 64). Demuxes from the current position: call it on a fresh container.

    Timestamps cannot be used when packets have none, or when the codec reorders frames (B-frames) but the
    packets' pts rise in decode order: the container made them up from the decode order (H.264 in AVI), and
    decoded frames come out with shuffled timestamps.
    """
    timestamps: list[int | None] = []
    keyframes = 0
    for count, packet in enumerate(container.demux(stream)):
        keyframes += packet.is_keyframe
        if keyframes > 1 or count >= 64:
            break
        if packet.size:
            timestamps.append(packet.pts)
    if not timestamps or None in timestamps:
        return 0, False
    rising = all(a < b for a, b in itertools.pairwise(timestamps))
    made_up = bool(stream.codec_context.has_b_frames) and rising and len(timestamps) > 2
    return min(timestamps), not made_up


def _decode_after_seek(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    clock: _Clock,
    targets: list[int],
    request: _Request,
    origin: int,
) -> list[np.ndarray] | None:
    """Seek to the keyframe at or before source frame targets[0] and decode the clip's frames from there.

    FFmpeg's seek to a timestamp can land on a keyframe AFTER it: the mp4 index holds decode timestamps, and
    with B-frames a keyframe's decode time is earlier than its presentation time. Then we seek again, earlier.
    Returns None when the stream must be decoded from its start instead (see `_decode_video`).
    """
    seek_pts = clock.pts(targets[0], origin)
    backoff = math.ceil(_SEEK_BACKOFF_S / clock.time_base)
    while True:
        try:
            container.seek(max(seek_pts, origin), backward=True, any_frame=False, stream=stream)
        except (av.FFmpegError, OSError):  # input that cannot seek (a raw elementary stream)
            return None
        try:
            return _pick(container.decode(stream), clock, targets, request, origin)
        except _LandedLate:
            if seek_pts <= origin:
                return None
            seek_pts, backoff = seek_pts - backoff, 2 * backoff
        except _BadTimestamps:
            return None


def _pick(
    decoded: Iterator[av.VideoFrame],
    clock: _Clock,
    targets: list[int],
    request: _Request,
    origin: int | None = None,
) -> list[np.ndarray]:
    """Clip frame j is the last decoded frame at or before source frame targets[j]; stops after the last.

    Args:
        decoded: decoded frames in presentation order.
        origin: the first frame's pts: frames are placed by (pts - origin). None: `decoded` starts at the
            stream's first frame and frames are counted.

    Raises:
        _LandedLate: the first decoded frame is after targets[0] (a seek that landed too late), or none came.
        _BadTimestamps: a frame has no timestamp, or an earlier one than the frame before it.
        VideoDecodeError: the stream ends before the last target.
    """
    picked: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    reformatter = VideoReformatter()
    cache: tuple[av.VideoFrame | None, np.ndarray | None] = (None, None)

    def rgb(frame: av.VideoFrame) -> np.ndarray:
        nonlocal size, cache
        if cache[0] is not frame:
            size = size or (frame.width, frame.height)
            cache = (frame, _rgb(frame, size, reformatter))
        return cache[1]

    held: av.VideoFrame | None = None  # the latest decoded frame
    index: int | None = None
    for frame in decoded:
        index = _place(frame, clock, index, origin)
        if held is None and index > targets[0] and origin is not None:
            raise _LandedLate
        while len(picked) < len(targets) and targets[len(picked)] < index:
            picked.append(rgb(held if held is not None else frame))  # before the first frame: the first frame
        held = frame
        while len(picked) < len(targets) and targets[len(picked)] == index:
            picked.append(rgb(frame))
        if len(picked) == len(targets):
            return picked
    if index is None:
        if origin is not None:
            raise _LandedLate  # a seek past the last keyframe (MPEG-TS seeks by bisecting timestamps)
        raise VideoDecodeError("not a decodable video: no frame could be decoded")
    source_fps = float(clock.rate) if clock.rate is not None else None
    raise _too_short("it", index + 1, targets[-1] + 1, source_fps, request, targets[0])


def _place(frame: av.VideoFrame, clock: _Clock, previous: int | None, origin: int | None) -> int:
    """Source frame index of a decoded frame: by its timestamp, or (origin None) one after the previous frame."""
    if origin is None:
        return 0 if previous is None else previous + 1
    if frame.pts is None:
        raise _BadTimestamps
    index = clock.index(frame.pts, origin)
    if previous is not None and index < previous:
        raise _BadTimestamps
    return index


# ---------------------------------------------------------------- resizing


def _to_clip(
    frames: Sequence[np.ndarray], height: int, width: int, crop: str, rng: random.Random | None
) -> torch.Tensor:
    """T RGB uint8 frames (h, w, 3) -> float32 (3, T, height, width) in [-1, 1], resized to cover and cropped.

    At 768x1344 a 33-frame clip is 400 MB of float32, and writing it costs about as much as decoding the frames
    (mostly page faults on the fresh memory), so it is written in place, with no full-size temporaries, into a
    NumPy array: NumPy asks Linux for huge pages for large arrays. On the 2-core dev machine that made clips
    15-30% faster on average than a torch tensor, though the kernel's compaction for huge pages stalls the odd
    clip for up to a second. Values equal x / 127.5 - 1 exactly, as before.
    """
    num_frames, (src_h, src_w) = len(frames), frames[0].shape[:2]
    new_h, new_w = _cover_size(src_h, src_w, height, width)
    top, left = _crop_offsets(new_h, new_w, height, width, rng if crop == "random" else None)
    out = np.empty((3, num_frames, height, width), dtype=np.float32)  # (3, T, H, W)
    if (new_h, new_w) == (src_h, src_w):
        for t, frame in enumerate(frames):
            cropped = frame[top : top + height, left : left + width].transpose(2, 0, 1)  # (3, H, W) uint8
            np.divide(cropped, np.float32(127.5), out=out[:, t], dtype=np.float32)
        return torch.from_numpy(np.subtract(out, np.float32(1.0), out=out))  # exactly in [-1, 1]
    clip = torch.from_numpy(out)
    for first in range(0, num_frames, _RESIZE_CHUNK):  # bounded float temporaries for large sources
        chunk = torch.from_numpy(np.stack(frames[first : first + _RESIZE_CHUNK]))  # (t, h, w, 3) uint8
        chunk = chunk.permute(0, 3, 1, 2).float()  # (t, 3, h, w)
        chunk = F.interpolate(chunk, (new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        clip[:, first : first + len(chunk)] = chunk[:, :, top : top + height, left : left + width].transpose(0, 1)
    return clip.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)


def _cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """The size (new_h, new_w) that covers (height, width) keeping the source's aspect ratio."""
    scale = max(height / src_h, width / src_w)
    return max(height, round(src_h * scale)), max(width, round(src_w * scale))


def _crop_offsets(new_h: int, new_w: int, height: int, width: int, rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of a (height, width) crop of a (new_h, new_w) frame: centred, or drawn uniformly with `rng`."""
    if rng is None:
        return (new_h - height) // 2, (new_w - width) // 2
    return rng.randint(0, new_h - height), rng.randint(0, new_w - width)
