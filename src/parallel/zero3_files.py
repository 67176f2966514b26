"""A DeepSpeed ZeRO-3 checkpoint for any number of ranks, written offline (`python -m src.convert --to zero3`).

DeepSpeed 0.19.8 reloads a ZeRO-3 checkpoint only on the number of ranks that wrote it: each rank reads back its
own `zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt`, whose flat fp32 shards are laid out for that world size.
This module lays the same training state out for another world size, file by file as `engine.save_checkpoint`
writes it (read from deepspeed/runtime/engine.py `_save_zero_checkpoint` / `_common_checkpoint_state` and
deepspeed/runtime/zero/stage3.py `_rigid_state_dict`), so that `DeepSpeedEngine.load` resumes it unchanged:

- the optimizer's param groups (Kiln's `ParamPlan.members`, every parameter ever trainable, in model order) are cut
  into sub-groups as stage3.py `_create_fp16_sub_groups` does: parameters added in order until the sum of their
  per-rank elements reaches `sub_group_size` (one sub-group when the group is smaller); parameters of no group
  (frozen in every phase) and zero-element ones stay out;
- each parameter is flattened, zero-padded to a multiple of the world size and split evenly: rank r holds
  elements [r * ceil(n / world), (r + 1) * ceil(n / world)); a rank's flat for a sub-group is its slices of the
  sub-group's parameters, concatenated: the fp32 master weights (`fp32_flat_groups`), AdamW's `exp_avg` and
  `exp_avg_sq` (with the sub-group's step count, a 0-dim fp32 tensor), and Kiln's EMA (`ema_rank_<r>.pt`);
- parameters outside the optimizer travel as each rank's slice in `frozen_param_fragments`, the module's
  persistent buffers whole in `module` (parameters there are empty placeholders, as ZeRO-3 saves them);
- rank r's loop state (Kiln's `client_state`: step, data position, RNG) is the source's rank r, or its rank 0 for
  a rank it did not have (the data position is global: every rank's is the same).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

# stage3.py's default `zero_optimization.sub_group_size` (deepspeed/runtime/zero/config.py: pp_int(1e9))
SUB_GROUP_SIZE = 1_000_000_000


@dataclass(frozen=True)
class SubGroup:
    """One ZeRO-3 sub-group: its optimizer param group and its parameters' full shapes, in flat order."""

    group: int
    shapes: OrderedDict[str, torch.Size]


def per_rank(numel: int, world: int) -> int:
    """Elements of one parameter on each rank (the last rank's slice ends in zero padding)."""
    return math.ceil(numel / world)


def sub_groups(
    groups: list[list[str]], shapes: dict[str, torch.Size], world: int, sub_group_size: int = SUB_GROUP_SIZE
) -> list[SubGroup]:
    """The sub-groups stage 3 builds on `world` ranks from optimizer `groups` (names) of parameters `shapes`."""
    subs = []
    for g, names in enumerate(groups):
        optimized = [n for n in names if shapes[n].numel() > 0]
        if sum(per_rank(shapes[n].numel(), world) for n in optimized) <= sub_group_size:
            subs += [SubGroup(g, OrderedDict((n, shapes[n]) for n in optimized))] if optimized else []
            continue
        current, size = OrderedDict(), 0
        for n in optimized:
            current[n] = shapes[n]
            size += per_rank(shapes[n].numel(), world)
            if size >= sub_group_size or n == optimized[-1]:
                subs.append(SubGroup(g, current))
                current, size = OrderedDict(), 0
    return subs


def rank_slice(tensor: torch.Tensor, rank: int, world: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 slice of a full tensor: flattened, zero-padded, its even share (a copy)."""
    flat = tensor.detach().reshape(-1)
    n = per_rank(flat.numel(), world)
    start, end = min(rank * n, flat.numel()), min((rank + 1) * n, flat.numel())
    return torch.cat([flat[start:end].to(dtype), torch.zeros(n - (end - start), dtype=dtype)])


def rank_flat(sub: SubGroup, full: dict[str, torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s fp32 flat of a sub-group from full tensors by name (weights, a moment or the EMA)."""
    return torch.cat([rank_slice(full[n], rank, world) for n in sub.shapes])


def sub_group_steps(subs: list[SubGroup], moments: dict[str, tuple]) -> list[int | None]:
    """Each sub-group's AdamW step count; None for one without moments (its group's were reset and it has not
    stepped since). A sub-group whose parameters disagree (some without moments, or other step counts) cannot be
    written: ZeRO-3 keeps one step count per sub-group."""
    steps = []
    for i, sub in enumerate(subs):
        found = {moments[n][2] if n in moments else None for n in sub.shapes}
        if len(found) != 1:
            raise ValueError(
                f"ZeRO-3 sub-group {i} (param group {sub.group}, {len(sub.shapes)} tensors) would hold AdamW step "
                f"counts {sorted(found, key=str)}: ZeRO-3 keeps one per sub-group, so this state has no ZeRO-3 form"
            )
        steps.append(found.pop())
    return steps


@dataclass
class Zero3Target:
    """What the ZeRO-3 files need beyond the training state: the model's parameter shapes and persistent buffers
    (names, in state_dict order), the DeepSpeed config the run will use and the optimizer's group settings."""

    world: int
    params: OrderedDict[str, torch.Size]  # every parameter, in model order
    buffers: list[str]  # persistent buffers, in state_dict order
    ds_config: dict  # src.parallel.deepspeed.ds_config of the run
    defaults: dict  # a param group's settings (betas, eps, fused, ...) but lr and params
    ds_version: str  # deepspeed.__version__, as engine.save_checkpoint records it

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype ZeRO-3 keeps module parameters in: bf16 under bf16 mixed precision (fp32 master weights in
        the optimizer), else fp32."""
        return torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32

    @property
    def sub_group_size(self) -> int:
        return int(self.ds_config["zero_optimization"].get("sub_group_size", SUB_GROUP_SIZE))


def write_zero3(state, folder: Path, target: Zero3Target) -> None:
    """Write `state` (a `src.convert.TrainingState`) into `folder` as `target.world` ZeRO-3 ranks would save it."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    world = target.world
    subs = sub_groups(state.groups, target.params, world, target.sub_group_size)
    steps = sub_group_steps(subs, state.moments)
    in_optimizer = {n for sub in subs for n in sub.shapes}
    outside = [n for n in target.params if n not in in_optimizer]
    exp_avg = {n: m for n, (m, _, _) in state.moments.items()}
    exp_avg_sq = {n: v for n, (_, v, _) in state.moments.items()}
    param_groups = [
        {**target.defaults, "lr": lr, "initial_lr": base, "params": [i for i, s in enumerate(subs) if s.group == g]}
        for g, (lr, base) in enumerate(zip(state.lrs, state.scheduler["base_lrs"], strict=True))
    ]
    placeholder = torch.empty(0, dtype=target.param_dtype)
    for rank in range(world):
        loop = state.loops[rank] if rank < len(state.loops) else state.loops[0]
        model_states = {
            "module": OrderedDict(
                (k, state.weights[k].clone() if k in target.buffers else placeholder)
                for k in [*target.params, *target.buffers]
            ),
            "buffer_names": list(target.buffers),
            "optimizer": None,
            "param_shapes": [sub.shapes for sub in subs],
            "frozen_param_shapes": OrderedDict((n, target.params[n]) for n in outside),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(
                (n, rank_slice(state.weights[n], rank, world, target.param_dtype)) for n in outside
            ),
            "lr_scheduler": state.scheduler,
            "data_sampler": None,
            "random_ltd": None,
            "skipped_steps": 0,
            "global_steps": int(loop["step"]),
            "global_samples": int(loop["step"]) * world,  # DeepSpeed's count: its micro-batch of 1 per rank
            "dp_world_size": world,
            "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": target.ds_config,
            "ds_version": target.ds_version,
            **loop,
        }
        torch.save(model_states, folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        adam = {
            i: {
                "step": torch.tensor(float(step)),
                "exp_avg": rank_flat(sub, exp_avg, rank, world),
                "exp_avg_sq": rank_flat(sub, exp_avg_sq, rank, world),
            }
            for i, (sub, step) in enumerate(zip(subs, steps, strict=True))
            if step is not None
        }
        optim_states = {
            "optimizer_state_dict": {
                "zero_stage": ZeroStageEnum.weights,
                "loss_scaler": LossScaler(1.0),
                "dynamic_loss_scale": False,
                "overflow": False,
                "partition_count": world,
                "optimizer_state_dict": {"state": adam, "param_groups": param_groups},
                "fp32_flat_groups": [rank_flat(sub, state.weights, rank, world) for sub in subs],
            },
            "ds_config": target.ds_config,
            "ds_version": target.ds_version,
        }
        torch.save(optim_states, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if state.ema is not None:
            torch.save([rank_flat(sub, state.ema, rank, world) for sub in subs], folder / f"ema_rank_{rank:05d}.pt")
