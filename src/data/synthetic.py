"""A tiny synthetic text-to-video data set: a coloured shape moving across a dark background.

It exists so that the whole pipeline (shards -> decoding -> training -> sampling) can be exercised
without downloading anything. Every clip is drawn from an RNG seeded by (seed, clip index), so the
data set is reproducible and captions are truthful: the shape really moves in the stated direction.

    python -m src.data.synthetic OUT_DIR [--num-clips 256] [--clips-per-shard 32] [--frames 24]
        [--size 64] [--fps 8] [--seed 0] [--radius 0.1 0.18] [--slack 0.15] [--lane 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.cli import HelpFormatter
from src.data.video import encode_frames_mp4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
    "magenta": (230, 50, 220),
    "orange": (250, 140, 30),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{article} {colour} {shape} moves {direction}",
    "{article} {colour} {shape} moving {direction} on a dark background",
    "{article} {colour} {shape} slides {direction}",
)


@dataclass(frozen=True)
class ClipSpec:
    """What one synthetic clip shows; drawn deterministically from (seed, index)."""

    colour: str
    shape: str
    direction: str
    caption: str
    radius: float  # half the shape's extent, in pixels
    start: float  # centre coordinate along the motion axis in the first frame
    end: float  # ... and in the last frame
    cross: float  # centre coordinate across the motion axis (constant)
    background: int  # grey level of the background


def sample_spec(
    seed: int,
    index: int,
    size: int,
    radius: tuple[float, float] = (0.1, 0.18),
    slack: float = 0.15,
    lane: float = 1.0,
) -> ClipSpec:
    """Draw the content of clip `index` for a `size` x `size` frame: the shape's half-extent is drawn from
    `radius` (fractions of the size); it starts within `slack` x size of one edge and ends as close to the other;
    across its motion it keeps to the central `lane` fraction of the room the frame leaves it (1: anywhere)."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    radius = float(size * rng.uniform(*radius))
    low, high = radius + 1.0, size - 2.0 - radius  # the shape stays fully inside the frame
    slack = slack * size
    first = low + rng.uniform(0.0, slack)  # travels at least size - 2 * (radius + slack + 2) pixels
    last = high - rng.uniform(0.0, slack)
    start, end = (first, last) if direction in ("right", "down") else (last, first)
    edge = (1 - lane) * (high - low) / 2  # the lane leaves this much room unused on either side
    return ClipSpec(
        colour=colour,
        shape=shape,
        direction=direction,
        caption=template.format(
            article="an" if colour[0] in "aeiou" else "a", colour=colour, shape=shape, direction=direction
        ),
        radius=radius,
        start=start,
        end=end,
        cross=float(rng.uniform(low + edge, high - edge)),
        background=int(rng.integers(0, 40)),
    )


def render_clip(spec: ClipSpec, frames: int, size: int) -> np.ndarray:
    """Draw the clip described by `spec` as RGB uint8 frames of shape (frames, size, size, 3)."""
    along = np.linspace(spec.start, spec.end, frames)  # (T,)
    cross = np.full(frames, spec.cross)  # (T,)
    horizontal = spec.direction in ("left", "right")
    cx, cy = (along, cross) if horizontal else (cross, along)
    coords = np.arange(size, dtype=np.float64)
    dx = coords[None, None, :] - cx[:, None, None]  # (T, 1, W)
    dy = coords[None, :, None] - cy[:, None, None]  # (T, H, 1)
    r = spec.radius
    if spec.shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)  # (T, H, W)
    elif spec.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif spec.shape == "triangle":  # apex up, base at the bottom
        mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    video = np.full((frames, size, size, 3), spec.background, dtype=np.uint8)  # (T, H, W, 3)
    video[mask] = COLOURS[spec.colour]
    return video


def write_synthetic_shards(
    out_dir: str | Path,
    num_clips: int = 256,
    clips_per_shard: int = 32,
    frames: int = 24,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    radius: tuple[float, float] = (0.1, 0.18),
    slack: float = 0.15,
    lane: float = 1.0,
) -> list[Path]:
    """Write `num_clips` synthetic clips as webdataset shards `out_dir/shard-000000.tar`, ...

    Each sample has members `{key}.mp4` (H.264), `{key}.txt` (caption) and `{key}.json`
    (frames, fps, width, height, colour, shape, direction) with key `{index:08d}`.
    Returns the shard paths in order.
    """
    for name, value, minimum in (
        ("num_clips", num_clips, 1),
        ("clips_per_shard", clips_per_shard, 1),
        ("frames", frames, 2),
        ("size", size, 16),
        ("fps", fps, 1),
    ):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if not 0 <= lane <= 1:
        raise ValueError(f"lane must be a fraction in [0, 1], got {lane}")
    if not 0 < radius[0] <= radius[1] or 2 * radius[1] + 2 * slack >= 0.9:
        raise ValueError(f"radius {radius} and slack {slack} leave the shape no room to travel: need 0 < min <= max "
                         "and 2 max + 2 slack < 0.9 (fractions of the frame)")  # fmt: skip
    if size % 2:
        raise ValueError(f"size must be even (H.264 yuv420p), got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, first in enumerate(range(0, num_clips, clips_per_shard)):
        path = out_dir / f"shard-{shard:06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for index in range(first, min(first + clips_per_shard, num_clips)):
                spec = sample_spec(seed, index, size, radius, slack, lane)
                meta = {
                    "frames": frames,
                    "fps": fps,
                    "width": size,
                    "height": size,
                    "colour": spec.colour,
                    "shape": spec.shape,
                    "direction": spec.direction,
                }
                key = f"{index:08d}"
                _add_member(tar, f"{key}.mp4", encode_frames_mp4(render_clip(spec, frames, size), fps))
                _add_member(tar, f"{key}.txt", spec.caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        os.replace(tmp, path)  # a crash never leaves a half-written shard under the final name
        paths.append(path)
    return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file with fixed metadata (so shards do not depend on the clock)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-clips", type=int, default=256)
    parser.add_argument("--clips-per-shard", type=int, default=32)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--radius", type=float, nargs=2, default=(0.1, 0.18), metavar=("MIN", "MAX"),
                        help="half-extent of the shape, as fractions of the frame size")  # fmt: skip
    parser.add_argument("--slack", type=float, default=0.15,
                        help="the shape starts within this fraction of the frame from its edge")  # fmt: skip
    parser.add_argument("--lane", type=float, default=1.0,
                        help="across its motion the shape keeps to this central fraction of its room")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = write_synthetic_shards(
        args.out_dir, args.num_clips, args.clips_per_shard, args.frames, args.size, args.fps, args.seed,
        tuple(args.radius), args.slack, args.lane,
    )  # fmt: skip
    print(
        f"wrote {args.num_clips} clips ({args.frames} frames, {args.size}x{args.size}, {args.fps} fps) "
        f"in {len(paths)} shards to {args.out_dir} in {time.perf_counter() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
