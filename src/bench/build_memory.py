"""Host memory per rank while the model is built and handed to an engine, measured:
`python -m src.bench.build_memory --model mmdit_1b --ranks 1 2 4 --engine zero3 fsdp2`.

Starts N gloo ranks on the CPU for each engine (`conf/parallel/<engine>.yaml`), builds the model through the
engine's construction (`src.parallel.construction`), optionally loads `--init-from` into it, and wraps it in the
engine (optimizer created, no step). Each rank reads its peak resident memory (`VmHWM` of /proc/self/status, reset
between phases through /proc/self/clear_refs) in each phase: build, load, engine. Prints, per engine and N, the
worst rank's peak above its resident memory before the model against the fp32 parameters / N, and writes JSON.
On a GPU machine the peak device memory of each phase is recorded too.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import torch

from src.bench.memory import run_workers
from src.cli import HelpFormatter

PHASES = ("build", "load", "engine")
GIB = 1024**3


def _status(field: str) -> int:
    """A /proc/self/status memory figure of this process, in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) * 1024


def _reset_peak() -> None:
    """Start a new peak: VmHWM falls back to the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> dict[str, int]:
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"host": _status("VmHWM"), "device": device}


def _measure(out: Path, engine_name: str, model_kwargs: dict, init_from: str | None) -> None:
    """One rank's part (run under torchrun): build, load, wrap; every rank's figures gathered to rank 0."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from src.config import CONF
    from src.models.mmdit import MMDiT
    from src.parallel.construction import construction_for
    from src.parallel.dist import all_gather_objects, init_distributed, leave
    from src.run.param_groups import warmup_schedule
    from src.run.transitions import apply_transition

    info = init_distributed("gloo")
    build_engine = instantiate(OmegaConf.load(CONF / "parallel" / f"{engine_name}.yaml"))
    construction = construction_for(build_engine)
    before = _status("VmRSS")
    mine = {"before": before}
    _reset_peak()
    torch.manual_seed(0)
    with construction.build():
        model = MMDiT(**model_kwargs)
    mine["build"] = _peak()
    shapes = construction.shapes(model)
    n_params = sum(shapes[n].numel() for n, _ in model.named_parameters())
    _reset_peak()
    if init_from:
        apply_transition(model, init_from, [], None, construction)
    mine["load"] = _peak()
    _reset_peak()
    build_engine(
        model=model,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
        scheduler=warmup_schedule,
        device=info.device,
    )
    mine["engine"] = _peak()
    mine["after"] = _status("VmRSS")
    every = all_gather_objects(mine)
    if info.is_main:
        record = {"engine": engine_name, "ranks": info.world_size, "parameters": n_params, "per_rank": every}
        out.write_text(json.dumps(record))
    leave()  # DeepSpeed holds gloo groups that finalization could abort on (`src.parallel.dist.leave`)


def run(engine: str, ranks: int, model_kwargs: dict, init_from: str | None) -> dict:
    """The figures of `ranks` gloo ranks building the model for `engine` (a fresh torchrun)."""
    args = ["--engine", engine, "--model-kwargs", json.dumps(model_kwargs)]
    args += ["--init-from", init_from] if init_from else []
    return run_workers("src.bench.build_memory", ranks, args, engine)


def worst_rise(result: dict, phase: str) -> int:
    """The largest rise of any rank's host peak in `phase` above its resident memory before the model."""
    return max(r[phase]["host"] - r["before"] for r in result["per_rank"])


def table(results: list[dict]) -> str:
    lines = [
        "| engine | ranks | fp32 params / N | " + " | ".join(f"{p} peak rise, worst rank" for p in PHASES)
        + " | rank 0 engine peak | other ranks' engine peak | resident before the model |",
        "|---|---:|---:|" + "---:|" * (len(PHASES) + 3),
    ]  # fmt: skip
    for r in results:
        share = r["parameters"] * 4 / r["ranks"]
        rises = " | ".join(f"{worst_rise(r, p) / GIB:.2f} GiB" for p in PHASES)
        others = [x["engine"]["host"] for x in r["per_rank"][1:]]
        other = f"{max(others) / GIB:.2f} GiB" if others else "-"
        lines.append(
            f"| {r['engine']} | {r['ranks']} | {share / GIB:.2f} GiB | {rises} | "
            f"{r['per_rank'][0]['engine']['host'] / GIB:.2f} GiB | {other} | "
            f"{max(x['before'] for x in r['per_rank']) / GIB:.2f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="mmdit_1b", help="conf/model/<name>.yaml")
    parser.add_argument("--vae", default="hunyuan", help="conf/vae/<name>.yaml: gives the model its channels")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--engine", nargs="+", default=["zero3", "fsdp2"], help="conf/parallel/<name>.yaml")
    parser.add_argument("--init-from", default=None, help="also load this checkpoint (init_from) into the model")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--model-kwargs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _measure(args.worker, args.engine[0], json.loads(args.model_kwargs), args.init_from)
    from src.config import model_config

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else model_config(args.model, args.vae)
    results = []
    for engine in args.engine:
        for n in args.ranks:
            results.append(run(engine, n, kwargs, args.init_from))
            print(table(results[-1:]).splitlines()[-1], flush=True)  # each row as it is measured
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    print(f"model: {args.model}, {results[0]['parameters'] / 1e6:.1f}M parameters; init_from: {args.init_from}")
    print(table(results))


if __name__ == "__main__":
    main()
