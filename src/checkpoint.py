"""Reading checkpoints outside training: consolidated weights for sampling and export, AdamW moments for a stage
transition, a previous stage's tensors one at a time, each through the reader of the engine that wrote them
(`src.parallel.formats`). The run directory's layout and names are in src/rundir.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from src.integrity import MANIFEST, refusal, verify
from src.models.diffusers_flux import from_diffusers, is_diffusers_flux
from src.parallel.formats import format_of, reader_for
from src.rundir import latest_tag
from src.safe_load import refuse_unsafe_files

log = logging.getLogger("kiln.checkpoint")


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
    kiln = ("checkpoints", "latest", "export.json")
    return (
        path.is_dir()
        and not any((path / k).exists() for k in kiln)
        and format_of(path) is None
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
    return reader_for(ckpt_dir / tag).weights(ema), tag


class Moments:
    """AdamW moments of a checkpoint, per parameter name, whichever engine wrote it (read lazily by its reader,
    `src.parallel.formats.reader_for`).

    `steps[name]` is the AdamW step count of the parameter; iterating yields (name, exp_avg, exp_avg_sq) for
    the names asked for, one consolidated tensor pair at a time (ZeRO-3 shards are memory-mapped, not loaded).
    """

    def __init__(self, run_or_ckpt: str | Path, tag: str | None = None):
        ckpt_dir, self.tag = _resolve(run_or_ckpt, tag)
        self._moments = reader_for(ckpt_dir / self.tag).moments()
        self.steps = self._moments.steps

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        return self.select(self.steps)

    def select(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        return self._moments.select(names)


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
    elif (path / "export.json").is_file() and not is_diffusers_flux(path):  # a diffusers export: converted below
        record = json.loads((path / "export.json").read_text())
        where = safetensors_index(path / "model.safetensors")
        shapes = {k: shape for k, (_, shape) in where.items()}
        tag = f"export:{record['tag']}{' (EMA)' if record['ema'] else ''}"
        return WeightSource(shapes, lambda k: read_safetensor(where[k][0], k), tag)
    elif not is_diffusers_flux(path):
        ckpt_dir, tag = _resolve(path, None)
        shapes, read = reader_for(ckpt_dir / tag).weight_reader()  # ZeRO: consolidated whole, FSDP2 by tensor
        return WeightSource(shapes, read, tag)
    return WeightSource.whole(*load_model_weights(path, names=names))
