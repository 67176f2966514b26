"""How an engine's model is built and given full tensors (`init_from`) before the engine runs: the construction seam.

`src.train` asks the chosen engine class for its construction (`construction_for`), builds the model inside
`construction.build()`, and writes a previous stage's weights through `construction.write()`. The model code stays
ignorant of all of it. Three ways, each giving the same weights for the same seed (the run's seed, drawn on the
host in construction order):

- `Construction` (the local engine, ZeRO-1/2): every rank builds the whole model on its host.
- `RankZeroConstruction` (FSDP2): rank 0 builds the seeded model, the others build on the meta device (no memory,
  no random numbers); the engine gives every rank its slices of rank 0's tensors after sharding. Only rank 0
  reads `init_from`.
- `src.parallel.deepspeed.Zero3Construction` (ZeRO-3): every module is partitioned as soon as it is built
  (`deepspeed.zero.Init`), so a rank holds its partition plus one module's full parameters at most; rank 0 reads
  `init_from` and each gathered parameter is broadcast and re-partitioned.

Measured per rank in docs/BENCHMARKS.md (`python -m src.bench.build_memory`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Construction:
    """Every rank builds the whole model on its host and holds every tensor of it."""

    def build(self) -> contextlib.AbstractContextManager:
        """The context the model is instantiated in."""
        return contextlib.nullcontext()

    def shapes(self, model: nn.Module) -> dict[str, torch.Size]:
        """The full shape of every state-dict entry, however the model is held."""
        return {name: tensor.shape for name, tensor in model.state_dict().items()}

    def write(self, model: nn.Module, values: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        """Overwrite the named entries with full tensors, read one at a time by `values[name]()` when needed."""
        state = model.state_dict()
        for name, read in values.items():
            state[name].copy_(read())


class RankZeroConstruction(Construction):
    """Rank 0 builds the seeded model on its host, every other rank on the meta device; the engine then scatters
    rank 0's tensors (and its RNG state) after sharding. Only rank 0 reads what `write` is given."""

    def build(self) -> contextlib.AbstractContextManager:
        return torch.device("meta") if _rank() > 0 else contextlib.nullcontext()

    def write(self, model: nn.Module, values: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        if _rank() == 0:
            super().write(model, values)


def construction_for(build_engine: functools.partial) -> Construction:
    """The construction of the engine `build_engine` (a Hydra partial of an engine class) makes: its class's
    `construction(**its config)`, or every rank building the whole model when the class defines none."""
    construct = getattr(build_engine.func, "construction", None)
    return construct(**build_engine.keywords) if construct is not None else Construction()
