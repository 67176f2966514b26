"""ZeRO-3 model-state memory per rank, measured: `python -m src.bench.memory --ranks 1 2 4`.

For a fixed model, starts DeepSpeed ZeRO-3 on 1, 2 and 4 gloo ranks (CPU), takes one training step and reads
the bytes each rank holds: its parameter partition, its gradient partition, its fp32 master partition and its
AdamW states. Prints a table against the ideal 1/N of the one-rank figures and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from src.cli import HelpFormatter

FIELDS = ("params", "grads", "master", "optimizer")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of model state this rank holds under a ZeRO-3 `DeepSpeedEngine` (call after backward, before step
    for `grads`; the optimizer states exist after the first step)."""
    opt = engine.ds.optimizer
    return {
        "params": _nbytes(p.ds_tensor for p in engine.module.parameters()),
        "grads": sum(_nbytes(g or []) for g in opt.averaged_gradients.values()),  # freed after the step
        "master": _nbytes(opt.fp32_partitioned_groups_flat),
        "optimizer": sum(_nbytes(v for v in s.values() if torch.is_tensor(v)) for s in opt.optimizer.state.values()),
    }


def _measure(out: Path, model_overrides: dict, precision: str) -> None:
    """One rank's part (run under torchrun): build, one step, gather every rank's bytes to rank 0."""
    import torch.distributed as dist

    from src.models.mmdit import MMDiT
    from src.parallel.deepspeed import DeepSpeedEngine
    from src.parallel.dist import init_distributed, leave
    from src.run.param_groups import warmup_schedule

    info = init_distributed("gloo")
    torch.manual_seed(0)
    model = MMDiT(**model_overrides)
    n_params = sum(p.numel() for p in model.parameters())
    engine = DeepSpeedEngine(
        model, functools.partial(torch.optim.AdamW, lr=1e-4), warmup_schedule, info.device, precision=precision
    )
    x = torch.randn(2, model.in_channels, 2, 8, 8)
    txt, vec, t = (
        torch.randn(2, 5, model.txt_in.in_features),
        torch.randn(2, model.vector_in.in_layer.in_features),
        torch.rand(2),
    )
    engine.backward(engine(x, txt, vec, t).float().pow(2).mean())
    grads = model_state_bytes(engine)["grads"]
    engine.step()
    mine = {**model_state_bytes(engine), "grads": grads}
    every = [None] * info.world_size
    dist.all_gather_object(every, mine)
    if info.is_main:
        out.write_text(json.dumps({"ranks": info.world_size, "parameters": n_params, "per_rank": every}))
    leave()  # DeepSpeed holds gloo groups that finalization could abort on (`src.parallel.dist.leave`)


def run_workers(module: str, ranks: int, worker_args: list[str], what: str) -> dict:
    """Run `python -m <module> --worker OUT <worker_args>` on `ranks` gloo ranks (a fresh torchrun, one thread and
    DeepSpeed's CPU accelerator unless DS_ACCELERATOR says otherwise) and return the JSON its rank 0 writes to OUT;
    a failed run raises with its ranks' stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd += ["-m", module, "--worker", str(out), *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{what} on {ranks} ranks failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def run(ranks: list[int], model_overrides: dict, precision: str) -> list[dict]:
    args = ["--model", json.dumps(model_overrides), "--precision", precision]
    return [run_workers("src.bench.memory", n, args, "ZeRO-3") for n in ranks]


def table(results: list[dict]) -> str:
    one = {f: results[0]["per_rank"][0][f] * results[0]["ranks"] for f in FIELDS}  # the whole model state
    lines = [
        "| ranks | " + " | ".join(f"{f} MB/rank" for f in FIELDS) + " | total MB/rank | ideal (1/N) | ratio |",
        "|---" * (len(FIELDS) + 4) + "|",
    ]
    for r in results:
        worst = max(r["per_rank"], key=lambda b: sum(b[f] for f in FIELDS))
        total, ideal = sum(worst[f] for f in FIELDS), sum(one.values()) / r["ranks"]
        cells = " | ".join(f"{worst[f] / 1e6:.2f}" for f in FIELDS)
        lines.append(f"| {r['ranks']} | {cells} | {total / 1e6:.2f} | {ideal / 1e6:.2f} | {total / ideal:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--model",
        default=json.dumps(
            {
                "in_channels": 48,
                "hidden": 256,
                "heads": 4,
                "axes_dim": [16, 24, 24],
                "depth_double": 2,
                "depth_single": 2,
                "txt_dim": 384,
                "vec_dim": 384,
            }
        ),
        help="MMDiT keyword arguments as JSON",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _measure(args.worker, json.loads(args.model), args.precision)
    results = run(args.ranks, json.loads(args.model), args.precision)
    print(f"model: {results[0]['parameters'] / 1e6:.2f}M parameters, {args.precision}, ZeRO-3, one step of AdamW")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
