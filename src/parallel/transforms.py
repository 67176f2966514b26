"""The one parallelize step every engine shares: the model transforms applied before an engine wraps or shards it.

In torchtitan's order: activation checkpointing (the first N / M blocks recompute their forward in backward) ->
per-block `torch.compile` -> the Ulysses sequence-parallel hooks -> (then the engine shards: `fully_shard`,
`deepspeed.initialize`, or nothing). Every transform works on the blocks in place, so parameter names and state
dicts are those of the plain model, and the model's code stays free of distribution (the hooks sit outside it).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from src.parallel.dist import sequence_group
from src.parallel.ulysses import SequenceParallel


def prepare_model(
    model: nn.Module, checkpoint_double: int = 0, checkpoint_single: int = 0, compile: bool = False, sp_size: int = 1
) -> SequenceParallel | None:
    """Apply an engine's model transforms to `model` in place; returns the sequence-parallel hooks (None when
    `sp_size` is 1), which the engine keeps for the model's lifetime. `sp_size` > 1 needs the process group."""
    apply_activation_checkpointing(model, checkpoint_double, checkpoint_single)
    compile_blocks(model, compile)
    return SequenceParallel(model, sequence_group(sp_size)) if sp_size > 1 else None


def apply_activation_checkpointing(model: nn.Module, double: int = 0, single: int = 0) -> None:
    """Recompute the first `double` double-stream and `single` single-stream blocks in backward.

    The blocks keep their names (their `forward` is wrapped in place), so state dicts are unchanged.
    -1 means all blocks of that kind.
    """
    for blocks, n in ((model.double_blocks, double), (model.single_blocks, single)):
        count = len(blocks) if n < 0 else n
        if count > len(blocks):
            raise ValueError(f"asked to checkpoint {count} blocks but the model has {len(blocks)}")
        for block in list(blocks)[:count]:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module, enabled: bool) -> None:
    """`torch.compile` every double- and single-stream block in place (names and state dicts unchanged).

    Per block rather than the whole model: one graph serves all blocks of a kind, so compiling costs two graphs
    whatever the depth. What it fuses are the elementwise ops around the matmuls (adaLN modulation, norms, RoPE,
    GELU, gated residuals). The local and FSDP2 engines use it; under ZeRO-3 DeepSpeed's parameter hooks sit on
    every layer inside a block, so `DeepSpeedEngine` uses DeepSpeed's own `engine.compile()` instead.
    """
    if enabled:
        for block in [*model.double_blocks, *model.single_blocks]:
            block.compile()
