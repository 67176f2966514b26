"""FSDP2 engine: `fully_shard` per double / single block and on the root, over a DeviceMesh of all ranks.

Every rank holds 1/N of each parameter (a DTensor sharded on dim 0), of its gradient, AdamW moments and EMA. In a
step each block's parameters are all-gathered just before its forward (and again before its backward), gradients
are reduce-scattered and averaged over all N ranks, as under ZeRO-3. With sequence parallelism (`sp_size` = S)
the ranks of a group compute the same loss, each parameter gradient is S times its share of the group's, and the
average over N = dp x S ranks is the data-parallel mean (docs/parallel.md).

Model transforms come first, in torchtitan's order: activation checkpointing -> per-block compile -> the Ulysses
hooks -> `fully_shard`. Same seed, same weights as the local engine (bitwise), on any number of ranks: rank 0
builds the model on the host with the run's seed; `src.train` builds it on the meta device on the other ranks
(`FSDP2Engine.construction`), which receive their slices of rank 0's weights one tensor at a time after sharding,
and rank 0's RNG state. Host peak: one fp32 model on rank 0, one tensor plus the slices elsewhere. A model built
in full on every rank (tests, tools) is sharded block by block, each block's host copy freed once it is sharded.
The device never holds more than one block in full (measured in docs/parallel.md).

Checkpoints (`RUN_DIR/checkpoints/step_N/`) are torch.distributed.checkpoint (DCP) folders that any world size
reads back, resharded: `.metadata` + one `__<rank>_0.distcp` per writing rank holding the flat keys
`model.<name>`, `ema.<name>` and `optim.<name>.{exp_avg,exp_avg_sq,step}`, plus `fsdp2.json` (scheduler state,
group LRs, the world it was written on) and `loop_rank_<r>.pt` (the loop's step, data position, RNG).
`Fsdp2Checkpoint` (the engine's `checkpoint_format`) reads them without a process group (sampling, export,
`init_from`, optimizer carry-over, `src.convert`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from src.parallel.construction import RankZeroConstruction
from src.parallel.engine import check_precision
from src.parallel.formats import CheckpointReader, TrainingState
from src.parallel.state import check_ema, init_moments, update_ema
from src.parallel.transforms import prepare_model
from src.rundir import latest_tag, refuse_unreadable
from src.safe_load import load_tensors

log = logging.getLogger(__name__)
MARKER = "fsdp2.json"  # written last by rank 0: a folder holding it is a complete FSDP2 checkpoint
MOMENTS = ("exp_avg", "exp_avg_sq")


def build_mesh(device_type: str, world: int, replicate: int = 1) -> DeviceMesh:
    """(replicate, shard) mesh of `world` ranks: FSDP shards over the `shard` ranks (consecutive: one node) and,
    with `replicate` > 1 (HSDP), keeps a replica per group of them, averaging gradients over all ranks."""
    if replicate < 1 or world % replicate:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"parallel.replicate={replicate} does not divide the world size {world} (valid: {valid})")
    if replicate == 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_sharded_grads(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the (sharded) gradients, and clip them to `max_norm` (0: no clipping).

    Each rank takes the norm of its slices; the DTensor result is a partial sum that `full_tensor()` all-reduces."""
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norm = _full(torch.nn.utils.get_total_norm(grads, 2.0))
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _built_on_meta(model: nn.Module) -> bool:
    """Whether some rank built the model on the meta device (`RankZeroConstruction`); rank 0 must not have."""
    meta = float(any(p.is_meta for p in model.parameters()))
    flags = torch.tensor([meta, meta if dist.get_rank() == 0 else 0.0])  # (any rank, rank 0)
    dist.all_reduce(flags)  # a host tensor: gloo carries it on every backend setting
    if flags[1]:
        raise ValueError("rank 0 built the model on the meta device: it must hold the seeded weights to share them")
    return bool(flags[0])


@torch.no_grad()
def _scatter_from_rank0(model: nn.Module, seeded: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give every rank its slices of rank 0's seeded weights, one tensor at a time (rank 0 frees each as it goes),
    and rank 0's RNG state: the other ranks built on the meta device, which draws no random numbers."""
    rank = dist.get_rank()
    if rank:
        model.to_empty(device=device)  # uninitialised slices, overwritten below
    for name, value in model.state_dict().items():
        full = seeded[name].to(device) if rank == 0 else torch.empty(value.shape, dtype=value.dtype, device=device)
        dist.broadcast(full, src=0)  # (*shape): the whole tensor, once
        if isinstance(value, DTensor):
            full = distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None)
        _local(value).copy_(_local(full))
        if rank == 0:
            seeded.pop(name).untyped_storage().resize_(0)
    rng = torch.get_rng_state()
    dist.broadcast(rng, src=0)
    torch.set_rng_state(rng)


class FSDP2Engine:
    """Sharded training of `model` with torch's FSDP2; same contract as `LocalEngine` and `DeepSpeedEngine`.

    Args:
        model: the unsharded model, built on the host with the run's seed.
        optimizer: `param groups -> Optimizer` (Hydra partial of torch.optim.AdamW). It sees the sharded parameters.
        scheduler: `optimizer -> LRScheduler`, stepped once per optimizer step.
        precision: "fp32", or "bf16" (bf16 parameters in forward and backward, gradients reduced in fp32, fp32
            master weights and AdamW states).
        grad_clip: global gradient-norm clip over the sharded gradients (0 disables).
        checkpoint_double / checkpoint_single: activation checkpointing of the first N / M blocks (-1: all).
        compile: torch.compile each block before sharding (FSDP's hooks stay outside the compiled graphs).
        sp_size: ranks per Ulysses sequence-parallel group; FSDP shards over all ranks.
        replicate: HSDP: replicas of the model (e.g. one per node); the ranks of each replica shard it.
        reshard_after_forward: free each block's gathered weights after its forward (None: torch's default,
            True for blocks, False for the root); False keeps them until backward (more memory, fewer all-gathers).
    """

    @classmethod
    def construction(cls, **_) -> RankZeroConstruction:
        """`src.train` builds the model on the meta device on ranks > 0 (`src.parallel.construction`)."""
        return RankZeroConstruction()

    @staticmethod
    def planned_bytes(par, n_params: int, block: int, gpus: int, ema_bytes: float) -> tuple[float, float, float]:
        """src.parallel.plan: every state sharded over the ranks of a replica; two blocks gathered (the one computed
        and the one prefetched) in the compute dtype, and their gradients reduced in fp32."""
        from src.parallel.plan import DTYPE_BYTES, state_bytes_per_param

        shards = gpus // par.get("replicate", 1)
        states = n_params * (state_bytes_per_param(par.precision, 3, shards) + ema_bytes / shards)
        return states, 2 * block * DTYPE_BYTES[par.precision], 2 * block * DTYPE_BYTES["fp32"]

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable,
        device: torch.device,
        precision: str = "bf16",
        grad_clip: float = 1.0,
        checkpoint_double: int = 0,
        checkpoint_single: int = 0,
        param_groups: list[dict] | None = None,
        compile: bool = False,
        sp_size: int = 1,
        replicate: int = 1,
        reshard_after_forward: bool | None = None,
    ):
        check_precision(precision)
        if not dist.is_initialized():
            raise ValueError("the FSDP2 engine needs a process group: start it through src.train (or torchrun)")
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        names = {p: n for n, p in model.named_parameters()}
        by_name = [{**g, "params": [names[p] for p in g["params"]]} for g in groups]  # fully_shard replaces them

        self.sequence_parallel = prepare_model(model, checkpoint_double, checkpoint_single, compile, sp_size)
        self.mesh = build_mesh(device.type, dist.get_world_size(), replicate)
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        policy = bf16 if precision == "bf16" else MixedPrecisionPolicy()
        from_rank0 = _built_on_meta(model)  # then rank 0 alone holds the seeded weights
        seeded = dict(model.state_dict()) if from_rank0 and dist.get_rank() == 0 else {}
        for module in [*model.double_blocks, *model.single_blocks, model]:  # the root last: embedders, final layer
            full = [p for p in module.parameters() if not isinstance(p, DTensor)]
            reshard = None if module is model else reshard_after_forward
            fully_shard(module, mesh=self.mesh, mp_policy=policy, reshard_after_forward=reshard)
            for p in full if not from_rank0 else ():  # copied into this rank's slices: free the host copy at once
                p.untyped_storage().resize_(0)
        if from_rank0:
            _scatter_from_rank0(model, seeded, device)

        self.module = model
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.sp_size = sp_size
        self.params = dict(model.named_parameters())  # name -> sharded DTensor parameter
        self.optimizer = optimizer([{**g, "params": [self.params[n] for n in g["params"]]} for g in by_name])
        self.scheduler = scheduler(self.optimizer)
        self._names = {p: n for n, p in self.params.items()}
        self.ema: dict[str, DTensor] | None = None  # name -> fp32 average, sharded like the parameter

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, optimizer step, schedule step; returns the global gradient norm before clipping. A non-finite
        norm (the same on every rank: it is all-reduced) applies nothing, as the other engines do."""
        norm = clip_sharded_grads([p for p in self.module.parameters() if p.grad is not None], self.grad_clip)
        if torch.isfinite(norm):  # a host sync, once per step
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def count_nonfinite(self) -> int:
        """Non-finite elements in this rank's slices of the weights (sum over ranks for the whole model)."""
        return sum(int((~torch.isfinite(_local(p))).sum()) for p in self.module.parameters())

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    # -- EMA and optimizer state --------------------------------------------------------------------------

    def _trainable(self) -> dict[str, nn.Parameter]:
        """The parameters the optimizer holds (ever trainable), by name."""
        return {self._names[p]: p for g in self.optimizer.param_groups for p in g["params"]}

    def init_ema(self) -> None:
        """Start the EMA at the current weights: each rank keeps an fp32 copy of its own slices."""
        self.ema = {n: p.detach().float().clone() for n, p in self._trainable().items()}

    def update_ema(self, decay: float) -> None:
        current = self._trainable()
        update_ema([_local(e) for e in self.ema.values()], [_local(current[n]) for n in self.ema], decay)

    def reset_optimizer_state(self, groups: Sequence[int]) -> None:
        """Forget the moments of `groups`: AdamW starts them afresh (step 0) at their next update."""
        for g in groups:
            for p in self.optimizer.param_groups[g]["params"]:
                self.optimizer.state.pop(p, None)

    def load_moments(self, moments: Iterable[tuple[str, torch.Tensor, torch.Tensor]], steps: dict[int, int]) -> None:
        """Write carried-over AdamW moments (name, full exp_avg, full exp_avg_sq): each rank keeps its slices."""
        for g, step in steps.items():
            init_moments(self.optimizer, self.optimizer.param_groups[g]["params"], step)
        for name, exp_avg, exp_avg_sq in moments:
            param, state = self.params[name], self.optimizer.state[self.params[name]]
            for key, full in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                mine = distribute_tensor(
                    full.view(param.shape).float(), param.device_mesh, param.placements, src_data_rank=None
                )
                _local(state[key]).copy_(mine.to_local())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """All parameters gathered from their shards, on CPU, on every rank (a collective: every rank calls it)."""
        return {k: _full(v).detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _sharded_state(self) -> dict[str, torch.Tensor]:
        """The flat DCP state: weights, EMA, and the AdamW state of every parameter that has one (DTensors)."""
        state = {f"model.{k}": v for k, v in self.module.state_dict().items()}
        state |= {f"ema.{k}": v for k, v in (self.ema or {}).items()}
        for param, s in self.optimizer.state.items():
            name = self._names[param]
            state |= {f"optim.{name}.{key}": s[key] for key in (*MOMENTS, "step")}
        return state

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        """Every rank writes its slices (DCP) and its loop state; rank 0 then writes fsdp2.json. Files only:
        `src.integrity.save_checkpoint` seals the folder and moves `latest`."""
        out = Path(ckpt_dir) / tag
        rank = dist.get_rank()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / MARKER).unlink(missing_ok=True)  # an overwritten tag is incomplete until the marker returns
        dist.barrier()
        dcp.save(self._sharded_state(), storage_writer=FileSystemWriter(out, overwrite=True))
        torch.save(state, out / f"loop_rank_{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            record = {
                "engine": "fsdp2",
                "world_size": dist.get_world_size(),
                "sp_size": self.sp_size,
                "ema": self.ema is not None,
                "lrs": [g["lr"] for g in self.optimizer.param_groups],
                "groups": [[self._names[p] for p in g["params"]] for g in self.optimizer.param_groups],
                "scheduler": self.scheduler.state_dict(),
            }
            (out / (MARKER + ".tmp")).write_text(json.dumps(record, indent=1))
            (out / (MARKER + ".tmp")).replace(out / MARKER)
        dist.barrier()

    def load(self, ckpt_dir: Path) -> dict | None:
        """Load the checkpoint named by `ckpt_dir/latest` (written on any number of ranks); None if there is none.

        The loop state is this rank's if the writing run had it, else rank 0's: its data position is global, and
        the loop draws noise and timesteps from (seed, sample index), not from the saved RNG."""
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        folder = Path(ckpt_dir) / tag
        if not (folder / MARKER).is_file():
            found = sorted(p.name for p in folder.iterdir())[:8]
            raise ValueError(f"checkpoint {folder} has no {MARKER} (written by another engine? it holds {found})")
        try:
            record = json.loads((folder / MARKER).read_text())
            saved = set(FileSystemReader(folder).read_metadata().state_dict_metadata)
            self._create_saved_moments(saved)
            target = self._sharded_state()
            if self.ema is not None and not record["ema"]:
                self.ema = check_ema(None, self.ema, folder)  # warns: the EMA restarts from the loaded weights
                target = {k: v for k, v in target.items() if not k.startswith("ema.")}
            dcp.load(target, checkpoint_id=folder)  # in place into this rank's slices, resharded as needed
            self.scheduler.load_state_dict(record["scheduler"])
            for group, lr in zip(self.optimizer.param_groups, record["lrs"], strict=True):
                group["lr"] = lr
            mine = folder / f"loop_rank_{dist.get_rank():05d}.pt"
            loop = load_tensors(mine if mine.is_file() else folder / "loop_rank_00000.pt")  # weights_only
        except Exception as err:
            raise refuse_unreadable(ckpt_dir, tag, err) from err
        if record["world_size"] != dist.get_world_size() or record["sp_size"] != self.sp_size:
            log.info(
                "resharded %s: written on %d ranks (sp_size %d), read on %d (sp_size %d)",
                folder,
                record["world_size"],
                record["sp_size"],
                dist.get_world_size(),
                self.sp_size,
            )
        return loop

    def _create_saved_moments(self, saved: set[str]) -> None:
        """AdamW state exactly for the parameters the checkpoint has it for (others: none, as when it was saved)."""
        self.optimizer.state.clear()
        for g in self.optimizer.param_groups:
            has = [p for p in g["params"] if f"optim.{self._names[p]}.step" in saved]
            init_moments(self.optimizer, has, 0)


# -- reading a checkpoint without a process group: sampling, export, init_from, optimizer carry-over -------------


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def read_tensors(folder: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Full (consolidated) tensors of `keys` from an FSDP2 checkpoint folder, read in this process alone."""
    reader = FileSystemReader(folder)
    meta = reader.read_metadata().state_dict_metadata
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"{folder} holds no {missing[:5]} ({len(missing)} keys missing)")
    out = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def model_shapes(folder: Path) -> dict[str, torch.Size]:
    """The full shape of every model weight of an FSDP2 checkpoint folder, from its metadata alone."""
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): meta[k].size for k in _prefixed(meta, "model.")}


def _prefixed(keys: Iterable[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]


class Fsdp2Moments:
    """AdamW moments of an FSDP2 checkpoint per parameter name (`src.parallel.formats.MomentsReader`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        keys = FileSystemReader(self.folder).read_metadata().state_dict_metadata
        steps = [k for k in keys if k.startswith("optim.") and k.endswith(".step")]
        read = read_tensors(self.folder, steps)
        self.steps = {k.removeprefix("optim.").removesuffix(".step"): int(v) for k, v in read.items()}

    def select(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name in names:
            pair = read_tensors(self.folder, [f"optim.{name}.{key}" for key in MOMENTS])
            yield name, *pair.values()


class Fsdp2Checkpoint(CheckpointReader):
    """An FSDP2 checkpoint folder, read in this process whatever the world size that wrote it (layout: the module
    docstring). Complete once `fsdp2.json` is there."""

    name = "fsdp2"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.record = json.loads((self.folder / MARKER).read_text())
        self.keys = list(FileSystemReader(self.folder).read_metadata().state_dict_metadata)

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return is_checkpoint(folder)

    @property
    def world_size(self) -> int:
        return self.record["world_size"]

    def _read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, full, by its name without the prefix."""
        read = read_tensors(self.folder, _prefixed(self.keys, prefix))
        return {k.removeprefix(prefix): v for k, v in read.items()}

    def model_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in self._read("model.").items()}

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        return self._read("ema.") or None

    def weight_reader(self) -> tuple[dict[str, torch.Size], Callable[[str], torch.Tensor]]:
        return model_shapes(self.folder), lambda key: read_tensors(self.folder, [f"model.{key}"])[f"model.{key}"]

    def moments(self) -> Fsdp2Moments:
        return Fsdp2Moments(self.folder)

    def training_state(self) -> TrainingState:
        record = self.record
        ema = None
        if record["ema"]:
            averaged = self.ema_weights()
            ema = {n: averaged[n] for g in record["groups"] for n in g}  # the trained parameters, in group order
        moments = self.moments()
        return TrainingState(
            engine=self.name,
            weights=self.model_weights(),
            ema=ema,
            groups=record["groups"],
            lrs=record["lrs"],
            moments={n: (m, v, moments.steps[n]) for n, m, v in moments.select(moments.steps)},
            scheduler=record["scheduler"],
            loops=[load_tensors(f) for f in sorted(self.folder.glob("loop_rank_*.pt"))],
        )


FSDP2Engine.checkpoint_format = Fsdp2Checkpoint  # the reader is defined after the engine class, beside its helpers
