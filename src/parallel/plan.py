"""Will a config's training step fit its GPUs? `python -m src.parallel.plan stage1 dcae` prints the memory plan.

For every bucket of the config, one rank's peak is planned as the sum of
- model states: parameters, gradients and optimizer states (fp32 master + AdamW moments), the sharded ones divided
  over `sized_for.gpus` ranks (ZeRO stage 1-3, FSDP2; `parallel=local` shards nothing), and the fp32 EMA (unless
  `ema: null`), sharded like the weights,
- the parameters held gathered at once: ZeRO-3's `stage3_max_live_parameters` (DeepSpeed's default 1e9), FSDP2's
  two blocks, in the compute dtype,
- the gradient reduction buffers: ZeRO's two `reduce_bucket_size` buckets (default 5e8 elements, in
  `parallel.reduce_dtype`: the bucket and the reduce-scatter's buffers), FSDP2's two blocks in fp32,
- the activations the step saves for backward at the bucket's batch and token count, with the config's activation
  checkpointing and sequence parallelism, counted by `src.parallel.activations` on the meta device,
and must stay within HEADROOM of `sized_for.gpu_memory_gib`: the rest is the CUDA context, allocator
fragmentation and kernel workspaces, which the plan does not count. The counts are upper bounds of what the
config asks for, not measurements; peak_mem_gb in metrics.jsonl is the measured figure. `python -m
src.parallel.layouts` plans the 11B this way across cluster sizes, engines and sp_size.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from src.cli import HelpFormatter
from src.parallel.activations import ROOT, rank_activations

GIB = 2**30
HEADROOM = 0.9  # of a GPU's memory the plan may fill
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
EMA_BYTES = 4  # Kiln's EMA of the weights: fp32, sharded as the parameters are


@dataclass(frozen=True)
class BucketPlan:
    """One bucket's step on one rank."""

    bucket: str
    batch: int
    tokens: int  # per sample: video + text
    activations_gib: float
    total_gib: float


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's memory for every bucket of a config, against one GPU's memory."""

    gpus: int
    gpu_memory_gib: float
    model_states_gib: float
    gathered_gib: float
    buffers_gib: float
    buckets: list[BucketPlan]

    @property
    def worst(self) -> BucketPlan:
        return max(self.buckets, key=lambda b: b.total_gib)

    @property
    def budget_gib(self) -> float:
        return HEADROOM * self.gpu_memory_gib

    def fits(self) -> bool:
        return self.worst.total_gib <= self.budget_gib

    def table(self) -> str:
        lines = [
            f"{self.gpus} GPUs of {self.gpu_memory_gib:g} GiB (plan budget {self.budget_gib:.1f} GiB): model states "
            f"{self.model_states_gib:.1f}, gathered weights {self.gathered_gib:.1f}, reduce buckets "
            f"{self.buffers_gib:.1f} GiB per rank",
            f"{'bucket':<28} {'batch':>5} {'tokens':>7} {'activations GiB':>16} {'total GiB':>10}",
        ]
        for b in sorted(self.buckets, key=lambda b: -b.total_gib):
            lines.append(f"{b.bucket:<28} {b.batch:>5} {b.tokens:>7} {b.activations_gib:>16.1f} {b.total_gib:>10.1f}")
        return "\n".join(lines)


def state_bytes_per_param(precision: str, zero_stage: int, ranks: int) -> float:
    """Bytes of parameters, gradients and optimizer states one rank holds per parameter. bf16: 2 + 2 + (4 master
    + 8 AdamW); fp32: 4 + 4 + 8. ZeRO stage >= 1 shards the optimizer states, >= 2 the gradients, 3 the
    parameters over `ranks`; stage 0 (the local engine) shards nothing."""
    if precision not in DTYPE_BYTES:
        raise ValueError(f"parallel.precision={precision!r} is not one of {tuple(DTYPE_BYTES)}")
    param = grad = DTYPE_BYTES[precision]
    optim = 12 if precision == "bf16" else 8
    shards = [ranks if zero_stage >= stage else 1 for stage in (3, 2, 1)]
    return sum(b / n for b, n in zip((param, grad, optim), shards, strict=True))


@functools.lru_cache(maxsize=4)
def _meta_model(model_yaml: str, precision: str) -> torch.nn.Module:
    """The model on the meta device (no memory), by its config's YAML: several plans of one model build it once."""
    with torch.device("meta"):
        model = instantiate(OmegaConf.create(model_yaml))
    return model.to(torch.bfloat16 if precision == "bf16" else torch.float32)


@functools.lru_cache(maxsize=4)
def _meta_vae(vae_yaml: str):
    """The VAE on the meta device with random weights: only its latent shapes are asked."""
    cfg = OmegaConf.create(vae_yaml)
    with torch.device("meta"):
        return instantiate(cfg, **({"random_init": True} if "random_init" in cfg else {}))


def engine_bytes(par: DictConfig, model: torch.nn.Module, gpus: int, ema: bool = True) -> tuple[float, float, float]:
    """(model states, gathered weights, communication buffers) in bytes on one rank for the configured engine; the
    model states with the EMA when `ema`. The engine class states its own (`planned_bytes`): how it shards the
    states, what it holds gathered and which buffers it reduces in."""
    engine = get_class(par._target_)
    if not hasattr(engine, "planned_bytes"):
        raise ValueError(f"no memory plan for parallel._target_={par._target_!r}: its class defines no planned_bytes")
    n_params = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in [*model.double_blocks, *model.single_blocks])
    return engine.planned_bytes(par, n_params, block, gpus, EMA_BYTES if ema else 0.0)


def memory_plan(cfg: DictConfig, gpus: int | None = None, gpu_memory_gib: float | None = None) -> MemoryPlan:
    """The plan of a composed training config on `sized_for` (or the given) GPUs."""
    gpus = gpus or cfg.sized_for.gpus
    memory = gpu_memory_gib or cfg.sized_for.gpu_memory_gib
    if not gpus or not memory:
        raise ValueError(f"no GPUs to plan for: sized_for is {dict(cfg.sized_for)} (a CPU config?)")
    par = cfg.parallel
    model = meta_model(cfg)
    states, gathered, buffers = engine_bytes(par, model, gpus, ema=cfg.get("ema") is not None)
    fixed = states + gathered + buffers
    plans = [
        BucketPlan(name, batch, tokens, gib, fixed / GIB + gib)
        for name, batch, tokens, gib in bucket_activations(cfg, model, par.get("sp_size", 1))
    ]
    return MemoryPlan(gpus, memory, states / GIB, gathered / GIB, buffers / GIB, plans)


def meta_model(cfg: DictConfig) -> torch.nn.Module:
    """A composed config's model on the meta device, in its compute dtype."""
    return _meta_model(OmegaConf.to_yaml(cfg.model, resolve=True), cfg.parallel.precision)


def bucket_activations(cfg: DictConfig, model: torch.nn.Module, sp: int) -> list[tuple[str, int, int, float]]:
    """(bucket, batch, tokens per sample, GiB of activations on one rank) for every bucket of a composed config,
    with its activation checkpointing, in a sequence-parallel group of `sp` ranks."""
    vae, buckets = _meta_vae(OmegaConf.to_yaml(cfg.vae, resolve=True)), instantiate(cfg.data.buckets)
    text = cfg.text.max_length
    checkpointing = (cfg.parallel.checkpoint_double, cfg.parallel.checkpoint_single)
    counted: dict[tuple[int, int], float] = {}  # (video tokens, batch) -> GiB: aspect buckets often share a count
    rows = []
    for bucket in buckets.all_buckets():
        video = math.prod(model.token_grid(vae.latent_shape(bucket.num_frames, bucket.height, bucket.width)))
        key = (video, bucket.batch_size)
        if key not in counted:
            counted[key] = rank_activations(model, video, text, sp, bucket.batch_size).gb(*checkpointing)
        rows.append((bucket.name, bucket.batch_size, video + text, counted[key]))
    return rows


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", help="conf/experiment names")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override (repeatable)")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in args.experiments:
            plan = memory_plan(compose("train", overrides=[f"+experiment={name}", *args.override]))
            verdict = "fits" if plan.fits() else "DOES NOT FIT"
            print(f"== {name}: {verdict}, worst bucket {plan.worst.bucket} at {plan.worst.total_gib:.1f} GiB")
            print(plan.table())


if __name__ == "__main__":
    main()
