"""Activation memory of one training step per rank, counted: `python -m src.parallel.activations --model mmdit_11b
--latent 33 96 96 --text 512 --sp 1 2 4 8`.

Runs the model's forward on the meta device (no memory, no compute) and adds up the bytes of every tensor autograd
saves for backward, block by block. Attention is counted as the flash / cuDNN kernels keep it (q, k, v, the output
and an fp32 log-sum-exp; never the L x L matrix). Under sequence parallelism a rank holds 1/S of the tokens in
every block and all tokens of H/S heads in attention, the same bytes as 1/S of the sequence, so a rank's figure is
the count at (text + video tokens) / S. With full activation checkpointing a rank keeps every block's input and,
during backward, one block's recomputed activations.

This is what decides `parallel.sp_size`: the smallest S whose activations, plus the ZeRO-3 model states
(`python -m src.bench.memory`) and the gathered weights of a block, fit the GPU (docs/parallel.md).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import src.models.attention
from src.cli import HelpFormatter
from src.config import model_config
from src.models.mmdit import MMDiT

ROOT = Path(__file__).resolve().parents[2]


class _FlashLikeAttention(torch.autograd.Function):
    """Shapes only: saves what a fused attention kernel saves (q, k, v, out, fp32 log-sum-exp per head and query)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)  # (B, L, H)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def saved_bytes(model: MMDiT, latent: tuple[int, int, int], text: int, batch: int = 1) -> dict[str, float]:
    """Bytes autograd saves in one forward of `model` (best on the meta device): per block and outside the blocks.

    latent: (T', H', W') of the VAE latent; text: text tokens. Returns {"blocks": [bytes per block], "other": bytes}.
    """
    counted = {"now": 0}
    per_block: list[int] = []
    weights = {id(p) for p in model.parameters()}  # saved for backward too, but they are model state, not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights and id(t._base) not in weights:
            counted["now"] += t.numel() * t.element_size()
        return t

    def enter(module, args):
        counted["start"] = counted["now"]

    def leave(module, args, out):
        per_block.append(counted["now"] - counted["start"])

    blocks = [*model.double_blocks, *model.single_blocks]
    hooks = [b.register_forward_pre_hook(enter) for b in blocks] + [b.register_forward_hook(leave) for b in blocks]
    original = src.models.attention.attention
    src.models.attention.attention = lambda q, k, v, backend="auto": _FlashLikeAttention.apply(q, k, v)
    try:
        dtype, device = model.img_in.weight.dtype, model.img_in.weight.device
        with torch.device(device):
            x = torch.empty(batch, model.in_channels, *latent, dtype=dtype)
            txt = torch.empty(batch, text, model.txt_in.in_features, dtype=dtype)
            vec = torch.empty(batch, model.vector_in.in_layer.in_features, dtype=dtype)
            t = torch.empty(batch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, txt, vec, t)
    finally:
        src.models.attention.attention = original
        for hook in hooks:
            hook.remove()
    return {"blocks": per_block, "other": counted["now"] - sum(per_block)}


@dataclass(frozen=True)
class RankActivations:
    """Saved bytes of one rank's forward: per block (double then single), one block's input, and the rest."""

    blocks: list[int]
    block_input: int
    other: int
    n_double: int

    def gb(self, double: int = 0, single: int = 0) -> float:
        """GiB kept with the first `double` double-stream and `single` single-stream blocks checkpointed (-1: all):
        a checkpointed block keeps only its input, and backward recomputes one such block at a time."""
        double = self.n_double if double < 0 else double
        single = len(self.blocks) - self.n_double if single < 0 else single
        recomputed = {*range(double), *range(self.n_double, self.n_double + single)}
        kept = sum(b for i, b in enumerate(self.blocks) if i not in recomputed) + len(recomputed) * self.block_input
        kept += max((self.blocks[i] for i in recomputed), default=0)
        return (kept + self.other) / 2**30


@contextlib.contextmanager
def _one_block_of_each(model: MMDiT):
    """The model with only its first double- and single-stream block while inside (all blocks of a kind have the
    same shapes, so they save the same bytes: counting one of each is exact and 57x faster for the 11B)."""
    double, single = model.double_blocks, model.single_blocks
    model.double_blocks, model.single_blocks = double[:1], single[:1]
    try:
        yield
    finally:
        model.double_blocks, model.single_blocks = double, single


def rank_activations(model: MMDiT, tokens: int, text: int, sp: int, batch: int = 1) -> RankActivations:
    """The count for one rank of a sequence-parallel group of `sp`, for `batch` samples of `tokens` video and
    `text` text tokens."""
    video, txt = math.ceil(tokens / sp), math.ceil(text / sp)
    pt, ph, pw = model.patch_size
    n_double, n_single = len(model.double_blocks), len(model.single_blocks)
    with _one_block_of_each(model):
        counts = saved_bytes(model, (pt, ph, pw * video), txt, batch)  # a 1 x 1 x video token grid
    first_single = min(n_double, 1)
    blocks = counts["blocks"][:first_single] * n_double + counts["blocks"][first_single:] * n_single
    width = model.img_in.out_features * model.img_in.weight.element_size()
    return RankActivations(blocks, batch * (video + txt) * width, counts["other"], n_double)


def rank_activation_gb(model: MMDiT, tokens: int, text: int, sp: int, checkpointing: bool) -> float:
    """GiB of saved activations on one rank, without or with full activation checkpointing."""
    return rank_activations(model, tokens, text, sp).gb(*((-1, -1) if checkpointing else (0, 0)))


def smallest_checkpointing(counts: RankActivations, budget_gb: float) -> tuple[int, int] | None:
    """The (checkpoint_double, checkpoint_single) that recomputes the fewest blocks while one rank's activations fit
    in `budget_gb` (a double and a single block cost about the same to recompute: 12 x hidden^2 FLOPs per token);
    among as few blocks, the one that keeps the least. None when even full checkpointing does not fit."""
    n_single = len(counts.blocks) - counts.n_double
    options = [(d, s) for d in range(counts.n_double + 1) for s in range(n_single + 1)]
    fits = [(d + s, gb, (d, s)) for d, s in options if (gb := counts.gb(d, s)) <= budget_gb]
    return min(fits)[2] if fits else None


def _model(name: str) -> MMDiT:
    cfg = model_config(name, vae="hunyuan")  # the 11B and 1B flavors' VAE
    with torch.device("meta"):
        return MMDiT(**cfg).to(torch.bfloat16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mmdit_11b", help="a conf/model/ name")
    parser.add_argument("--latent", type=int, nargs=3, default=[33, 96, 96], metavar=("T", "H", "W"))
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="GiB a rank has for activations: print the smallest selective checkpointing that fits",
    )
    args = parser.parse_args(argv)
    model = _model(args.model)
    tokens = math.prod(model.token_grid((0, 0, *args.latent)))
    print(f"{args.model}: latent {tuple(args.latent)} = {tokens} video + {args.text} text tokens, batch 1, bf16")
    print(f"{'sp_size':>8} {'tokens/rank':>12} {'no checkpointing GiB':>21} {'full checkpointing GiB':>23}")
    for sp in args.sp:
        counts = rank_activations(model, tokens, args.text, sp)
        plain, recomputed = counts.gb(0, 0), counts.gb(-1, -1)
        per_rank = math.ceil(tokens / sp) + math.ceil(args.text / sp)
        line = f"{sp:>8} {per_rank:>12} {plain:>21.1f} {recomputed:>23.1f}"
        if args.budget_gb is not None:
            best = smallest_checkpointing(counts, args.budget_gb)
            line += "   does not fit" if best is None else f"   checkpoint_double={best[0]} checkpoint_single={best[1]}"
        print(line)


if __name__ == "__main__":
    main()
