"""Reading checkpoints outside training: consolidated weights for sampling and export, run state on disk.

Layout of a run directory:
    RUN_DIR/config.yaml                     the resolved config (rank 0)
    RUN_DIR/metrics.jsonl                   one row per logged step
    RUN_DIR/checkpoints/latest              the tag of the newest complete checkpoint
    RUN_DIR/checkpoints/step_00000100/...   engine-specific shards (+ per-rank loop state)
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from src.integrity import MANIFEST, refusal, verify
from src.models.diffusers_flux import from_diffusers, is_diffusers_flux
from src.parallel.engine import latest_tag
from src.safe_load import load_tensors, refuse_unsafe_files, refuse_unsafe_pickles

log = logging.getLogger("kiln.checkpoint")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, numpy, python), as tensors and plain values only, so
    that a checkpoint loads with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states. The generators take their states as CPU ByteTensors, wherever a checkpoint
    was mapped to."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in older checkpoints
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _resolve(run_or_ckpt: str | Path, tag: str | None) -> tuple[Path, str]:
    ckpt_dir = Path(run_or_ckpt)
    if (ckpt_dir / "checkpoints").is_dir():
        ckpt_dir = ckpt_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise ValueError(f"no checkpoint {tag or '(latest)'} in {ckpt_dir}")
    check_intact(ckpt_dir / tag)
    return ckpt_dir, tag


def check_intact(folder: Path) -> None:
    """Refuse a checkpoint folder whose files do not match its manifest (hashing them all: about 1 GB/s), or whose
    pickles would run code; one without a manifest (written before Kiln sealed checkpoints) is read with a warning."""
    if (folder / MANIFEST).is_file():
        problems = verify(folder)
        if problems:
            raise ValueError(refusal(folder, problems))
    else:
        log.warning("%s has no %s: its files cannot be checked", folder, MANIFEST)
    refuse_unsafe_files(folder)


def is_released(path: str | Path) -> bool:
    """A weight file, or a folder of weight files that is neither a Kiln run, checkpoint folder nor export."""
    from src.models.weights import WEIGHT_SUFFIXES

    path = Path(path)
    if path.is_file():
        return path.name.endswith(WEIGHT_SUFFIXES)
    kiln = ("checkpoints", "latest", "export.json", "local_engine.pt")
    return (
        path.is_dir()
        and not any((path / k).exists() for k in kiln)
        and any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir())
    )


def load_model_weights(
    run_or_ckpt: str | Path, tag: str | None = None, ema: bool = False, names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Consolidated fp32 model weights of a checkpoint, whichever engine wrote it.

    `run_or_ckpt` is a run directory or its `checkpoints/` folder; `tag` defaults to the latest. With `ema`, the
    EMA replaces every parameter that was trained (frozen ones have no EMA: their weights are their own).
    A released checkpoint (a weight file, or a folder of shards with or without a `*.index.json`, named as the
    model's own keys: Open-Sora 2.0's layout) is read whole; the tag is then "weights:<name>".
    An export folder (`python -m src.export`: model.safetensors + export.json) is read as it was written (its
    export.json says whether it holds the EMA); the tag is then "export:<source tag>".
    A diffusers FluxTransformer2DModel folder (FLUX.1-dev, or an export with --format diffusers) is renamed to
    `names`, the model's own keys (`src/models/diffusers_flux.py`); what does not map keeps its diffusers name,
    for the caller's strict load to report. The tag is then "diffusers:<folder>".
    Returns (state dict, tag). Raises ValueError when there is no checkpoint (or, with `ema`, no EMA) to read.
    """
    if is_diffusers_flux(run_or_ckpt):
        if names is None:
            raise ValueError(f"{run_or_ckpt} is a diffusers FluxTransformer2DModel folder: pass the model's key names")
        from src.models.weights import read_state_dict

        weights = from_diffusers(read_state_dict(run_or_ckpt), names, strict=False)
        return {k: v.float() for k, v in weights.items()}, f"diffusers:{Path(run_or_ckpt).name}"
    if is_released(run_or_ckpt):  # e.g. Open-Sora 2.0's safetensors, single or sharded with an index
        from src.models.weights import read_sharded

        return {k: v.float() for k, v in read_sharded(run_or_ckpt).items()}, f"weights:{Path(run_or_ckpt).name}"
    if (Path(run_or_ckpt) / "export.json").is_file():
        from safetensors.torch import load_file

        record = json.loads((Path(run_or_ckpt) / "export.json").read_text())
        weights = {k: v.float() for k, v in load_file(Path(run_or_ckpt) / "model.safetensors").items()}
        return weights, f"export:{record['tag']}{' (EMA)' if record['ema'] else ''}"
    ckpt_dir, tag = _resolve(run_or_ckpt, tag)
    return _read_checkpoint(ckpt_dir, tag, ema), tag


def _read_checkpoint(ckpt_dir: Path, tag: str, ema: bool) -> dict[str, torch.Tensor]:
    """The fp32 weights (or with `ema` the EMA) of the verified checkpoint `ckpt_dir/tag`, whichever engine wrote
    it."""
    from src.parallel import fsdp2

    if fsdp2.is_checkpoint(ckpt_dir / tag):  # torch.distributed.checkpoint shards, read whatever the world size
        return fsdp2.read_weights(ckpt_dir / tag, ema)
    local = ckpt_dir / tag / "local_engine.pt"
    if local.is_file():
        blob = load_tensors(local)
        weights = {k: v.float() for k, v in blob["module"].items()}
        if ema:
            if blob.get("ema") is None:
                raise ValueError(f"{local} holds no EMA (the run had ema: null); read it without EMA")
            weights.update(blob["ema"])
        return weights
    from src.parallel.deepspeed import _import_deepspeed

    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    refuse_unsafe_pickles(sorted((ckpt_dir / tag).glob("*.pt")))  # DeepSpeed loads them with weights_only=False
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    weights = {k: v.float() for k, v in state.items()}
    if ema:
        weights.update(zero3_ema(ckpt_dir / tag))
    return weights


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


def zero3_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 EMA of a ZeRO-3 checkpoint folder (written by `DeepSpeedEngine.save`)."""
    files = sorted(folder.glob("ema_rank_*.pt"))
    if not files:
        raise ValueError(f"{folder} holds no EMA (the run had ema: null); read it without EMA")
    ranks = [load_tensors(f, mmap=True) for f in files]
    return {name: _gather(w, ranks) for name, w in _zero3_layout(folder, len(files)).items()}


class Moments:
    """AdamW moments of a checkpoint, per parameter name, whichever engine wrote it (read lazily).

    `steps[name]` is the AdamW step count of the parameter; iterating yields (name, exp_avg, exp_avg_sq) for
    the names asked for, one consolidated tensor pair at a time (ZeRO-3 shards are memory-mapped, not loaded).
    """

    def __init__(self, run_or_ckpt: str | Path, tag: str | None = None):
        ckpt_dir, self.tag = _resolve(run_or_ckpt, tag)
        folder = ckpt_dir / self.tag
        from src.parallel import fsdp2

        self._fsdp2 = fsdp2.Fsdp2Moments(folder) if fsdp2.is_checkpoint(folder) else None
        if self._fsdp2 is not None:
            self.steps = self._fsdp2.steps
            return
        if (folder / "local_engine.pt").is_file():
            blob = load_tensors(folder / "local_engine.pt", mmap=True)
            state = blob["optimizer"]["state"]
            order = [n for group in blob["param_names"] for n in group]  # optimizer index -> name
            self._local = {n: state[i] for i, n in enumerate(order) if i in state}
            self.steps = {n: int(s["step"]) for n, s in self._local.items()}
            return
        self._local = None
        self._zero3 = Zero3Moments(folder)
        self.steps = self._zero3.steps

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        return self.select(self.steps)

    def select(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        if self._fsdp2 is not None:
            yield from self._fsdp2.select(names)
            return
        if self._local is None:
            yield from self._zero3.select(names)
            return
        for name in names:
            yield name, self._local[name]["exp_avg"], self._local[name]["exp_avg_sq"]


def zero3_ranked(folder: Path, pattern: str) -> list[Path]:
    """The files of a ZeRO checkpoint folder matching `pattern` (e.g. `*_optim_states.pt`), in rank order."""
    files = list(folder.glob(pattern))
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1]))


class Zero3Moments:
    """AdamW state of a ZeRO-3 checkpoint folder per parameter name, gathered from every rank's memory-mapped
    flat shards one parameter at a time. A parameter whose sub-group holds no state (its group's moments were reset
    by a freeze schedule and it has not stepped since) has none: it is left out of `steps`.

    Also the optimizer's param groups as saved (`param_groups`: lr, betas, ..., `params` = sub-group indices) and
    the parameter names of each sub-group (`sub_groups`)."""

    def __init__(self, folder: Path):
        files = zero3_ranked(Path(folder), "*_optim_states.pt")
        if not files:
            raise ValueError(f"{folder} holds neither local_engine.pt nor DeepSpeed *_optim_states.pt files")
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


class WeightSource:
    """A checkpoint's model weights read one tensor at a time: `shapes` (every key's full shape, known without
    reading a tensor) and `read(key)` (the fp32 tensor). What `init_from` loads through, so that a rank holds at
    most one source tensor at a time, and a rank that writes nothing (`src.parallel.construction`) reads nothing."""

    def __init__(self, shapes: dict[str, torch.Size], read: Callable[[str], torch.Tensor], tag: str):
        self.shapes, self._read, self.tag = shapes, read, tag

    def read(self, key: str) -> torch.Tensor:
        return self._read(key).float()

    @classmethod
    def whole(cls, weights: dict[str, torch.Tensor], tag: str) -> WeightSource:
        """A state dict already read whole (the formats read only whole: a ZeRO checkpoint, a diffusers folder)."""
        return cls({k: v.shape for k, v in weights.items()}, weights.__getitem__, tag)


def open_model_weights(run_or_ckpt: str | Path, names: list[str]) -> WeightSource:
    """`load_model_weights(run_or_ckpt, names=names)` (fp32, no EMA), but read lazily where the format allows: a
    released or exported safetensors checkpoint and an FSDP2 checkpoint tensor by tensor, a local engine's file
    memory-mapped. The same checks and refusals (a Kiln checkpoint's manifest is verified: a collective)."""
    from src.models.weights import read_safetensor, safetensors_index

    path = Path(run_or_ckpt)
    if is_released(path) and not is_diffusers_flux(path):
        where = safetensors_index(path)
        if where is not None:
            shapes = {k: shape for k, (_, shape) in where.items()}
            return WeightSource(shapes, lambda k: read_safetensor(where[k][0], k), f"weights:{path.name}")
    elif (path / "export.json").is_file():
        record = json.loads((path / "export.json").read_text())
        where = safetensors_index(path / "model.safetensors")
        shapes = {k: shape for k, (_, shape) in where.items()}
        tag = f"export:{record['tag']}{' (EMA)' if record['ema'] else ''}"
        return WeightSource(shapes, lambda k: read_safetensor(where[k][0], k), tag)
    elif not is_diffusers_flux(path):
        ckpt_dir, tag = _resolve(path, None)
        folder = ckpt_dir / tag
        from src.parallel import fsdp2

        if fsdp2.is_checkpoint(folder):
            shapes = fsdp2.model_shapes(folder)
            return WeightSource(shapes, lambda k: fsdp2.read_tensors(folder, [f"model.{k}"])[f"model.{k}"], tag)
        if (folder / "local_engine.pt").is_file():
            module = load_tensors(folder / "local_engine.pt", mmap=True)["module"]  # mapped, not read
            return WeightSource({k: v.shape for k, v in module.items()}, module.__getitem__, tag)
        return WeightSource.whole(_read_checkpoint(ckpt_dir, tag, ema=False), tag)  # ZeRO: consolidated whole
    return WeightSource.whole(*load_model_weights(path, names=names))
