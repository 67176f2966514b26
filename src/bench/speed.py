"""Training speed: Kiln's real loop and engine against the same architecture built from diffusers.

    python -m src.bench [--model mmdit_1b] [--latent 33 32 32] [--text-tokens 512] [--batch 1] [--steps 30]
                        [--log-every 5] [--nproc 1] [--engines ENGINE:RANKS ...] [--no-baseline] [--json OUT]
                        [OVERRIDE ...]

1. **Kiln**: `src.train` itself (torchrun with `--nproc` > 1) on `data=random_features`: random latents of the
   given grid and random text features, so no decoding, encoder or disk is involved, through the configured engine
   (ZeRO-3 bf16 by default; OVERRIDEs such as `parallel=local parallel.checkpoint_double=4 parallel.compile=true`
   change it). Its figures are what the run writes to `metrics.jsonl`.
   `--engines local:1 zero3:1 zero3:2 fsdp2:1 fsdp2:2` runs it once per engine and rank count instead, in one
   command (the same model, shapes and batch per rank; the precision each engine's config or an OVERRIDE sets).
2. **Baseline**: the same architecture and size as diffusers' `FluxTransformer2DModel` (`flux_config`, the
   model Kiln exports to), in one process with a plain training step: fp32 weights under bf16 autocast (what
   accelerate's `mixed_precision=bf16` does), the same AdamW settings, the same inputs, noise and timesteps,
   gradient clipping; diffusers' default attention processor (PyTorch SDPA).

Each run is its own process (its own peak memory). Both count the same model FLOPs (`src.flops`, one formula for
one architecture) and skip the first `--warmup` log windows (allocation, compilation). Prints one table (tokens/s
per device, MFU, TFLOP/s, step time, data wait, peak memory, and the ratio Kiln / baseline) and writes JSON.
`--profile N` also profiles N of Kiln's measured steps and prints where their time goes (`src/run/profiler.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.cli import HelpFormatter
from src.run.metrics import StepWindow, read_metrics
from src.run.profiler import table as profile_table

ROOT = Path(__file__).resolve().parents[2]


ENGINES = ("local", "zero3", "fsdp2")  # conf/parallel/


def compose_config(args: argparse.Namespace, engine: str | None = None) -> tuple[DictConfig, list[str]]:
    """The training config Kiln runs with, and its overrides (the baseline reads model, optim, diffusion, seed);
    `engine` chooses the parallel group (before the OVERRIDEs, which may set its keys)."""
    overrides = [
        *([f"parallel={engine}"] if engine else []),
        f"model={args.model}",
        "data=random_features",
        f"data.latent=[{','.join(map(str, args.latent))}]",
        f"data.text_tokens={args.text_tokens}",
        f"data.batch_size={args.batch}",
        f"steps={args.steps}",
        f"log_every={args.log_every}",
        "ckpt_every=0",  # the benchmark measures steps, not checkpoint writes
        "logger=jsonl",
        *args.overrides,
    ]
    if args.profile:  # after the warm-up windows, inside the measured ones
        overrides += [f"profile.steps={args.profile}", f"profile.start={args.warmup * args.log_every + 1}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides), overrides


def summarise(rows: list[dict], warmup: int, world: int) -> dict:
    """Medians over the log windows after the first `warmup` ones; tokens/s per device."""
    if len(rows) <= warmup:
        raise SystemExit(f"{len(rows)} log windows, {warmup} of them warm-up: raise --steps or lower --log-every")
    rows = rows[warmup:]
    med = lambda key: statistics.median(r[key] for r in rows)
    out = {
        "tokens_per_s_per_device": med("tokens_per_s") / world,
        "samples_per_s": med("samples_per_s"),
        "step_time_s": med("step_time_s"),
        "data_wait_frac": med("data_wait_frac"),
        "tflops_per_device": med("tflops_per_device"),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
        "loss_last": rows[-1]["loss"],
        "windows": len(rows),
    }
    out["mfu"] = med("mfu") if all(r.get("mfu") is not None for r in rows) else None
    return out


def parse_engines(specs: list[str]) -> list[tuple[str, int]]:
    """`--engines` entries ENGINE:RANKS (e.g. fsdp2:2) as (engine, ranks); refused by value when impossible."""
    runs = []
    for spec in specs:
        engine, _, ranks = spec.partition(":")
        if engine not in ENGINES or not ranks.isdigit() or int(ranks) < 1:
            raise SystemExit(f"--engines {spec!r}: expected ENGINE:RANKS with ENGINE one of {ENGINES}, e.g. fsdp2:2")
        if engine == "local" and int(ranks) != 1:
            raise SystemExit(f"--engines {spec!r}: the local engine runs one process (local:1)")
        runs.append((engine, int(ranks)))
    return runs


def run_kiln(overrides: list[str], nproc: int, tmp: Path, name: str = "kiln") -> tuple[list[dict], dict | None]:
    """The Kiln run's metrics rows, and rank 0's profile breakdown when `profile.steps` was set."""
    run_dir = tmp / name
    args = ["-m", "src.train", *overrides, f"hydra.run.dir={run_dir}"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    _run(args, tmp / f"{name}.log")
    profile = run_dir / "profile" / "breakdown_rank0.json"
    return read_metrics(run_dir), json.loads(profile.read_text()) if profile.is_file() else None


def _run(args: list[str], log_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with log_file.open("w") as log:
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env | {"PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{log_file.read_text()[-5000:]}")


# ---------------------------------------------------------------------------------------------------------
# The diffusers baseline (run in its own process: `--baseline-worker`)
# ---------------------------------------------------------------------------------------------------------


def baseline(cfg: DictConfig, out: Path, checkpointing: bool) -> None:
    """A plain bf16-autocast training loop of `FluxTransformer2DModel`; writes `metrics.jsonl`-like rows to `out`."""
    from diffusers import FluxTransformer2DModel

    from src.diffusion.flow import drop_text
    from src.flops import peak_flops, step_flops
    from src.models.diffusers_flux import diffusers_forward, flux_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    with torch.device("meta"):
        kiln = instantiate(cfg.model)  # shapes only: patchify, token grid, FLOPs
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialised where it trains: no host-side build and copy of the weights
        flux = FluxTransformer2DModel(**flux_config(model_cfg)).train()
    if checkpointing:
        flux.enable_gradient_checkpointing()
    opt = OmegaConf.to_container(cfg.optim.optimizer, resolve=True)
    optimizer = torch.optim.AdamW(
        flux.parameters(), lr=opt["lr"], betas=opt["betas"], eps=opt["eps"], weight_decay=opt["weight_decay"]
    )  # torch's default implementation (foreach on CUDA), as diffusers' training scripts use it
    bf16 = cfg.parallel.get("precision", "fp32") == "bf16"
    flow = instantiate(cfg.diffusion)
    loader = instantiate(cfg.data)(dp_rank=0, dp_world=1, seed=cfg.seed, state=None, skip_dir=None)
    null_txt, null_vec = (x.to(device) for x in loader.dataset.null_features())
    peak = peak_flops(device, "bf16" if bf16 else "fp32", cfg.peak_tflops)
    window = StepWindow(device, world_size=1, peak_flops=peak)  # measured exactly as the Kiln loop measures
    rows, batches = [], iter(loader)
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        x0, txt, vec = (batch[k].to(device, non_blocking=True) for k in ("latent", "txt", "vec"))
        x_t, t, target, drop = flow.training_inputs(x0, batch["index"], cfg.seed)
        txt, vec = drop_text(txt, vec, null_txt[0], null_vec[0], drop)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = diffusers_forward(flux, kiln, x_t, txt, vec, t)  # (B, C, T', H', W')
        loss = (pred.float() - target.float()).pow(2).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(flux.parameters(), cfg.parallel.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        video_tokens, text_tokens = math.prod(kiln.token_grid(x0.shape)), txt.shape[1]
        flops = step_flops(kiln, video_tokens, text_tokens, len(x0))
        window.add(loss, wait, len(x0), len(x0) * (video_tokens + text_tokens), flops)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rows.append(window.row(step, opt["lr"], grad_norm, step * len(x0)))
    n_params = sum(p.numel() for p in flux.parameters())
    out.write_text(json.dumps({"rows": rows, "parameters": n_params, "class": type(flux).__name__}))


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def table(results: dict[str, dict]) -> str:
    lines = [
        "| run | tokens/s/device | MFU | TFLOP/s/device | step time s | data wait | peak memory GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {name} | {r['tokens_per_s_per_device']:,.0f} | {mfu} | {r['tflops_per_device']:.3g} | "
            f"{r['step_time_s']:.4g} | {r['data_wait_frac']:.1%} | {r['peak_mem_gb']:.2f} |"
        )
    return "\n".join(lines)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="mmdit_1b", help="a conf/model/ flavor")
    parser.add_argument(
        "--latent",
        type=int,
        nargs=3,
        default=[33, 32, 32],
        metavar=("T", "H", "W"),
        help="latent grid (256px x 129 frames through the HunyuanVideo VAE: 33 32 32)",
    )
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="samples per data-parallel rank and step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="log windows left out of the figures")
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the Kiln run (the baseline runs on one)")
    parser.add_argument(
        "--engines",
        nargs="+",
        default=None,
        metavar="ENGINE:RANKS",
        help=f"one Kiln run per entry instead of one run of the configured engine ({', '.join(ENGINES)}), e.g. "
        "local:1 zero3:1 zero3:2 fsdp2:1 fsdp2:2",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--baseline-checkpointing",
        action="store_true",
        help="diffusers' gradient checkpointing (all blocks) in the baseline",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile N steps of the Kiln run (src/run/profiler.py) and print where the time goes",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the Kiln run, e.g. parallel=local")
    args = parser.parse_args(argv)
    cfg, overrides = compose_config(args)
    if args.baseline_worker:
        baseline(cfg, args.baseline_worker, args.baseline_checkpointing)
        return {}

    with torch.device("meta"):
        model = instantiate(cfg.model)
    video_tokens = math.prod(model.token_grid((0, 0, *args.latent)))  # refuses a grid the patch does not divide
    runs = parse_engines(args.engines) if args.engines else [(None, args.nproc)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        profile = None
        for i, (engine, nproc) in enumerate(runs):
            run_cfg, run_overrides = compose_config(args, engine) if engine else (cfg, overrides)
            name = run_cfg.parallel._target_.rsplit(".", 1)[-1]
            precision = run_cfg.parallel.get("precision", "fp32")
            rows, run_profile = run_kiln(run_overrides, nproc, Path(tmp), f"kiln{i}")
            results[f"Kiln ({name}, {precision}, {nproc} rank{'s' * (nproc > 1)})"] = summarise(
                rows, args.warmup, nproc
            )
            profile = profile or run_profile  # the first run's
        if not args.no_baseline:
            out = Path(tmp) / "baseline.json"
            worker = ["-m", "src.bench", "--baseline-worker", str(out), *(argv or sys.argv[1:])]
            _run(worker, Path(tmp) / "baseline.log")
            base = json.loads(out.read_text())
            name = f"diffusers {base['class']} (plain bf16-autocast step)"
            results[name] = summarise(base["rows"], args.warmup, 1) | {"parameters": base["parameters"]}
    kilns = {k: r for k, r in results.items() if k.startswith("Kiln")}
    reference = [r["tokens_per_s_per_device"] for k, r in results.items() if k.startswith("diffusers")]
    ratios = {k: r["tokens_per_s_per_device"] / reference[0] for k, r in kilns.items()} if reference else {}
    ratio = next(iter(ratios.values()), None)  # the first Kiln run's
    report = {
        "device": device_name(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "command": "python -m src.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "tokens_per_sample": {"video": video_tokens, "text": args.text_tokens},
        "batch_per_rank": args.batch,
        "results": results,
        "ratio_kiln_over_baseline": ratio,
        "ratios_over_baseline": ratios,
        "profile": profile,
    }
    print(
        f"{args.model}: {video_tokens} video + {args.text_tokens} text tokens per sample, batch {args.batch} per "
        f"rank, {args.steps} steps, on {report['device']}"
    )
    print(table(results))
    if len(ratios) == 1:
        print(f"Kiln / baseline tokens/s: {ratio:.2f}x")
    for name, value in ratios.items() if len(ratios) > 1 else ():
        print(f"{name} / baseline tokens/s per device: {value:.2f}x")
    if profile:
        print(profile_table(profile))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
