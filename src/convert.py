"""Move a run to another engine or world size: `python -m src.convert RUN_DIR OUT_RUN_DIR --to fsdp2|local|zero3`
`[--world N] [--tag step_N]`.

Reads one checkpoint of RUN_DIR, whichever engine wrote it (ZeRO-3's per-rank shards, an FSDP2 / DCP folder, the
local engine's file; `latest` by default), checks it against its manifest, and writes the same training state for
the target engine into OUT_RUN_DIR/checkpoints/<tag>/, sealed with a manifest like any checkpoint:

- the fp32 (master) weights, the EMA, each parameter's AdamW moments and step count;
- the optimizer's param groups (by parameter name), each group's current LR and the LR schedule's state;
- every writing rank's loop state as saved (step, samples_seen, data position, RNG, skip counters, the sentinel's
  history, the global batch of each bucket). The data position is global: any number of ranks continues from it.

`OUT_RUN_DIR/checkpoints/latest` names the newest checkpoint converted there. OUT_RUN_DIR also gets RUN_DIR's
`config.yaml` with its `parallel` group switched (the settings both engines have, such as precision and sp_size,
kept) and the run files a resumed run reads or appends to (metrics.jsonl, skipped/ with the quarantine,
trainable.jsonl, transition.json). The same training command with `parallel=<target>` and
`hydra.run.dir=OUT_RUN_DIR` then resumes: from an FSDP2 checkpoint on any number of ranks (keep the global batch
with `data.buckets.batch_scale`), from a local one in one process, from a ZeRO-3 one on the `--world N` ranks it
was laid out for (`src/parallel/zero3_files.py`; from a ZeRO-3 checkpoint of another world size too: DeepSpeed
itself resumes ZeRO-3 only on the number of ranks that wrote it).

It runs in one process, without a process group, and holds the whole state in host memory: fp32 weights, EMA and
two moments, 16 bytes per parameter (176 GB for an 11B model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint import FileSystemWriter

from src.checkpoint import check_intact
from src.cli import HelpFormatter
from src.config import CONF
from src.integrity import MANIFEST, atomic_write, seal, step_folders, write_latest
from src.parallel import fsdp2
from src.parallel.formats import TrainingState, reader_for
from src.parallel.zero3_files import Zero3Target, write_zero3
from src.run.param_groups import ParamPlan
from src.rundir import checkpoint_dir, latest_tag

TARGETS = ("fsdp2", "local", "zero3")
RUN_FILES = ("metrics.jsonl", "trainable.jsonl", "transition.json", "skipped")


def engine_of(folder: Path) -> str:
    """Which engine's format a checkpoint folder is in, from its files (`src.parallel.formats`)."""
    return reader_for(folder).name


def read_state(folder: Path) -> TrainingState:
    """The training state of a checkpoint folder written by any engine (not verified here: see `convert`)."""
    return reader_for(folder).training_state()


def write_fsdp2(state: TrainingState, folder: Path, sp_size: int) -> None:
    """The files `FSDP2Engine.save` writes, from one process: DCP's `.metadata` and `__0_0.distcp` with the full
    tensors (any number of ranks reads its slices of them), each rank's loop state, then `fsdp2.json`."""
    flat = {f"model.{k}": v for k, v in state.weights.items()}
    flat |= {f"ema.{k}": v for k, v in (state.ema or {}).items()}
    for name, (exp_avg, exp_avg_sq, step) in state.moments.items():
        flat[f"optim.{name}.exp_avg"] = exp_avg.float()
        flat[f"optim.{name}.exp_avg_sq"] = exp_avg_sq.float()
        flat[f"optim.{name}.step"] = torch.tensor(float(step))  # where torch's AdamW keeps it: an fp32 scalar
    with warnings.catch_warnings():  # "saving in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(flat, storage_writer=FileSystemWriter(folder), no_dist=True)
    for rank, loop in enumerate(state.loops):
        torch.save(loop, folder / f"loop_rank_{rank:05d}.pt")
    record = {
        "engine": "fsdp2",
        "world_size": len(state.loops),
        "sp_size": sp_size,
        "ema": state.ema is not None,
        "lrs": state.lrs,
        "groups": state.groups,
        "scheduler": state.scheduler,
        "converted_from": state.engine,
    }
    atomic_write(folder / fsdp2.MARKER, json.dumps(record, indent=1))  # last: the folder is complete


def write_local(state: TrainingState, folder: Path, groups: list[list[str]], defaults: dict) -> None:
    """`local_engine.pt` as `LocalEngine.save` writes it. `groups`: the param groups in the order the local engine
    builds them (its optimizer state is by position); `defaults`: its optimizer's settings (betas, eps, fused ...).
    The loop state is rank 0's."""
    index = {n: i for i, n in enumerate(n for g in groups for n in g)}
    optimizer = {
        "state": {
            index[n]: {"step": torch.tensor(float(step)), "exp_avg": m, "exp_avg_sq": v}
            for n, (m, v, step) in state.moments.items()
        },
        "param_groups": [
            {**defaults, "lr": lr, "initial_lr": base, "params": [index[n] for n in names]}
            for names, lr, base in zip(groups, state.lrs, state.scheduler["base_lrs"], strict=True)
        ],
    }
    blob = {
        "module": state.weights,
        "optimizer": optimizer,
        "scheduler": state.scheduler,
        "param_names": groups,
        "ema": state.ema,
        "state": state.loops[0],
    }
    torch.save(blob, folder / "local_engine.pt")


def model_groups(cfg: DictConfig, state: TrainingState) -> list[list[str]]:
    """The config's model and param groups, checked against the checkpoint: every tensor with its shape, the same
    groups. Returns the groups as an engine built from `cfg` orders them (model order)."""
    with torch.device("meta"):
        model = instantiate(cfg.model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.weights.items()}
    if shapes != saved:
        wrong = sorted(k for k in shapes.keys() | saved.keys() if shapes.get(k) != saved.get(k))
        raise ValueError(
            f"the checkpoint's tensors do not fit the run's model (config.yaml): {wrong[:5]} "
            f"({len(wrong)} differ: name or shape); convert a checkpoint with the run directory it was written in"
        )
    plan = ParamPlan(
        list(dict(model.named_parameters())),
        OmegaConf.to_container(cfg.optim.groups, resolve=True),
        OmegaConf.to_container(cfg.optim.schedule, resolve=True),
    )
    if sorted(map(sorted, plan.members)) != sorted(map(sorted, state.groups)):
        raise ValueError(
            f"the checkpoint's optimizer groups ({[len(g) for g in state.groups]} tensors) are not those of "
            f"optim.groups in config.yaml ({[len(g) for g in plan.members]}): was config.yaml edited after the run?"
        )
    return plan.members


def optimizer_defaults(cfg: DictConfig) -> dict:
    """The settings of a param group of the run's optimizer (lr, betas, eps, weight_decay, fused, ...)."""
    group = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    return {k: v for k, v in group.items() if k != "params"}


def switched_config(cfg: DictConfig, target: str) -> DictConfig:
    """`cfg` with `conf/parallel/<target>.yaml` as its parallel group, keeping the settings both engines have."""
    default = OmegaConf.load(CONF / "parallel" / f"{target}.yaml")
    kept = {k: cfg.parallel[k] for k in default if k in cfg.parallel and not k.startswith("_")}
    switched = OmegaConf.merge(cfg, {"parallel": None})
    switched.parallel = OmegaConf.merge(default, kept)
    return switched


def _prepare_out(out: Path) -> None:
    """Refuse to overwrite a sealed checkpoint; a folder left unsealed by an interrupted conversion is redone."""
    if (out / MANIFEST).is_file():
        raise ValueError(f"{out} already holds a sealed checkpoint: choose another OUT_RUN_DIR, or delete {out}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _copy_run_files(run_dir: Path, out_dir: Path) -> None:
    for name in RUN_FILES:
        source, dest = run_dir / name, out_dir / name
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, dest)


def _newest(ckpt_dir: Path, tag: str) -> str:
    """The newest sealed checkpoint of `ckpt_dir` (`tag` if none is newer)."""
    sealed = [f.name for f in step_folders(ckpt_dir) if (f / MANIFEST).is_file()]
    return sealed[0] if sealed else tag


def convert(run_dir: Path, out_dir: Path, target: str, tag: str | None = None, world: int | None = None) -> Path:
    """Write RUN_DIR's checkpoint `tag` (default: latest) for engine `target` into OUT_RUN_DIR; returns the folder.
    `world`: the number of ranks a ZeRO-3 checkpoint is laid out for (zero3 only, and required there)."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    if target not in TARGETS:
        raise ValueError(f"--to {target!r} is not one of {TARGETS}")
    if (target == "zero3") != (world is not None) or (world is not None and world < 1):
        raise ValueError(
            f"--world {world}: a ZeRO-3 checkpoint needs the ranks it will resume on (--world N >= 1), "
            "and only a ZeRO-3 one: FSDP2 resumes on any number of ranks, the local engine on one"
        )
    if out_dir == run_dir:
        raise ValueError(f"OUT_RUN_DIR is RUN_DIR ({run_dir}): convert into a new run directory")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} has no config.yaml: RUN_DIR must be a Kiln run directory")
    tag = tag or latest_tag(checkpoint_dir(run_dir))
    folder = checkpoint_dir(run_dir) / str(tag)
    if tag is None or not folder.is_dir():
        found = [f.name for f in step_folders(checkpoint_dir(run_dir))]
        raise ValueError(f"no checkpoint {tag or '(latest)'} in {checkpoint_dir(run_dir)}; present: {found}")
    check_intact(folder)  # every file against the manifest; no pickle that would run code
    source = engine_of(folder)
    if source == target == "zero3" and reader_for(folder).world_size == world:
        raise ValueError(f"{folder} is already a zero3 checkpoint of {world} ranks: it resumes on {world} as it is")
    if source == target != "zero3":
        raise ValueError(
            f"{folder} is already a {source} checkpoint"
            + (": it resumes on any number of ranks as it is" if source == "fsdp2" else "")
        )
    cfg = OmegaConf.load(run_dir / "config.yaml")
    state = read_state(folder)
    groups = model_groups(cfg, state)
    out = checkpoint_dir(out_dir) / folder.name
    switched = switched_config(cfg, target)
    if target == "zero3":
        zero3 = zero3_target(switched, world)  # refusals before anything is written
    _prepare_out(out)
    if target == "fsdp2":
        write_fsdp2(state, out, int(cfg.parallel.get("sp_size", 1)))
    elif target == "zero3":
        write_zero3(state, out, zero3)
    else:
        write_local(state, out, groups, optimizer_defaults(cfg))
    seal(out)
    write_latest(out.parent, _newest(out.parent, out.name))
    _copy_run_files(run_dir, out_dir)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(switched))
    return out


def zero3_target(cfg: DictConfig, world: int) -> Zero3Target:
    """What `write_zero3` needs of the run's config (its parallel group switched to zero3) for `world` ranks."""
    from src.parallel.deepspeed import _import_deepspeed, ds_config

    par = cfg.parallel
    if par.zero_stage != 3 or world % int(par.sp_size) != 0:
        raise ValueError(
            f"--to zero3 writes ZeRO stage 3 for --world {world} ranks in groups of parallel.sp_size "
            f"{par.sp_size}; the run's config has zero_stage {par.zero_stage}: set it to 3, and a world that "
            "sp_size divides"
        )
    with torch.device("meta"):
        model = instantiate(cfg.model)
    params = OrderedDict((n, p.shape) for n, p in model.named_parameters())
    config = ds_config(
        3, par.precision, par.grad_clip, OmegaConf.to_container(par.zero_options, resolve=True), par.reduce_dtype
    )
    return Zero3Target(
        world=world,
        params=params,
        buffers=[k for k in model.state_dict() if k not in params],  # the persistent ones, in state_dict order
        ds_config=config,
        defaults={k: v for k, v in optimizer_defaults(cfg).items() if k != "lr"},
        ds_version=_import_deepspeed().__version__,
    )


def resume_hint(run_dir: Path, out_dir: Path, target: str, world: int | None = None) -> str:
    """The command that resumes the converted run: the run's own overrides, another engine and run directory (and,
    for ZeRO-3, the `world` ranks it was laid out for: nodes x GPUs on a cluster)."""
    overrides_file = Path(run_dir) / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    kept = [o for o in overrides or [] if not o.lstrip("+~").startswith(("parallel", "hydra.run.dir"))]
    launcher = {"fsdp2": "torchrun --nproc_per_node=N", "local": "python"}.get(
        target, f"torchrun --nproc_per_node={world}"
    )
    command = f"{launcher} -m src.train {' '.join(kept)} parallel={target} hydra.run.dir={out_dir}"
    return " ".join(command.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.convert", formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="the run directory holding the checkpoint (RUN_DIR)")
    parser.add_argument("out_dir", type=Path, help="the new run directory (OUT_RUN_DIR)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the engine to resume with")
    parser.add_argument("--world", type=int, default=None, help="zero3 only: the number of ranks it will resume on")
    parser.add_argument("--tag", default=None, help="the checkpoint, e.g. step_00001000 (default: latest)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.run_dir, args.out_dir, args.to, args.tag, args.world)
    except ValueError as err:  # a refusal names the value and the fix: no traceback
        print(f"python -m src.convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.to}, sealed); resume it with the run's command on the new engine and directory:")
    print(f"  {resume_hint(args.run_dir, args.out_dir.resolve(), args.to, args.world)}")
    print("keeping the global batch: data.buckets.batch_scale x (data-parallel ranks before / after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
