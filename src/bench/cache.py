"""Benchmark: training step time and peak memory with online encoding against cached features.

    python -m src.bench.cache [--experiment dcae_tiny] [--steps 30] [--out docs/bench_cache.json] [OVERRIDE ...]

One run, same model, same buckets and batch: the experiment's source video shards are encoded once by
`src.preprocess` into a temporary cache; then `src.train` runs `--steps` steps single-process twice, once with
`data=shards` (decode + VAE + text encoder every step, as without a cache) and once with `data=cached` (no encoder
in memory). Each training run is its own process, so its peak resident memory (or peak CUDA memory on a GPU) is
its own. Prints a table of median step time (after the first log window, which holds start-up) and peak memory,
and writes the figures with the machine and date to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from hydra import compose, initialize_config_dir

from src.cli import HelpFormatter
from src.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def measure(run_dir: Path) -> dict[str, float]:
    rows = read_metrics(run_dir)[1:]  # the first window holds start-up (loading, first batches)
    return {
        "step_time_s": statistics.median(r["step_time_s"] for r in rows),
        "data_wait_s": statistics.median(r["data_wait_s"] for r in rows),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
        "loss_last": rows[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m src.bench.cache", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--experiment", default="dcae_tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. model=mmdit_small")
    args = parser.parse_args(argv)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={args.experiment}", *args.overrides])
    source = cfg.data.preprocess
    common = [f"+experiment={args.experiment}", "parallel=local", f"steps={args.steps}"]
    common += [f"log_every={args.log_every}", f"ckpt_every={args.steps}", *args.overrides]
    results = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-cache-") as tmp:
        cache = Path(tmp) / "cache"
        _run(["-m", "src.preprocess", *common, f"data.urls={cache}"])
        online = [
            "data=shards",
            "~data.preprocess",  # the experiment sets it for data=cached; the video loader takes no such key
            f"data.urls={source.urls}",
            f"data.frame_stride={source.frame_stride}",
            f"data.crop={source.crop}",
            "data.num_workers=0",
            "data.shuffle=true",
        ]
        if source.fps is not None:
            online.append(f"data.fps={source.fps}")
        for mode, extra in (("online", online), ("cached", [f"data.urls={cache}"])):
            run_dir = Path(tmp) / mode
            _run(["-m", "src.train", *common, *extra, f"hydra.run.dir={run_dir}"])
            results[mode] = measure(run_dir)

    speedup = results["online"]["step_time_s"] / results["cached"]["step_time_s"]
    print(f"{'mode':8} {'step time (s)':>14} {'data wait (s)':>14} {'peak memory (GB)':>17}")
    for mode, r in results.items():
        print(f"{mode:8} {r['step_time_s']:14.3f} {r['data_wait_s']:14.3f} {r['peak_mem_gb']:17.2f}")
    saved = results["online"]["peak_mem_gb"] - results["cached"]["peak_mem_gb"]
    print(f"cached features: {speedup:.2f}x faster steps, {saved:.2f} GB less peak memory")
    report = {
        "experiment": args.experiment,
        "overrides": args.overrides,
        "steps": args.steps,
        "results": results,
        "speedup": speedup,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "date": datetime.now(timezone.utc).date().isoformat(),
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
