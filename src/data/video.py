"""Video clip decoding and encoding with PyAV.

`decode_clip` turns the mp4 bytes stored in a shard into the float tensor the model trains on;
`encode_mp4` / `write_mp4` go the other way, for the synthetic data set and for writing samples.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video, or the video is too short for the requested clip."""


def decode_clip(data: bytes, num_frames: int, height: int, width: int, frame_stride: int = 1) -> torch.Tensor:
    """Decode a training clip from in-memory video bytes.

    Takes frames 0, frame_stride, 2 * frame_stride, ... (num_frames of them) from the first video
    stream, resizes them keeping the aspect ratio so that the shorter side covers the target, centre
    crops to (height, width) and maps uint8 [0, 255] to [-1, 1].

    Returns:
        float32 tensor of shape (3, num_frames, height, width) with values in [-1, 1].

    Raises:
        VideoDecodeError: the bytes are not a decodable video or hold fewer than
            (num_frames - 1) * frame_stride + 1 frames.
        ValueError: a size argument is not positive.
    """
    for name, value in (
        ("num_frames", num_frames),
        ("height", height),
        ("width", width),
        ("frame_stride", frame_stride),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    frames = _decode_frames(data, num_frames, frame_stride)  # (T, h, w, 3) uint8
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    video = _resize_cover_crop(video, height, width)  # (T, 3, H, W)
    video = (video / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return video.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


def _decode_frames(data: bytes, num_frames: int, frame_stride: int) -> np.ndarray:
    """Decode the selected frames as an RGB uint8 array of shape (num_frames, h, w, 3)."""
    needed = (num_frames - 1) * frame_stride + 1
    kept: list[np.ndarray] = []
    seen = 0
    try:
        # metadata_errors="replace": a non-utf-8 metadata tag must not make a good video unreadable
        with av.open(io.BytesIO(data), mode="r", metadata_errors="replace") as container:
            if not container.streams.video:
                raise VideoDecodeError("not a decodable video: the container has no video stream")
            stream = container.streams.video[0]
            size: tuple[int, int] | None = None
            for frame in container.decode(stream):
                if seen % frame_stride == 0:
                    size = size or (frame.width, frame.height)  # streams may change size mid-way
                    rgb = frame.reformat(width=size[0], height=size[1], format="rgb24")
                    kept.append(rgb.to_ndarray())  # (h, w, 3)
                seen += 1
                if len(kept) == num_frames:
                    break
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        # PyAV reports some corrupt inputs with plain Python exceptions rather than FFmpegError
        raise VideoDecodeError(f"not a decodable video: {type(exc).__name__}: {exc}") from exc
    if len(kept) < num_frames:
        raise VideoDecodeError(
            f"video too short: it has {seen} frames but {needed} are needed "
            f"(num_frames={num_frames}, frame_stride={frame_stride})"
        )
    return np.stack(kept)


def _resize_cover_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (T, 3, h, w) so it covers (height, width) keeping aspect ratio, then centre crop."""
    src_h, src_w = video.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h = max(height, round(src_h * scale))
    new_w = max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        video = F.interpolate(video, (new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top = (new_h - height) // 2
    left = (new_w - width) // 2
    return video[:, :, top : top + height, left : left + width]  # (T, 3, H, W)


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
