"""Benchmark of CPU clip decoding: `decode_clip` (seek + decode only the clip) against a full decode.

    python -m src.bench.decode [--workers 1] [--clips 24] [--out docs/bench_decode.json] [--seed 0]

Makes two H.264 test videos with PyAV (into a temporary directory): 448x256 and 1344x768, 24 fps, 6 s, a panning
textured background with a moving box and film grain, x264 preset veryfast, crf 23, a keyframe every 48 frames
(2 s, like much real footage). Then, for each resolution, every worker process decodes its share of `--clips`
requests (65 frames at 256x448 for the 256px video, 33 frames at 768x1344 for the 768px one, fps target 24,
random start) with `decode_clip` and with `decode_clip_naive`, which decodes every frame to RGB before slicing
(its cost does not depend on the start, so it is given start 0). Both methods get the same requests in the same
run, alternating request by request; all workers start each resolution together. Prints a table (samples/s and
clip frames/s, summed over workers, and the speedup over the naive decode) and writes the figures, per worker
too, with the machine and date to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from src.cli import HelpFormatter
from src.data.video import decode_clip, decode_clip_naive

FPS = 24
SECONDS = 6
GOP = 48  # keyframe interval in frames (2 s)


@dataclass(frozen=True)
class Case:
    """One resolution: the test video's size and the clip requested from it."""

    resolution: str
    video_width: int
    video_height: int
    num_frames: int
    height: int
    width: int


CASES = (
    Case("256px", 448, 256, 65, 256, 448),
    Case("768px", 1344, 768, 33, 768, 1344),
)
METHODS = ("decode_clip", "naive")


@dataclass(frozen=True)
class Timing:
    """One worker's measurement of one method on one resolution: its requests and the seconds spent on them."""

    worker: int
    resolution: str
    method: str
    samples: int
    frames: int  # clip frames returned
    seconds: float  # summed over this worker's calls of this method

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def render_video(width: int, height: int, frames: int, seed: int = 0) -> np.ndarray:
    """Footage-like RGB uint8 frames (frames, height, width, 3): a smooth texture panning diagonally, a bright
    box crossing the frame and per-frame grain, so that every frame differs and motion compensation has work."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(30, 220, (height // 16 + 4, width // 16 + 4, 3)).astype(np.uint8)
    texture = coarse.repeat(16, axis=0).repeat(16, axis=1)  # (h + 64, w + 64, 3) blocky
    texture = ((texture.astype(np.uint16) + np.roll(texture, 8, axis=0) + np.roll(texture, 8, axis=1)) // 3).astype(
        np.uint8
    )
    video = np.empty((frames, height, width, 3), dtype=np.uint8)  # (T, H, W, 3)
    side = height // 4
    for t in range(frames):
        dy, dx = (t * 2) % 64, (t * 3) % 64
        frame = texture[dy : dy + height, dx : dx + width].astype(np.int16)
        grain = rng.integers(-4, 5, (height, width, 1), dtype=np.int16)
        frame += grain
        top = int((height - side) * (0.5 + 0.4 * np.sin(t / 9)))
        left = int((width - side) * t / max(1, frames - 1))
        frame[top : top + side, left : left + side] = (240, 230, 80)
        video[t] = frame.clip(0, 255).astype(np.uint8)
    return video


def encode_test_video(width: int, height: int, seed: int = 0) -> bytes:
    """A 6 s, 24 fps H.264 mp4 of `render_video` content with a keyframe every GOP frames."""
    frames = render_video(width, height, FPS * SECONDS, seed)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "x264-params": f"keyint={GOP}:min-keyint={GOP}"}
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def decoder(method: str, data: bytes, case: Case, seed: int) -> Callable[[], torch.Tensor]:
    """A call that decodes one request of `case` with `method` (request `seed` fixes the random start)."""
    if method == "decode_clip":
        return lambda: decode_clip(
            data, case.num_frames, case.height, case.width, fps=FPS, rng=random.Random(f"bench/{seed}")
        )
    return lambda: decode_clip_naive(data, case.num_frames, case.height, case.width, fps=FPS)


def worker_main(
    worker: int,
    workers: int,
    videos: dict[str, bytes],
    clips: int,
    seed: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,
) -> None:
    """Decode this worker's share (requests worker, worker + workers, ...) of each resolution with both methods.

    The methods alternate request by request (which goes first alternates too), so that both see the same
    machine: other load and the cost of faulting in fresh memory for each 400 MB clip vary during a run.
    """
    torch.set_num_threads(1)  # as in DataLoader workers
    for case in CASES:
        data = videos[case.resolution]
        for method in METHODS:
            decoder(method, data, case, seed - 1)()  # warm-up, untimed: first-call costs
        seconds = dict.fromkeys(METHODS, 0.0)
        mine = range(worker, clips, workers)
        barrier.wait()  # all workers decode each resolution together
        for i in mine:
            for method in METHODS if i % 2 == 0 else METHODS[::-1]:
                call = decoder(method, data, case, seed + i)
                started = time.perf_counter()
                call()
                seconds[method] += time.perf_counter() - started
        for method in METHODS:
            samples = len(mine)
            results.put(Timing(worker, case.resolution, method, samples, samples * case.num_frames, seconds[method]))
    barrier.wait()


def run(workers: int, clips: int, seed: int) -> tuple[list[dict], dict[str, dict]]:
    """Make the test videos, run the workers; returns (one row per resolution and method, the videos' facts)."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        videos: dict[str, bytes] = {}
        facts: dict[str, dict] = {}
        for case in CASES:
            started = time.perf_counter()
            data = encode_test_video(case.video_width, case.video_height)
            path = Path(tmp) / f"{case.resolution}.mp4"
            path.write_bytes(data)
            videos[case.resolution] = path.read_bytes()
            facts[case.resolution] = {
                "size": f"{case.video_width}x{case.video_height}",
                "fps": FPS,
                "seconds": SECONDS,
                "gop": GOP,
                "bytes": len(data),
                "encode_s": round(time.perf_counter() - started, 2),
                "clip": f"{case.num_frames} frames at {case.height}x{case.width}, fps {FPS}, random start",
            }
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(workers), context.Queue()
    procs = [
        context.Process(target=worker_main, args=(w, workers, videos, clips, seed, barrier, queue))
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    timings = [queue.get() for _ in range(workers * len(CASES) * len(METHODS))]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"benchmark worker {proc.pid} exited with code {proc.exitcode}")
    return summarise(timings), facts


def summarise(timings: list[Timing]) -> list[dict]:
    """Rows (resolution, method, rates summed over workers, per-worker rates, speedup over the naive decode)."""
    rows = []
    for case in CASES:
        for method in METHODS:
            mine = sorted((t for t in timings if (t.resolution, t.method) == (case.resolution, method)), key=by_worker)
            samples_per_s = sum(t.samples_per_s for t in mine)  # the workers run concurrently
            rows.append(
                {
                    "resolution": case.resolution,
                    "method": method,
                    "samples": sum(t.samples for t in mine),
                    "samples_per_s": samples_per_s,
                    "frames_per_s": samples_per_s * case.num_frames,
                    "per_worker": [{**asdict(t), "samples_per_s": t.samples_per_s} for t in mine],
                }
            )
        naive = next(r for r in rows if (r["resolution"], r["method"]) == (case.resolution, "naive"))
        for row in rows[-len(METHODS) :]:
            row["speedup"] = row["samples_per_s"] / naive["samples_per_s"]
    return rows


def by_worker(timing: Timing) -> int:
    """Sort key: worker number."""
    return timing.worker


def format_table(rows: Sequence[dict]) -> str:
    """The results as a Markdown table: totals over workers, then each worker's samples/s."""
    lines = [
        "| resolution | method | samples/s | frames/s | speedup | samples/s per worker |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        per_worker = ", ".join(f"{w['samples_per_s']:.2f}" for w in row["per_worker"])
        lines.append(
            f"| {row['resolution']} | {row['method']} | {row['samples_per_s']:.2f} | "
            f"{row['frames_per_s']:.1f} | {row['speedup']:.2f}x | {per_worker} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and write the JSON report; returns the rows."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m src.bench.decode", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--clips", type=int, default=24, help="requests per resolution and method, over all workers")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_decode.json"), help="JSON report path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests' random starts")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.clips < args.workers:
        parser.error(f"--clips must be >= --workers ({args.workers}), got {args.clips}")
    started = time.perf_counter()
    rows, videos = run(args.workers, args.clips, args.seed)
    table = format_table(rows)
    print(table)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m src.bench.decode", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyav": av.__version__,
        },
        "workers": args.workers,
        "clips": args.clips,
        "seed": args.seed,
        "videos": videos,
        "results": rows,
        "table": table,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_s']} s)")
    return rows


if __name__ == "__main__":
    main()
