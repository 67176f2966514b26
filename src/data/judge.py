"""A judge for the synthetic demo: reads the colour and the direction of motion of the shape from the pixels.

The synthetic clips' captions are ground truth (src/data/synthetic.py), so a model trained on them can be scored
on what it draws: sample every colour x shape x direction prompt, then read the video back.

    python -m src.data.judge RUN_DIR [--steps 20] [--guidance 4]     # 96 prompts: RUN_DIR/judge/*.mp4, judge.json
    python -m src.data.judge --data outputs/synthetic                # the judge on the generated clips themselves

How a video is read (frames (T, H, W, 3) uint8):
- background: the per-channel median of every pixel of the clip (the shape covers under a fifth of a frame);
- foreground: pixels whose largest channel difference from the background, averaged over their 3x3 neighbourhood
  (so that the grain a weak sampler leaves is not read as a shape), exceeds `FOREGROUND_LEVEL`;
- colour: the mean foreground colour, nearest (Euclidean RGB) of the palette; "none" without foreground;
- motion: the foreground centroid of each frame, a least-squares line through them over time; its displacement
  over the clip along x and y. The larger axis and its sign give the direction; under `MIN_TRAVEL` of the frame
  size it is "static".
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from src.cli import HelpFormatter
from src.data.synthetic import COLOURS, DIRECTIONS, SHAPES

FOREGROUND_LEVEL = 60  # of 255: the palette's colours are >= 140 away from every background grey (<= 40)
MIN_TRAVEL = 0.05  # of the frame size: a smaller displacement over the clip reads as static
MIN_PIXELS = 2  # a frame with fewer foreground pixels has no centroid


@dataclass(frozen=True)
class Reading:
    """What the judge reads off one video."""

    colour: str  # a palette name, or "none"
    direction: str  # left / right / up / down, or "static"
    dx: float  # displacement over the clip, in frame widths (right is positive)
    dy: float  # ... in frame heights (down is positive)
    foreground: float  # mean fraction of foreground pixels per frame


def demo_prompts() -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, direction) for every colour x shape x direction: 8 x 3 x 4 = 96."""
    return [
        (f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} moving {d} on a dark background", c, s, d)
        for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)
    ]


def box3(x: np.ndarray) -> np.ndarray:
    """3x3 spatial mean of (T, H, W) (edges replicated): isolated noisy pixels fall under the foreground level,
    a shape of radius >= 2 pixels does not."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    H, W = x.shape[1:]
    return sum(padded[:, i : i + H, j : j + W] for i in range(3) for j in range(3)) / 9


def read_video(frames: np.ndarray) -> Reading:
    """Judge one video: frames (T, H, W, 3) uint8 (or float in [0, 255])."""
    video = np.asarray(frames, dtype=np.float64)  # (T, H, W, 3)
    T, H, W, _ = video.shape
    background = np.median(video.reshape(-1, 3), axis=0)  # (3,)
    diff = np.abs(video - background).max(-1)  # (T, H, W)
    mask = box3(diff) > FOREGROUND_LEVEL
    solid = mask & (diff > FOREGROUND_LEVEL)  # the colour is read inside the shape, not on its blurred rim
    if not solid.any():
        return Reading("none", "static", 0.0, 0.0, 0.0)
    mean_colour = video[solid].mean(0)  # (3,)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)  # (K, 3)
    colour = names[int(np.argmin(((palette - mean_colour) ** 2).sum(-1)))]
    counts = mask.sum((1, 2))  # (T,)
    seen = counts >= MIN_PIXELS
    dx = dy = 0.0
    if seen.sum() >= 2:
        ys, xs = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
        cx = (mask.sum(1) * xs).sum(-1)[seen] / counts[seen]  # (T_seen,)
        cy = (mask.sum(2) * ys).sum(-1)[seen] / counts[seen]
        times = np.arange(T, dtype=np.float64)[seen]
        span = T - 1
        dx = float(np.polyfit(times, cx, 1)[0] * span / W)
        dy = float(np.polyfit(times, cy, 1)[0] * span / H)
    if max(abs(dx), abs(dy)) < MIN_TRAVEL:
        direction = "static"
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Reading(colour, direction, dx, dy, float(mask.mean()))


def score(readings: Sequence[Reading], truths: Sequence[tuple[str, str]]) -> dict:
    """Accuracy of colour, direction and both against (colour, direction) truths, and what was read."""
    if len(readings) != len(truths) or not truths:
        raise ValueError(f"{len(readings)} readings for {len(truths)} truths")
    colour = [r.colour == c for r, (c, _) in zip(readings, truths, strict=True)]
    direction = [r.direction == d for r, (_, d) in zip(readings, truths, strict=True)]
    return {
        "n": len(truths),
        "colour_acc": float(np.mean(colour)),
        "direction_acc": float(np.mean(direction)),
        "both_acc": float(np.mean([a and b for a, b in zip(colour, direction, strict=True)])),
        "static": sum(r.direction == "static" for r in readings),
        "directions_read": dict(Counter(r.direction for r in readings)),
    }


def to_frames(video) -> np.ndarray:
    """A decoded video (3, T, H, W) in [-1, 1] (tensor or array) -> (T, H, W, 3) uint8."""
    array = np.asarray(video.detach().cpu().float() if hasattr(video, "detach") else video, dtype=np.float64)
    return np.clip((array.transpose(1, 2, 3, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def judge_data(urls: str, limit: int | None = None) -> dict:
    """The judge on the generated clips themselves (decoded from the shards as the loader decodes them)."""
    from src.data.catalog import MemberReader, expand_urls, scan_shards
    from src.data.video import decode_clip

    shards, _ = scan_shards(expand_urls(urls))
    reader, readings, truths = MemberReader(), [], []
    samples = ((shard, sample) for shard in shards for sample in shard.samples)
    for shard, sample in itertools.islice(samples, limit):
        media, _ = reader.read(shard, sample)
        meta = sample.meta  # the synthetic writer's .json member: frames, size, colour, shape, direction
        video = decode_clip(media, 8, meta["height"], meta["width"], 2)  # the demo's 8 frames at stride 2
        readings.append(read_video(to_frames(video)))
        truths.append((meta["colour"], meta["direction"]))
    reader.close()
    return score(readings, truths)


def judge_run(
    run_dir: str | Path, steps: int = 20, guidance: float = 4.0, seed: int = 0, batch: int = 32, ema: bool = True
) -> dict:
    """Sample the 96 demo prompts from a run (or export) and judge them: RUN_DIR/judge/NN_<prompt>.mp4, judge.json
    and judge_strip.png."""
    import torch

    from src.evaluation.sampling import load_run, sample_prompts
    from src.sample import pick_shape

    run_dir = Path(run_dir)
    cfg, model, vae, text, tag = load_run(run_dir, ema=ema)
    prompts = demo_prompts()
    null_txt, null_vec = text([""])
    with torch.no_grad():  # the fixed-prompt sampler of training's evaluation: prompt i from noise seed + i
        _, decoded = sample_prompts(
            model,
            text,
            vae,
            [p for p, *_ in prompts],
            pick_shape(cfg, vae),
            null_txt,
            null_vec,
            run_dir / "judge",
            "cpu",
            seed=seed,
            steps=steps,
            guidance=guidance,
            batch=batch,
        )
    videos = [to_frames(v) for v in decoded]
    readings = [read_video(v) for v in videos]
    result = {"run": str(run_dir), "tag": tag, "ema": ema, "steps": steps, "guidance": guidance, "seed": seed}
    result |= score(readings, [(c, d) for _, c, _, d in prompts])
    result["per_direction"] = per_key(readings, prompts, 3)
    result["readings"] = [{"prompt": p[0], **asdict(r)} for p, r in zip(prompts, readings, strict=True)]
    (run_dir / "judge.json").write_text(json.dumps(result, indent=1))
    strip = [i for i, (_, c, s, _) in enumerate(prompts) if s == "square" and c in ("red", "cyan")]
    save_strip([videos[i] for i in strip], [prompts[i][0] for i in strip], run_dir / "judge_strip.png")
    return result


def save_strip(videos: Sequence[np.ndarray], labels: Sequence[str], path: Path, scale: int = 2) -> Path:
    """One row of frames per video ((T, H, W, 3) uint8), labelled, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=128) for f in v], 1) for v in videos]
    fig, axes = plt.subplots(len(rows), 1, figsize=(rows[0].shape[1] * scale / 60, len(rows) * 0.9), dpi=60)
    for ax, row, label in zip(np.atleast_1d(axes), rows, labels, strict=True):
        ax.imshow(row, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def per_key(readings: Iterable[Reading], prompts: Sequence[tuple], field: int) -> dict[str, float]:
    """Direction accuracy per value of one prompt field (3: direction)."""
    hits: dict[str, list[bool]] = {}
    for r, p in zip(readings, prompts, strict=True):
        hits.setdefault(p[field], []).append(r.direction == p[3])
    return {k: float(np.mean(v)) for k, v in hits.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run directory or export to sample and judge")
    parser.add_argument("--data", help="judge the generated clips of these shards instead")
    parser.add_argument("--limit", type=int, default=None, help="with --data: at most this many clips")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.data is None):
        parser.error("give a RUN_DIR to sample and judge, or --data SHARDS to judge the generated clips")
    if args.data:
        result = judge_data(args.data, args.limit)
        print(f"judge on the data ({result['n']} clips): colour {result['colour_acc']:.1%}, "
              f"direction {result['direction_acc']:.1%}, static {result['static']}")  # fmt: skip
        return
    result = judge_run(args.run_dir, args.steps, args.guidance, args.seed, ema=args.ema)
    print(f"judge {args.run_dir} ({result['tag']}, {result['n']} prompts): colour {result['colour_acc']:.1%}, "
          f"direction {result['direction_acc']:.1%}, both {result['both_acc']:.1%}, static {result['static']}; "
          f"directions read {result['directions_read']}")  # fmt: skip


if __name__ == "__main__":
    main()
