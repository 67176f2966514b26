"""Buckets as Open-Sora configures them: resolution -> {num_frames: (probability, batch_size)}.

Every batch has one shape: a bucket is (resolution, num_frames, height, width) with its batch size. Each
resolution has aspect-ratio buckets of about the same pixel area, so a 16:9 and a 9:16 video both keep their
shape. A sample goes to the largest resolution its video covers (no upscaling), then to the longest frame count
it can supply, each accepted with the configured probability (a coin seeded by the sample), then to the nearest
aspect ratio. Samples that fit no bucket are skipped and counted, and a config that no sample can fit is an
error at start.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

DEFAULT_ASPECT_RATIOS = ("9:16", "3:4", "1:1", "4:3", "16:9")


@dataclass(frozen=True, order=True)
class Bucket:
    """One batch shape. `name` like "256px/33f/256x256" identifies it in logs and checkpoints."""

    resolution: str
    num_frames: int
    height: int
    width: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.resolution}/{self.num_frames}f/{self.height}x{self.width}"


def resolution_area(name: str) -> int:
    """Pixel area of a resolution name: "256px" is 256 x 256; "720p" is 720 x 1280 (16:9 at that height)."""
    match = re.fullmatch(r"(\d+)(px|p)", str(name))
    if not match:
        raise ValueError(f"resolution {name!r} is not of the form '<N>px' (N x N area) or '<N>p' (N x 16N/9)")
    n = int(match.group(1))
    return n * n if match.group(2) == "px" else n * round(n * 16 / 9)


def parse_ratio(text: str) -> float:
    """ "16:9" (width:height) -> height / width."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)", str(text))
    if not match or float(match.group(1)) <= 0 or float(match.group(2)) <= 0:
        raise ValueError(f"aspect ratio {text!r} is not of the form 'W:H' with positive numbers, e.g. '16:9'")
    return float(match.group(2)) / float(match.group(1))


def aspect_shapes(area: int, ratios: Iterable[str], multiple: int) -> dict[str, tuple[int, int]]:
    """(height, width) per aspect ratio with about `area` pixels, both multiples of `multiple`."""
    shapes = {}
    for ratio in ratios:
        hw = parse_ratio(ratio)
        height = max(multiple, round(math.sqrt(area * hw) / multiple) * multiple)
        width = max(multiple, round(area / height / multiple) * multiple)
        shapes[ratio] = (height, width)
    return shapes


class BucketConfig:
    """The configured buckets and the rule that assigns a sample to one of them.

    Args:
        resolutions: {"256px": {33: [probability, batch_size], 1: [1.0, 45], ...}, ...}.
        aspect_ratios: "W:H" ratios that each resolution is split into.
        size_multiple: heights and widths are multiples of this (VAE compression x DiT patch).
        batch_scale: multiplies every batch size (rounded, at least 1): one knob to move a bucket config to a
            GPU with more or less memory, e.g. `data.buckets.batch_scale=0.5`.
    """

    def __init__(
        self,
        resolutions: Mapping[str, Mapping[int, tuple[float, int]]],
        aspect_ratios: Iterable[str] = DEFAULT_ASPECT_RATIOS,
        size_multiple: int = 16,
        batch_scale: float = 1.0,
    ):
        if not resolutions:
            raise ValueError("the bucket config names no resolution")
        if size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        if batch_scale <= 0:
            raise ValueError(f"batch_scale must be > 0, got {batch_scale}")
        self.size_multiple = size_multiple
        self.aspect_ratios = tuple(aspect_ratios)
        self.frames: dict[str, list[tuple[int, float, int]]] = {}  # resolution -> [(frames, prob, batch)] longest first
        for res, options in resolutions.items():
            resolution_area(res)
            if not options:
                raise ValueError(f"resolution {res!r} has no frame counts")
            entries = []
            for frames, spec in options.items():
                prob, batch = _parse_option(res, frames, spec)
                entries.append((int(frames), prob, max(1, round(batch * batch_scale))))
            self.frames[res] = sorted(entries, reverse=True)
        self.order = sorted(self.frames, key=resolution_area, reverse=True)  # largest area first
        self.shapes = {
            res: aspect_shapes(resolution_area(res), self.aspect_ratios, size_multiple) for res in self.order
        }

    def all_buckets(self) -> list[Bucket]:
        """Every (resolution, frames, aspect) bucket the config can produce."""
        return [
            Bucket(res, frames, h, w, batch)
            for res in self.order
            for frames, _, batch in self.frames[res]
            for h, w in self.shapes[res].values()
        ]

    def frame_counts(self) -> list[int]:
        return sorted({frames for options in self.frames.values() for frames, _, _ in options})

    def nearest_shape(self, res: str, height: int, width: int) -> tuple[int, int]:
        """The aspect bucket of `res` closest to height/width (in log ratio)."""
        target = math.log(height / width)
        return min(self.shapes[res].values(), key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))

    def assign(self, meta: Mapping, rng: random.Random, can_supply: Callable[[Mapping, int], bool]) -> Bucket | None:
        """The bucket of a sample with probe `meta` (width, height, ...), or None when it fits none.

        can_supply(meta, num_frames) says whether the video holds a clip of that many frames (fps, stride).
        """
        for res in self.order:
            if meta["width"] * meta["height"] < resolution_area(res):
                continue  # never upscale into a bucket
            for frames, prob, batch in self.frames[res]:
                if can_supply(meta, frames) and rng.random() < prob:
                    height, width = self.nearest_shape(res, meta["height"], meta["width"])
                    return Bucket(res, frames, height, width, batch)
        return None

    def could_fit(self, meta: Mapping, can_supply: Callable[[Mapping, int], bool]) -> bool:
        """Whether some bucket with a non-zero probability accepts the sample (no coin tossed)."""
        return any(
            meta["width"] * meta["height"] >= resolution_area(res) and prob > 0 and can_supply(meta, frames)
            for res in self.order
            for frames, prob, _ in self.frames[res]
        )

    def why_no_bucket(self, meta: Mapping, can_supply: Callable[[Mapping, int], bool]) -> str | None:
        """None when `could_fit`; otherwise why no bucket accepts the sample, in words naming its size and length."""
        if self.could_fit(meta, can_supply):
            return None
        area = meta["width"] * meta["height"]
        size = f"{meta['width']}x{meta['height']} ({area} px)"
        covered = [res for res in self.order if area >= resolution_area(res)]
        if not covered:
            smallest = self.order[-1]
            return (
                f"{size} is smaller than the smallest resolution {smallest} ({resolution_area(smallest)} px); "
                "videos are never upscaled"
            )
        counts = sorted({frames for res in covered for frames, prob, _ in self.frames[res] if prob > 0})
        if not counts:
            return f"{size}: every bucket of the resolutions it covers ({', '.join(covered)}) has probability 0"
        length = f"{meta['frames']} frames at {meta.get('fps') or 0:g} fps"
        if "window_frames" in meta:
            length += f", {meta['window_frames']} in its start/end window"
        return (
            f"{size}, {length}: too short for {min(counts)} frames, the shortest bucket of the resolutions it "
            f"covers ({', '.join(covered)}), at the run's fps and frame_stride"
        )

    def describe(self) -> str:
        parts = []
        for res in self.order:
            frames = ", ".join(f"{f}f p={p:g} b={b}" for f, p, b in self.frames[res])
            parts.append(f"{res} (area {resolution_area(res)}): {frames}")
        return "; ".join(parts)


def _parse_option(res: str, frames, spec) -> tuple[float, int]:
    try:
        frames = int(frames)
        prob, batch = float(spec[0]), int(spec[1])
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise ValueError(f"bucket {res!r} frames {frames!r}: expected [probability, batch_size], got {spec!r}") from err
    if frames < 1 or not 0.0 <= prob <= 1.0 or batch < 1:
        raise ValueError(
            f"bucket {res!r}: frames={frames} must be >= 1, probability={prob} in [0, 1], batch_size={batch} >= 1"
        )
    return prob, batch
