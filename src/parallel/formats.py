"""Reading a checkpoint folder without a process group, whichever engine wrote it: `reader_for(folder)`.

Each engine module owns its checkpoint format: the engine class writes and loads it in training, and names in
`checkpoint_format` the `CheckpointReader` subclass (defined beside it) that reads it offline, in one process:
consolidated fp32 weights, the EMA, AdamW moments, the whole training state. Sampling, export, `init_from`,
`transition_optimizer=carry` and `src.convert` ask the reader, never a file name.

The engines known are those of `conf/parallel/*.yaml` (their `_target_` classes): adding an engine is its Python
file (engine class + reader) and its YAML; nothing here changes.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from omegaconf import OmegaConf

from src.config import CONF


@dataclass
class TrainingState:
    """A checkpoint's training state, consolidated: what every engine saves, in no engine's layout."""

    engine: str  # the format that wrote it: zero3, fsdp2 or local
    weights: dict[str, torch.Tensor]  # every model tensor, fp32, full
    ema: dict[str, torch.Tensor] | None  # the EMA of the trainable ones (None: the run had ema: null)
    groups: list[list[str]]  # the optimizer's param groups, by parameter name
    lrs: list[float]  # each group's current learning rate
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]]  # name -> (exp_avg, exp_avg_sq, AdamW step)
    scheduler: dict  # the LR schedule's state_dict
    loops: list[dict]  # each writing rank's loop state, in rank order


class MomentsReader(Protocol):
    """AdamW moments per parameter name: `steps[name]` is the parameter's AdamW step count (a parameter without
    state has no entry); `select(names)` yields (name, exp_avg, exp_avg_sq), one full tensor pair at a time."""

    steps: dict[str, int]

    def select(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]: ...


class CheckpointReader(Protocol):
    """One engine's checkpoint folder, read in this process alone. Each engine file defines one (subclassing this
    for `weights`), taking the folder in its constructor, and names it in its engine class's `checkpoint_format`."""

    name: ClassVar[str]  # the format's name, as its conf/parallel YAML is named (zero3, fsdp2, local)
    folder: Path

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        """Whether `folder` holds this format's files (a look at file names, nothing loaded)."""
        ...

    @property
    def world_size(self) -> int:
        """The number of ranks that wrote the checkpoint."""
        ...

    def model_weights(self) -> dict[str, torch.Tensor]:
        """Every model tensor, consolidated, fp32."""
        ...

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """The fp32 EMA of the trained parameters, consolidated; None when the run kept none (ema: null)."""
        ...

    def moments(self) -> MomentsReader: ...

    def weight_reader(self) -> tuple[dict[str, torch.Size], Callable[[str], torch.Tensor]]:
        """Every model tensor's full shape, and a function reading one of them: what `init_from` loads through,
        one tensor at a time. Here from `model_weights()` read whole; a format that can reads tensor by tensor."""
        weights = self.model_weights()
        return {k: v.shape for k, v in weights.items()}, weights.__getitem__

    def training_state(self) -> TrainingState:
        """Everything the engine saved (weights, EMA, moments, groups, LRs, schedule, loop states): `src.convert`."""
        ...

    def weights(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The fp32 model weights; with `ema` the EMA replaces every trained parameter (frozen ones keep theirs).

        Raises ValueError when `ema` is asked of a run that kept none."""
        weights = self.model_weights()
        if ema:
            averaged = self.ema_weights()
            if averaged is None:
                raise ValueError(f"{self.folder} holds no EMA (the run had ema: null); read it without EMA")
            weights.update(averaged)
        return weights


@functools.cache
def readers() -> tuple[type[CheckpointReader], ...]:
    """The checkpoint readers of the engines in conf/parallel/*.yaml, one per engine class, in file-name order."""
    found: dict[str, type[CheckpointReader]] = {}
    for path in sorted((CONF / "parallel").glob("*.yaml")):
        module, _, name = str(OmegaConf.load(path)._target_).rpartition(".")
        engine = getattr(importlib.import_module(module), name)
        fmt = getattr(engine, "checkpoint_format", None)
        if fmt is None:
            raise TypeError(f"{module}.{name} ({path.name}) names no checkpoint_format (a CheckpointReader class)")
        found.setdefault(fmt.name, fmt)
    return tuple(found.values())


def format_of(folder: str | Path) -> type[CheckpointReader] | None:
    """The reader class whose files `folder` holds; None when it holds no engine's checkpoint."""
    matches = [r for r in readers() if r.recognises(Path(folder))]
    if len(matches) > 1:
        raise ValueError(f"{folder} holds the files of several checkpoint formats: {[r.name for r in matches]}")
    return matches[0] if matches else None


def reader_for(folder: str | Path) -> CheckpointReader:
    """The reader of the checkpoint folder `folder`, chosen from the files it holds.

    Raises ValueError naming the folder, what it holds and the formats known when no engine wrote it."""
    folder = Path(folder)
    fmt = format_of(folder) if folder.is_dir() else None
    if fmt is None:
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else "nothing: it is no folder"
        known = ", ".join(r.name for r in readers())
        raise ValueError(f"{folder} is no checkpoint of a Kiln engine (formats known: {known}): it holds {found}")
    return fmt(folder)
