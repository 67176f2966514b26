"""Choose a layout for the 11B before booking a cluster: `python -m src.parallel.layouts`.

For the model of `+experiment=stage1` (conf/model/mmdit_11b.yaml, bf16 with fp32 master weights) on 8, 64 and 256
GPUs of 8 per node, with ZeRO-3, FSDP2 and HSDP (FSDP2 with `parallel.replicate` = nodes: each node holds a
replica, sharded over its 8 GPUs), one rank's memory, planned as `python -m src.parallel.plan` plans it:

- model state: bf16 parameters and gradients, fp32 master weights, AdamW's two moments and Kiln's fp32 EMA,
  20 bytes per parameter, divided over the ranks that shard them (all of them; a node's under HSDP);
- the construction peak, before the optimizer exists, for each way the model is built (src/parallel/construction.py):
  ZeRO-3 building the fp32 model on every rank's host and moving it to the device before DeepSpeed partitions it
  (Kiln's ZeRO-3 before its `zero.Init` construction, and any model handed to `deepspeed.initialize` whole: 4 bytes
  per parameter on every rank, host and device), ZeRO-3 under `deepspeed.zero.Init` (Kiln's `Zero3Construction`:
  each module partitioned as it is built, so the rank's bf16 partition plus the largest module's own parameters in
  fp32 on the host and bf16 on the device while they are partitioned), FSDP2 / HSDP building on rank 0 only
  (rank 0: the fp32 model on its host plus its fp32 shard; every other rank its fp32 shard plus the largest tensor
  broadcast to it);
- activations saved for backward at the worst bucket of stage 1 (`+experiment=stage1`) and stage 2
  (`+experiment=stage2`: the DC-AE buckets) with their activation checkpointing, per `sp_size`
  (`src.parallel.activations`: a rank of a sequence-parallel group of S holds 1/S of the tokens);
- the total: model state, the weights held gathered and the reduction buffers (`src.parallel.plan.engine_bytes`),
  and the activations, against HEADROOM of the stage's GPU (`sized_for.gpu_memory_gib`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from src.cli import HelpFormatter
from src.config import CONF
from src.parallel.plan import (
    EMA_BYTES,
    GIB,
    HEADROOM,
    bucket_activations,
    engine_bytes,
    meta_model,
    state_bytes_per_param,
)

GPUS = (8, 64, 256)
GPUS_PER_NODE = 8
SP_SIZES = (1, 2, 4, 8)
ENGINES = ("zero3", "fsdp2", "hsdp")
STAGES = ("stage1", "stage2")
PRECISION = "bf16"


def shard_ranks(engine: str, gpus: int) -> int:
    """The ranks one parameter is split over: all of them, or one node's under HSDP."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    return min(gpus, GPUS_PER_NODE) if engine == "hsdp" else gpus


def model_state_bytes(n_params: int, engine: str, gpus: int) -> float:
    """One rank's parameters, gradients, master weights, AdamW moments and EMA (bf16 mixed precision)."""
    shards = shard_ranks(engine, gpus)
    return n_params * (state_bytes_per_param(PRECISION, 3, shards) + EMA_BYTES / shards)


@dataclass(frozen=True)
class Build:
    """The sizes construction depends on: parameters, the largest module's own, the largest tensor."""

    params: int
    largest_module: int
    largest_tensor: int


CONSTRUCTIONS = ("zero3 host build", "zero3 zero.Init", "fsdp2", "hsdp")


def construction_peak(build: Build, construction: str, gpus: int) -> tuple[float, float]:
    """(rank 0, any other rank) bytes at the construction peak, host and device together (see the docstring)."""
    p = build.params
    if construction == "zero3 host build":
        return 4 * p, 4 * p
    if construction == "zero3 zero.Init":
        peak = 2 * p / gpus + (4 + 2) * build.largest_module
        return peak, peak
    shards = shard_ranks(construction, gpus)
    if construction in ("fsdp2", "hsdp"):
        return 4 * p + 4 * p / shards, 4 * p / shards + 4 * build.largest_tensor
    raise ValueError(f"construction {construction!r} is not one of {CONSTRUCTIONS}")


def build_sizes(model) -> Build:
    return Build(
        params=sum(p.numel() for p in model.parameters()),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        largest_tensor=max(p.numel() for p in model.parameters()),
    )


def parallel_config(engine: str, gpus: int, sp: int) -> DictConfig:
    """conf/parallel/<engine>.yaml in bf16 with `sp_size`, HSDP as FSDP2 with one replica per node."""
    par = OmegaConf.load(CONF / "parallel" / f"{'zero3' if engine == 'zero3' else 'fsdp2'}.yaml")
    par.precision, par.sp_size = PRECISION, sp
    if engine == "hsdp":
        par.replicate = max(gpus // GPUS_PER_NODE, 1)
    return par


@dataclass(frozen=True)
class Stage:
    """A stage's worst bucket per sp_size and its GPU's memory."""

    name: str
    gpu_memory_gib: float
    worst: dict[int, tuple[str, float]]  # sp -> (bucket, GiB of activations per rank)


def stage(cfg: DictConfig, name: str, sp_sizes: tuple[int, ...] = SP_SIZES) -> Stage:
    model = meta_model(cfg)
    worst = {}
    for sp in sp_sizes:
        bucket, _, _, gib = max(bucket_activations(cfg, model, sp), key=lambda row: row[3])
        worst[sp] = (bucket, gib)
    return Stage(name, cfg.sized_for.gpu_memory_gib, worst)


def compose_stage(name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", f"parallel.precision={PRECISION}"])


def tables(build: Build, model, stages: list[Stage]) -> str:
    """The two tables `main` prints: model state and construction per rank, then activations and totals."""
    lines = [
        f"mmdit_11b (stage 1): {build.params / 1e9:.2f}B parameters, bf16 with fp32 master weights and EMA; "
        f"{GPUS_PER_NODE} GPUs per node; GiB per rank",
        "",
        f"{'GPUs':>5} {'construction':<17} {'shards':>6} {'model state':>12} {'build peak rank 0':>18} "
        f"{'build peak others':>18}",
    ]
    for gpus in GPUS:
        for construction in CONSTRUCTIONS:
            engine = construction.split()[0]
            state = model_state_bytes(build.params, engine, gpus) / GIB
            rank0, others = (b / GIB for b in construction_peak(build, construction, gpus))
            lines.append(
                f"{gpus:>5} {construction:<17} {shard_ranks(engine, gpus):>6} {state:>12.1f} {rank0:>18.1f} "
                f"{others:>18.1f}"
            )
    header = f"{'GPUs':>5} {'engine':<6} {'sp':>2} {'dp':>4}"
    for s in stages:
        budget = HEADROOM * s.gpu_memory_gib
        header += f" | {s.name} act {'total':>6} (<= {budget:.0f})"
    buckets = "; ".join(f"{s.name} {s.worst[1][0]}" for s in stages)
    lines += ["", f"activations at each stage's worst bucket ({buckets}) and the total per rank", header]
    for gpus in GPUS:
        for engine in ENGINES:
            for sp in SP_SIZES:
                fixed = sum(engine_bytes(parallel_config(engine, gpus, sp), model, gpus)) / GIB
                row = f"{gpus:>5} {engine:<6} {sp:>2} {gpus // sp:>4}"
                for s in stages:
                    act = s.worst[sp][1]
                    fits = " " if fixed + act <= HEADROOM * s.gpu_memory_gib else "!"
                    row += f" | {act:>{len(s.name) + 4}.1f} {fixed + act:>6.1f}{fits}{'':>8}"
                lines.append(row.rstrip())
    lines.append("! : over the stage's GPU (HEADROOM x sized_for.gpu_memory_gib)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    configs = {name: compose_stage(name) for name in STAGES}
    model = meta_model(configs["stage1"])
    stages = [stage(cfg, name) for name, cfg in configs.items()]
    print(tables(build_sizes(model), model, stages))


if __name__ == "__main__":
    main()
