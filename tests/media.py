"""Real, tiny test media made with PyAV and Pillow, shared by the data-pipeline tests.

Not a test module: it makes inputs for tests. `make_video` encodes a short clip with a real encoder
into the container its extension names, `make_image` writes a still, `corrupt_file` / `truncate_file`
damage a file the way broken downloads and crashed recorders do, and `make_media_folder` lays out a
whole input folder of good samples (several codecs, frame rates and aspect ratios, with captions)
and planted bad inputs, each with the reason the shard writer should reject it for.

Everything is at most 96 pixels wide and 40 frames long, so a whole folder is written in well under
a second.
"""

from __future__ import annotations

import random
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from tests.conftest import keep_scheduling

# Short codec names used by the tests -> the PyAV encoder that writes them.
ENCODERS: dict[str, str] = {
    "h264": "libx264",
    "hevc": "libx265",
    "mpeg4": "mpeg4",
    "vp8": "libvpx",
    "vp9": "libvpx-vp9",
    "av1": "libsvtav1",
    "mjpeg": "mjpeg",
}
# Extra encoder options that keep encoding fast and the stream simple (one packet per frame).
ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "ultrafast", "crf": "23"},
    "libx265": {"preset": "ultrafast", "log-level": "error"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
    "libsvtav1": {"preset": "12"},
}
PATTERNS: tuple[str, ...] = ("bar", "box", "noise")
MIN_FRAMES = 4  # the --min-frames that `make_media_folder`'s verdicts assume


def can_encode(codec: str) -> bool:
    """Whether this PyAV build can encode `codec` (a key of ENCODERS, e.g. "vp9")."""
    encoder = ENCODERS.get(codec, codec)
    if encoder not in av.codecs_available:
        return False
    try:
        av.codec.Codec(encoder, "w")
    except (av.FFmpegError, ValueError):
        return False
    return True


def render_frames(frames: int, width: int, height: int, pattern: str = "bar", seed: int = 0) -> np.ndarray:
    """Moving test content as RGB uint8 of shape (frames, height, width, 3); consecutive frames differ.

    "bar" is a vertical bar sweeping right over a colour ramp, "box" a square moving diagonally,
    "noise" seeded uniform noise (incompressible: use it to make samples of a predictable, larger size).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    if pattern == "noise":
        return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)  # (T, H, W, 3)
    video[..., 0] = np.linspace(20, 120, width, dtype=np.uint8)[None, None, :]
    video[..., 1] = np.linspace(20, 120, height, dtype=np.uint8)[None, :, None]
    video[..., 2] = ((np.arange(frames) * 7 + seed * 31) % 200)[:, None, None]  # per-frame tint: frames all differ
    side = max(4, min(width, height) // 4)
    for t in range(frames):
        if pattern == "bar":
            left = (t * 3) % max(1, width - side)
            video[t, :, left : left + side] = (240, 240, 60)
        else:
            top = (t * 2) % max(1, height - side)
            left = (t * 3) % max(1, width - side)
            video[t, top : top + side, left : left + side] = (250, 60, 60)
    return video


def make_video(
    path: str | Path,
    codec: str = "h264",
    fps: int = 24,
    frames: int = 16,
    width: int = 64,
    height: int = 48,
    pattern: str = "bar",
    seed: int = 0,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode `frames` frames of `pattern` with `codec` at `fps` into `path` and return the path.

    The container follows the extension (.mp4, .mov, .m4v, .mkv, .webm, .avi); the pixel format is
    yuv420p, so width and height must be even. `codec` is a key of ENCODERS or an encoder name;
    `options` replace the fast defaults in ENCODER_OPTIONS (e.g. {"x264-params": "bframes=3"}).
    """
    path = Path(path)
    if width % 2 or height % 2 or width < 2 or height < 2:
        raise ValueError(f"width and height must be even and >= 2 (yuv420p), got {width}x{height}")
    if frames < 1 or fps < 1:
        raise ValueError(f"frames and fps must be >= 1, got frames={frames}, fps={fps}")
    encoder = ENCODERS.get(codec, codec)
    if encoder == "libx265" and (width < 64 or height < 48):  # seen to corrupt the heap and abort the process
        raise ValueError(f"libx265 needs frames of at least 64x48 in this build, got {width}x{height}")
    if not can_encode(encoder):
        raise ValueError(f"this PyAV build cannot encode {codec!r}; available: {sorted(available_codecs())}")
    path.parent.mkdir(parents=True, exist_ok=True)
    video = render_frames(frames, width, height, pattern, seed)
    container_format = "ipod" if path.suffix.lower() == ".m4v" else None  # ffmpeg names the .m4v muxer "ipod"
    with keep_scheduling(), av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = dict(ENCODER_OPTIONS.get(encoder, {}) if options is None else options)
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(video[index]), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed frames
    return path


def available_codecs() -> set[str]:
    """The short codec names (keys of ENCODERS) this PyAV build can encode."""
    return {codec for codec in ENCODERS if can_encode(codec)}


def make_image(path: str | Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """Write a still image (format from the extension: .png, .jpg/.jpeg, .webp) and return its path."""
    path = Path(path)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = render_frames(1, width, height, "box", seed)[0]  # (H, W, 3)
    Image.fromarray(pixels).save(path)
    return path


def corrupt_file(path: str | Path, fraction: float = 0.5, seed: int = 0) -> Path:
    """Overwrite the middle `fraction` of the file's bytes with seeded random bytes (size unchanged)."""
    path = Path(path)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    data = bytearray(path.read_bytes())
    length = max(1, int(len(data) * fraction))
    start = (len(data) - length) // 2
    data[start : start + length] = random.Random(seed).randbytes(length)
    path.write_bytes(bytes(data))
    return path


def truncate_file(path: str | Path, keep_fraction: float = 0.6) -> Path:
    """Cut the file down to its first `keep_fraction` of bytes, like an interrupted download."""
    path = Path(path)
    if not 0.0 <= keep_fraction < 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1), got {keep_fraction}")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def _good_video(root: Path, name: str, codec: str, fps: int, frames: int, width: int, height: int) -> dict:
    """Write a captioned clip and return what the shard writer should find in it."""
    path = make_video(root / name, codec, fps, frames, width, height, seed=len(name))
    caption = f"a {codec} clip, {width}x{height} at {fps} fps"
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return {
        "kind": "video",
        "ext": path.suffix[1:].lower(),
        "codec": codec,
        "fps": float(fps),
        "frames": frames,
        "width": width,
        "height": height,
        "caption": caption,
    }


def _good_image(root: Path, name: str, codec: str, width: int, height: int) -> dict:
    """Write a captioned still and return what the shard writer should find in it."""
    path = make_image(root / name, width, height, seed=len(name))
    caption = f"a still image, {width}x{height}"
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return {
        "kind": "image",
        "ext": path.suffix[1:].lower(),
        "codec": codec,
        "fps": 0.0,
        "frames": 1,
        "width": width,
        "height": height,
        "caption": caption,
    }


def _bad_video(root: Path, name: str, caption: str | None = "a broken clip", **kwargs) -> Path:
    """Write an H.264 clip (to be damaged by the caller) with a caption unless `caption` is None."""
    path = make_video(root / name, **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def make_media_folder(root: str | Path) -> dict:
    """Write an input folder for the shard writer: good captioned media plus planted bad inputs.

    Returns:
        {"root": Path, "min_frames": MIN_FRAMES, "codecs": sorted short codec names used,
         "good": {relative posix name: {"kind", "ext", "codec", "fps", "frames", "width", "height",
                  "caption"}},
         "bad": {relative posix name: expected reject reason},
         "ignored": [relative names that are not media and must be neither sample nor reject]}
        The verdicts assume the writer runs with min_frames=MIN_FRAMES.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, dict] = {}
    for name, codec, fps, frames, width, height in (
        ("h264_24fps_64x48.mp4", "h264", 24, 20, 64, 48),
        ("h264_30fps_48x64.mp4", "h264", 30, 16, 48, 64),
        ("h264_8fps_96x54.mp4", "h264", 8, 12, 96, 54),
        ("nested/deeper/h264_24fps_64x64.mov", "h264", 24, 40, 64, 64),
        ("mpeg4_30fps_64x64.mkv", "mpeg4", 30, 24, 64, 64),
        ("mpeg4_8fps_64x48.mp4", "mpeg4", 8, 10, 64, 48),
        ("mpeg4_24fps_48x64.avi", "mpeg4", 24, 18, 48, 64),
        ("vp9_24fps_64x64.webm", "vp9", 24, 20, 64, 64),
        ("vp8_30fps_96x54.webm", "vp8", 30, 14, 96, 54),
    ):
        if can_encode(codec):
            good[name] = _good_video(root, name, codec, fps, frames, width, height)
    good["still_64x48.png"] = _good_image(root, "still_64x48.png", "png", 64, 48)
    good["nested/still_48x64.jpg"] = _good_image(root, "nested/still_48x64.jpg", "mjpeg", 48, 64)

    bad: dict[str, str] = {}
    corrupt_file(_bad_video(root, "bad_corrupted.mp4", frames=20), fraction=0.8)  # hits the first frame and moov
    bad["bad_corrupted.mp4"] = "unreadable"
    truncate_file(_bad_video(root, "bad_truncated.mp4", frames=20), 0.6)
    bad["bad_truncated.mp4"] = "truncated"
    if can_encode("vp9"):
        truncate_file(_bad_video(root, "bad_truncated_vp9.webm", codec="vp9", frames=20), 0.6)
        bad["bad_truncated_vp9.webm"] = "truncated"
    _bad_video(root, "bad_no_caption.mp4", caption=None)
    bad["bad_no_caption.mp4"] = "no_caption"
    _bad_video(root, "bad_blank_caption.mkv", caption="  \n", codec="mpeg4")
    bad["bad_blank_caption.mkv"] = "no_caption"
    _bad_video(root, "bad_too_short.mp4", frames=2)
    bad["bad_too_short.mp4"] = "too_short"
    (root / "bad_empty.mp4").write_bytes(b"")
    (root / "bad_empty.txt").write_text("an empty file", encoding="utf-8")
    bad["bad_empty.mp4"] = "unreadable"
    (root / "bad_text.mp4").write_text("this is not a video, just some text\n" * 20, encoding="utf-8")
    (root / "bad_text.txt").write_text("a text file in disguise", encoding="utf-8")
    bad["bad_text.mp4"] = "unreadable"
    (root / "bad_image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(200))
    (root / "bad_image.txt").write_text("garbage behind a png signature", encoding="utf-8")
    bad["bad_image.png"] = "unreadable"

    (root / "README.md").write_text("not media: the writer ignores it\n", encoding="utf-8")
    (root / "orphan.txt").write_text("a caption without a video\n", encoding="utf-8")
    bad["orphan.txt"] = "no_media"  # listed, so that a video that never arrived is noticed
    codecs = sorted({entry["codec"] for entry in good.values() if entry["kind"] == "video"})
    return {
        "root": root,
        "min_frames": MIN_FRAMES,
        "codecs": codecs,
        "good": good,
        "bad": bad,
        "ignored": ["README.md"],
    }


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of one tar as {key: {extension: bytes}}, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples
