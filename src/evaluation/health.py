"""Sample health: statistics of generated videos as ratios to the same statistics of real clips.

The field's silent failures each move one statistic far from the data's: black or washed-out video (brightness,
contrast), static video (motion), blurry video (sharpness), flickering video (flicker). Pure functions on decoded
videos (B, 3, T, H, W) in [-1, 1]; the statistics are on luma in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

STATS = ("brightness", "contrast", "motion", "sharpness", "flicker")
FLOOR = 1e-3  # luma units: a reference statistic below this is taken as this (a ratio to ~0 says nothing)


def luma(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) RGB in [-1, 1] -> (B, T, H, W) Rec. 601 luma in [0, 1]."""
    rgb = (video.float().clamp(-1, 1) + 1) / 2
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def video_stats(video: torch.Tensor) -> dict[str, float]:
    """Mean over the videos of: brightness (mean luma), contrast (spatial std per frame), motion (mean absolute
    change between consecutive frames), sharpness (root mean square of the 4-neighbour
    Laplacian: high-frequency energy), flicker (std over time of
    each frame's mean luma). Motion and flicker are 0 for single frames."""
    y = luma(video)  # (B, T, H, W)
    lap = (
        4 * y[..., 1:-1, 1:-1] - y[..., :-2, 1:-1] - y[..., 2:, 1:-1] - y[..., 1:-1, :-2] - y[..., 1:-1, 2:]
    )  # (B, T, H-2, W-2)
    frame_mean = y.mean((-2, -1))  # (B, T)
    two = y.shape[1] > 1
    return {
        "brightness": y.mean().item(),
        "contrast": y.flatten(-2).std(-1).mean().item(),
        "motion": (y[:, 1:] - y[:, :-1]).abs().mean().item() if two else 0.0,
        "sharpness": lap.pow(2).mean().sqrt().item(),
        "flicker": frame_mean.std(1).mean().item() if two else 0.0,
    }


FLICKER_SCALE = 0.1  # flicker is measured against at least this fraction of the data's contrast


def health_ratios(sample: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """sample / reference for every statistic (the reference floored at FLOOR). Clips of a shape on a still
    background hardly flicker at all, so flicker is compared with at least a tenth of the data's contrast: a
    generated clip whose mean brightness wobbles by that much over time is not yet flickering."""
    floors = dict.fromkeys(STATS, FLOOR) | {"flicker": max(FLOOR, FLICKER_SCALE * reference["contrast"])}
    return {k: sample[k] / max(reference[k], floors[k]) for k in STATS}


def health_alarms(ratios: Mapping[str, float], bounds: Mapping[str, Sequence[float | None]]) -> list[str]:
    """One message per ratio outside its [low, high] bounds (either may be None: unbounded)."""
    alarms = []
    for name, (low, high) in bounds.items():
        if name not in ratios:
            raise ValueError(f"eval.health bounds name {name!r}; the statistics are {list(STATS)}")
        value = ratios[name]
        if (low is not None and value < low) or (high is not None and value > high):
            alarms.append(f"{name} ratio {value:.3f} outside [{low}, {high}] of the data's")
    return alarms
