"""DeepSpeed ZeRO engine (stage 3 by default): parameters, gradients and optimizer states sharded over ranks."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from src.parallel.construction import Construction
from src.parallel.engine import check_precision
from src.parallel.formats import CheckpointReader, TrainingState
from src.parallel.state import check_ema, init_moments, update_ema
from src.parallel.transforms import prepare_model
from src.rundir import latest_tag, refuse_unreadable
from src.safe_load import load_tensors, refuse_unsafe_pickles

log = logging.getLogger(__name__)


def _import_deepspeed():
    """Import DeepSpeed, pointing it at the CPU accelerator when there is no GPU (gloo tests, the CPU demo)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _skip_unused_shm_op()
    return deepspeed


def _skip_unused_shm_op() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op where it would not use it.

    On the CPU accelerator, DeepSpeed's communication backend JIT-builds `deepspeed_shm_comm` in every process it
    starts (`deepspeed.comm.torch.build_shm_op`), holding a file lock in TORCH_EXTENSIONS_DIR meanwhile: 45 s of
    compiling on a new machine or venv, a ninja check on every later start. A process killed while it holds the
    lock (a timeout, torchrun's SIGTERM to the peers of a failed rank) leaves the lock file behind, and every later
    DeepSpeed start waits for it without end, printing nothing (docs/design.md, "Ending a rank"). The op is used
    only when LOCAL_SIZE (set by DeepSpeed's own launcher, not by torchrun or srun) equals the world size, and
    then only by `inference_all_reduce`, which training never calls: without LOCAL_SIZE it is not built."""
    if os.environ.get("LOCAL_SIZE"):
        return
    import importlib

    backend = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None  # TorchBackend then falls back to torch.distributed, as without the op


REDUCE_DTYPES = ("fp32", "bf16")


def ds_config(
    zero_stage: int, precision: str, grad_clip: float, zero_options: dict | None = None, reduce_dtype: str = "fp32"
) -> dict:
    """The DeepSpeed config of a Kiln run. Gradients are reduced in `reduce_dtype`: fp32 by default, as the local
    engine and FSDP2's `reduce_dtype` do (DeepSpeed's own default under bf16 is to reduce the bf16 gradients,
    which rounds each rank's contribution and their sum to 8 bits of mantissa)."""
    if reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(f"parallel.reduce_dtype={reduce_dtype!r} is not one of {REDUCE_DTYPES}")
    return {
        "train_micro_batch_size_per_gpu": 1,  # the loop batches; DeepSpeed only needs a consistent value
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "stage3_gather_16bit_weights_on_model_save": False,
            **(zero_options or {}),
        },
        "bf16": {"enabled": precision == "bf16"},
        "communication_data_type": reduce_dtype,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _zero_init(config: dict) -> contextlib.AbstractContextManager:
    """`deepspeed.zero.Init` building each module exactly as on the host, then partitioning it.

    DeepSpeed's own Init makes every tensor on the accelerator in the training dtype before the module's
    initialisers run, so they would draw other random numbers (the device's generator, in bf16) than the local
    engine's host build. Here the constructors are left alone (`tensor_overrides=[]`): each module draws its fp32
    weights from the host generator in construction order, as a plain build does, and its parameters are cast to
    the training dtype (as `deepspeed.initialize` casts a model built outside Init), moved to the device, broadcast
    from rank 0 and partitioned when its `__init__` returns. `memory_efficient_linear` is off: DeepSpeed would
    otherwise replace `torch.nn.functional.linear` for the whole process."""
    deepspeed = _import_deepspeed()
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    class HostSeededInit(deepspeed.zero.Init):
        def _post_init_method(self, module: nn.Module) -> None:
            for param in module.parameters(recurse=False):
                if not is_zero_param(param):
                    param.data = param.data.to(self.dtype)
            super()._post_init_method(module)

    zero = {**config["zero_optimization"], "memory_efficient_linear": False}
    return HostSeededInit(config_dict_or_path={**config, "zero_optimization": zero}, tensor_overrides=[])


class Zero3Construction(Construction):
    """ZeRO-3: the model is built under `_zero_init`, so a rank holds its partition plus one module's full
    parameters at most; `write` gathers one parameter at a time, rank 0 copies the tensor it alone reads, and
    DeepSpeed broadcasts and re-partitions it (`GatheredParameters(modifier_rank=0)`)."""

    def __init__(self, config: dict):
        self.config = config

    def build(self) -> contextlib.AbstractContextManager:
        return _zero_init(self.config)

    def shapes(self, model: nn.Module) -> dict[str, torch.Size]:
        return {name: getattr(tensor, "ds_shape", tensor.shape) for name, tensor in _entries(model).items()}

    def write(self, model: nn.Module, values: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        deepspeed = _import_deepspeed()
        rank = torch.distributed.get_rank()
        entries = _entries(model)
        for name, read in values.items():
            tensor = entries[name]
            if isinstance(tensor, nn.Parameter):
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                    if rank == 0:
                        tensor.data.copy_(read())  # (*ds_shape), in the partition's dtype
            else:  # a buffer: every rank holds it whole
                if rank == 0:
                    tensor.copy_(read())
                torch.distributed.broadcast(tensor, src=0)


def _entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters (ZeRO-3's, with their partition attributes) and buffers of `model`, by state-dict name."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


def check_zero_world(folder: Path, world: int) -> None:
    """Refuse a ZeRO checkpoint written by another number of ranks: DeepSpeed cannot re-partition its shards. The
    message names the command that lays it out for this number of ranks (`python -m src.convert --to zero3`), and
    the one that converts it to FSDP2, which resumes on any number of ranks."""
    saved = len(list(folder.glob("*zero_pp_rank_*_optim_states.pt")))
    if saved and saved != world:
        run_dir, tag = folder.parent.parent, folder.name
        out = f"{run_dir}-{world}ranks"
        raise ValueError(
            f"checkpoint {folder} holds the ZeRO optimizer shards of {saved} ranks, and this run has {world}: "
            f"DeepSpeed cannot re-partition them. Lay it out for {world} ranks, with the same weights, EMA, AdamW "
            f"moments and step counts, LR schedule and data position: `python -m src.convert {run_dir} {out} "
            f"--to zero3 --world {world} --tag {tag}`, then run this command with hydra.run.dir={out} (to keep the "
            f"global batch, scale data.buckets.batch_scale by the data-parallel ranks before / after: {saved} / "
            f"{world} without sequence parallelism). Or resume on {saved} ranks (torchrun --nproc_per_node={saved}, "
            f"or that many nodes x GPUs), or move to FSDP2, which resumes on any number of ranks: `python -m "
            f"src.convert {run_dir} {run_dir}-fsdp2 --to fsdp2 --tag {tag}`, then parallel=fsdp2 "
            f"hydra.run.dir={run_dir}-fsdp2."
        )


# What DeepSpeed itself writes into each rank's *_model_states.pt; the rest is Kiln's loop state (client_state)
DEEPSPEED_KEYS = frozenset(
    {
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "universal_checkpoint_info",
        "ds_config",
        "ds_version",
    }
)


def zero3_ranked(folder: Path, pattern: str) -> list[Path]:
    """The files of a ZeRO checkpoint folder matching `pattern` (e.g. `*_optim_states.pt`), in rank order."""
    files = list(folder.glob(pattern))
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1]))


def _zero3_layout(folder: Path, world: int) -> dict[str, tuple[int, int, int, torch.Size]]:
    """Where each trainable parameter sits in a ZeRO-3 checkpoint's per-rank fp32 flats:
    name -> (sub-group, offset in each rank's flat, elements per rank, full shape)."""
    shapes = load_tensors(zero3_ranked(folder, "*_model_states.pt")[0])
    where = {}
    for sub, group in enumerate(shapes["param_shapes"]):
        offset = 0
        for name, shape in group.items():
            per_rank = math.ceil(shape.numel() / world)
            where[name] = (sub, offset, per_rank, shape)
            offset += per_rank
    return where


def _gather(where: tuple, per_rank_flats: list) -> torch.Tensor:
    """One parameter's full tensor from every rank's shard of it (each rank's flats by sub-group index)."""
    sub, offset, per_rank, shape = where
    parts = [flats[sub].narrow(0, offset, per_rank) for flats in per_rank_flats]
    return torch.cat(parts)[: shape.numel()].view(shape).float()


def zero3_ema(folder: Path) -> dict[str, torch.Tensor] | None:
    """The consolidated fp32 EMA of a ZeRO-3 checkpoint folder (written by `DeepSpeedEngine.save`); None when the
    run kept none."""
    files = sorted(folder.glob("ema_rank_*.pt"))
    if not files:
        return None
    ranks = [load_tensors(f, mmap=True) for f in files]
    return {name: _gather(w, ranks) for name, w in _zero3_layout(folder, len(files)).items()}


class Zero3Moments:
    """AdamW state of a ZeRO-3 checkpoint folder per parameter name, gathered from every rank's memory-mapped
    flat shards one parameter at a time. A parameter whose sub-group holds no state (its group's moments were reset
    by a freeze schedule and it has not stepped since) has none: it is left out of `steps`.

    Also the optimizer's param groups as saved (`param_groups`: lr, betas, ..., `params` = sub-group indices) and
    the parameter names of each sub-group (`sub_groups`)."""

    def __init__(self, folder: Path):
        files = zero3_ranked(Path(folder), "*_optim_states.pt")
        if not files:
            raise ValueError(f"{folder} holds no DeepSpeed *_optim_states.pt files")
        blobs = [load_tensors(f, mmap=True)["optimizer_state_dict"] for f in files]
        if blobs[0]["zero_stage"] != 3:
            raise ValueError(
                f"{folder}: reading optimizer state is implemented for ZeRO-3, not stage {blobs[0]['zero_stage']}"
            )
        self.param_groups = blobs[0]["optimizer_state_dict"]["param_groups"]
        ranks = [b["optimizer_state_dict"]["state"] for b in blobs]  # per rank: sub-group -> AdamW state
        layout = _zero3_layout(Path(folder), len(files))
        subs = range(1 + max(w[0] for w in layout.values()))
        self.sub_groups = [[n for n, w in layout.items() if w[0] == sub] for sub in subs]  # sub-group -> names
        self._where = {n: w for n, w in layout.items() if w[0] in ranks[0]}
        self.steps = {n: int(ranks[0][w[0]]["step"]) for n, w in self._where.items()}
        self._flats = {key: [{sub: s[key] for sub, s in r.items()} for r in ranks] for key in ("exp_avg", "exp_avg_sq")}

    def select(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name in names:
            where = self._where[name]
            yield name, _gather(where, self._flats["exp_avg"]), _gather(where, self._flats["exp_avg_sq"])


class ZeroCheckpoint(CheckpointReader):
    """A DeepSpeed checkpoint folder: each rank's `*_model_states.pt` (module, param shapes, LR schedule, Kiln's
    loop state as client_state) and `*_optim_states.pt` (its fp32 master flats and AdamW state), and Kiln's
    `ema_rank_N.pt` (each rank's EMA flats). Read memory-mapped; DeepSpeed's own consolidation for the weights, which
    unpickles with weights_only=False, after `refuse_unsafe_pickles` has vetted every file."""

    name = "zero3"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return any(Path(folder).glob("*_model_states.pt"))  # zero_pp_rank_N_mp_rank_00_ (ZeRO-3), mp_rank_00_ (1/2)

    @property
    def world_size(self) -> int:
        return len(zero3_ranked(self.folder, "*zero_pp_rank_*_optim_states.pt"))

    def model_weights(self) -> dict[str, torch.Tensor]:
        _import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        refuse_unsafe_pickles(sorted(self.folder.glob("*.pt")))  # DeepSpeed loads them with weights_only=False
        state = get_fp32_state_dict_from_zero_checkpoint(str(self.folder.parent), tag=self.folder.name)
        return {k: v.float() for k, v in state.items()}

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        return zero3_ema(self.folder)

    def moments(self) -> Zero3Moments:
        return Zero3Moments(self.folder)

    def training_state(self) -> TrainingState:
        moments = self.moments()
        ranks = [load_tensors(f) for f in zero3_ranked(self.folder, "*_model_states.pt")]
        return TrainingState(
            engine=self.name,
            weights=self.model_weights(),
            ema=self.ema_weights(),
            groups=[[n for sub in g["params"] for n in moments.sub_groups[sub]] for g in moments.param_groups],
            lrs=[g["lr"] for g in moments.param_groups],
            moments={n: (m, v, moments.steps[n]) for n, m, v in moments.select(moments.steps)},
            scheduler=ranks[0]["lr_scheduler"],
            loops=[{k: v for k, v in r.items() if k not in DEEPSPEED_KEYS} for r in ranks],
        )


class DeepSpeedEngine:
    """ZeRO-sharded training of `model` with a client (PyTorch) optimizer and LR schedule.

    Args:
        model: the unsharded model, built on CPU.
        optimizer: `params -> Optimizer` (Hydra partial of e.g. torch.optim.AdamW).
        scheduler: `optimizer -> LRScheduler`, stepped once per optimizer step.
        zero_stage: 1, 2 or 3. precision: "bf16" (fp32 master weights in the optimizer) or "fp32".
        grad_clip: global gradient-norm clip (0 disables).
        checkpoint_double / checkpoint_single: activation checkpointing of the first N / M blocks.
        sp_size: ranks per sequence-parallel group (Ulysses, `src.parallel.ulysses`); ZeRO shards over all ranks.
        compile: DeepSpeed's `engine.compile()` (torch.compile of the module; graph breaks at ZeRO-3's hooks).
        zero_options: more `zero_optimization` keys for DeepSpeed (bucket sizes, persistence threshold, ...).
        reduce_dtype: "fp32" (default) or "bf16": the dtype gradients are reduced in (`ds_config`).
    """

    checkpoint_format = ZeroCheckpoint

    @classmethod
    def construction(
        cls,
        zero_stage: int = 3,
        precision: str = "bf16",
        grad_clip: float = 1.0,
        zero_options: dict | None = None,
        reduce_dtype: str = "fp32",
        **_,
    ) -> Construction:
        """How `src.train` builds the model for this engine (`src.parallel.construction`): partitioned module by
        module under ZeRO-3; whole on every rank under ZeRO-1/2, which keep every parameter on every rank."""
        if zero_stage != 3:
            return Construction()
        return Zero3Construction(ds_config(zero_stage, precision, grad_clip, zero_options, reduce_dtype))

    @staticmethod
    def planned_bytes(par, n_params: int, block: int, gpus: int, ema_bytes: float) -> tuple[float, float, float]:
        """src.parallel.plan: states sharded by ZeRO stage over every rank; stage 3 keeps up to
        `stage3_max_live_parameters` gathered; two reduce buckets of `reduce_bucket_size` elements in
        `reduce_dtype` (DeepSpeed's defaults: deepspeed/runtime/zero/config.py)."""
        from src.parallel.plan import DTYPE_BYTES, state_bytes_per_param

        stage, options = par.zero_stage, par.get("zero_options") or {}
        live = min(n_params, options.get("stage3_max_live_parameters", 1e9))
        bucket = options.get("reduce_bucket_size", 5e8)
        states = n_params * (state_bytes_per_param(par.precision, stage, gpus) + ema_bytes / gpus)
        gathered = live * DTYPE_BYTES[par.precision] if stage == 3 else 0.0
        return states, gathered, 2 * bucket * DTYPE_BYTES[par.get("reduce_dtype", "fp32")]

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable,
        device: torch.device,
        zero_stage: int = 3,
        precision: str = "bf16",
        grad_clip: float = 1.0,
        checkpoint_double: int = 0,
        checkpoint_single: int = 0,
        param_groups: list[dict] | None = None,
        compile: bool = False,
        sp_size: int = 1,
        zero_options: dict | None = None,
        reduce_dtype: str = "fp32",
    ):
        check_precision(precision)
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage}")
        deepspeed = _import_deepspeed()
        self._deepspeed = deepspeed
        # compile=False here: per-block torch.compile under ZeRO-3 is not shown to work (DeepSpeed's gather and
        # release hooks sit on every layer inside a block, the parameters are empty between them), so the whole
        # engine is compiled by DeepSpeed's own `engine.compile()` after `deepspeed.initialize`, below
        self.sequence_parallel = prepare_model(model, checkpoint_double, checkpoint_single, False, sp_size)
        config = ds_config(zero_stage, precision, grad_clip, zero_options, reduce_dtype)
        self.precision = precision
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1:
            log.warning(
                "ZeRO stage %d on one rank shards nothing but still gathers, releases and partitions every layer "
                "each step (half the speed of parallel=local on the CPU benchmark, docs/BENCHMARKS.md); on one "
                "device, parallel=local parallel.precision=%s trains the same model without it",
                zero_stage,
                precision,
            )
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(device),
            model_parameters=param_groups or [p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
        )
        self.module = self.ds.module
        if compile:  # DeepSpeed's own: it compiles around ZeRO-3's parameter hooks (see prepare_model above)
            self.ds.compile()
        self._inner = self.optimizer.optimizer  # the client torch optimizer; its "params" are fp32 flat shards
        self.ema: list[torch.Tensor] | None = None  # this rank's fp32 EMA, shaped like its fp32 master shards

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.ds(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> torch.Tensor | float:
        """Clip, optimizer step, schedule step; returns the global gradient norm before clipping. ZeRO refuses a
        non-finite norm itself ("OVERFLOW! Skipping step": no update, the schedule does not advance) and returns inf."""
        self.ds.step()
        return self.ds.get_global_grad_norm()

    def count_nonfinite(self) -> int:
        """Non-finite elements in this rank's fp32 master shards (sum over ranks for the whole model)."""
        return sum(int((~torch.isfinite(flat)).sum()) for _, flat in self._all_flats())

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        """Every rank writes its shard and its EMA shard; `state` (step, data position, RNG) is stored per rank.
        `latest` is left alone: `src.integrity.save_checkpoint` moves it once every rank's files are sealed."""
        if self.ema is not None:
            self._ema_file(ckpt_dir, tag).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.ema, self._ema_file(ckpt_dir, tag))
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)

    def load(self, ckpt_dir: Path) -> dict | None:
        """Load the checkpoint named by `ckpt_dir/latest`; None if there is none. Refuses a broken one."""
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        folder = Path(ckpt_dir) / tag
        check_zero_world(folder, self._deepspeed.comm.get_world_size())
        refuse_unsafe_pickles(sorted(folder.glob("*.pt")))  # DeepSpeed loads them with weights_only=False
        try:
            path, state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as err:
            raise refuse_unreadable(ckpt_dir, tag, err) from err
        if path is None:
            raise refuse_unreadable(ckpt_dir, tag, FileNotFoundError("DeepSpeed found no model states"))
        if self.ema is not None:
            self.ema = self._load_ema(ckpt_dir, tag)
        return state

    def _load_ema(self, ckpt_dir: Path, tag: str) -> list[torch.Tensor]:
        """This rank's saved EMA shard; the current weights (with a warning) when the run had no EMA at all."""
        file = self._ema_file(ckpt_dir, tag)
        if not file.is_file() and any(file.parent.glob("ema_rank_*.pt")):  # other ranks have theirs: one is lost
            raise refuse_unreadable(ckpt_dir, tag, FileNotFoundError(f"{file} is missing"))
        try:
            saved = load_tensors(file, map_location=self.ema[0].device) if file.is_file() else None
        except Exception as err:
            raise refuse_unreadable(ckpt_dir, tag, err) from err
        return check_ema(saved, self.ema, file)

    @property
    def param_groups(self) -> list[dict]:
        return self._inner.param_groups

    def _all_flats(self) -> list[tuple[int, torch.Tensor]]:
        """This rank's fp32 master shards with their param group, in the order checkpoints store them: the tensors
        the client optimizer keeps state for (ZeRO-3: a group may span several sub-groups)."""
        zero = self.optimizer
        if hasattr(zero, "fp32_partitioned_groups_flat"):
            return [(zero.sub_group_to_group_id[s], f) for s, f in enumerate(zero.fp32_partitioned_groups_flat)]
        return list(enumerate(zero.single_partition_of_fp32_groups))  # ZeRO-1/2: one flat per group

    def _flats(self, group: int) -> list[torch.Tensor]:
        return [flat for g, flat in self._all_flats() if g == group]

    def init_ema(self) -> None:
        """Start the EMA at the current fp32 master weights; each rank averages only its own shard."""
        self.ema = [flat.detach().float().clone() for _, flat in self._all_flats()]

    def update_ema(self, decay: float) -> None:
        update_ema(self.ema, [flat for _, flat in self._all_flats()], decay)

    def _ema_file(self, ckpt_dir: Path, tag: str) -> Path:
        return Path(ckpt_dir) / tag / f"ema_rank_{self._deepspeed.comm.get_rank():05d}.pt"

    def reset_optimizer_state(self, groups: Sequence[int]) -> None:
        """Forget the moments of `groups`: AdamW starts them afresh (step 0) at their next update."""
        for g in groups:
            for flat in self._flats(g):
                self._inner.state.pop(flat, None)

    def load_moments(self, moments: Iterable[tuple[str, torch.Tensor, torch.Tensor]], steps: dict[int, int]) -> None:
        """Write carried-over AdamW moments (name, exp_avg, exp_avg_sq); each rank keeps its own shard."""
        from deepspeed.utils import safe_set_full_optimizer_state

        for g, step in steps.items():
            init_moments(self._inner, self._flats(g), step)
        params = dict(self.module.named_parameters())
        for name, exp_avg, exp_avg_sq in moments:
            safe_set_full_optimizer_state(params[name], exp_avg.float(), "exp_avg")
            safe_set_full_optimizer_state(params[name], exp_avg_sq.float(), "exp_avg_sq")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """All parameters gathered from their shards (every rank gets them), on CPU."""
        params = list(self.module.parameters())
        with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
