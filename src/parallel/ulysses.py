"""Ulysses sequence parallelism for the MMDiT, applied from outside the model by forward hooks.

With a group of S ranks, every rank holds 1/S of the text tokens and 1/S of the video tokens through every block:

    txt_in / img_in / cond_in output  (B, L, C)        -> pad L to a multiple of S, keep this rank's chunk
    block inputs: RoPE angles         (B, Lt + Li, D/2) -> the angles of this rank's text and video chunks
    Attention q, k, v                 (B, Lt/S + Li/S, H, D)
        all-to-all                    -> (B, Lt + Li, H/S, D): every token of the sequence, H/S of the heads,
                                         padding dropped, in the unsharded order
        attention, then the inverse   -> (B, Lt/S + Li/S, H, D)
    final_layer input                 (B, Li/S, C)      -> all-gathered to (B, Li, C)

So attention sees exactly the unsharded sequence, in its order (the padding is removed before it, which masks it
at the cost of one index copy and keeps the flash / cuDNN kernels usable); every other op is per token. Every rank
of the group computes the same loss on the full prediction. The gather's backward sums the ranks' gradients
(all-reduce, then this rank's chunk), so each rank's parameter gradients are S times its share of the true
gradient; ZeRO averaging over all dp x S ranks then yields the data-parallel mean of the true gradients, with no
loss scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from src.models.attention import Attention
from src.models.layers import DoubleStreamBlock, SingleStreamBlock


def check_heads(model: nn.Module, sp_size: int) -> None:
    """A ValueError unless every attention splits its heads evenly over the group."""
    heads = {block.heads if hasattr(block, "heads") else block.img_attn.heads for block in _blocks(model)}
    bad = sorted(h for h in heads if h % sp_size)
    if bad:
        valid = [d for d in range(1, max(heads) + 1) if all(h % d == 0 for h in heads)]
        raise ValueError(
            f"parallel.sp_size={sp_size} does not divide the model's {bad[0]} attention heads: Ulysses gives each "
            f"rank heads / sp_size heads (valid sp_size for this model: {valid})"
        )


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, DoubleStreamBlock | SingleStreamBlock)]


# ---------------------------------------------------------------------------------------------------------
# Collectives with autograd
# ---------------------------------------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x: (S, ...); chunk j goes to rank j, and chunk j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like would copy a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`_all_to_all` is its own adjoint: the gradient of the chunk sent to rank j comes back from rank j."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    """(B, l, C) chunks of the group -> (B, S*l, C) on every rank; backward: gradients summed over the group,
    this rank's chunk kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.chunk = group, dist.get_rank(group), x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.chunk : (ctx.rank + 1) * ctx.chunk], None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, n, H, D) sequence chunk, all heads -> (B, S*n, H/S, D): the group's chunks in rank order, H/S heads."""
    S, (B, n, H, D) = dist.get_world_size(group), x.shape
    x = x.reshape(B, n, S, H // S, D).permute(2, 0, 1, 3, 4)  # (S, B, n, H/S, D): head slice j goes to rank j
    out = _AllToAll.apply(x, group)  # (S, B, n, H/S, D): chunk j is rank j's tokens
    return out.permute(1, 0, 2, 3, 4).reshape(B, S * n, H // S, D)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `seq_to_heads`: (B, S*n, H/S, D) -> (B, n, H, D)."""
    S, (B, L, h, D) = dist.get_world_size(group), x.shape
    x = x.reshape(B, S, L // S, h, D).permute(1, 0, 2, 3, 4)  # (S, B, n, H/S, D): token chunk j goes to rank j
    out = _AllToAll.apply(x, group)  # (S, B, n, H/S, D): chunk j is head slice j
    return out.permute(1, 2, 0, 3, 4).reshape(B, L // S, S * h, D)


# ---------------------------------------------------------------------------------------------------------
# The split of one forward's sequence
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """How a sequence of `txt_len` text and `img_len` video tokens is cut over `size` ranks.

    Each stream is padded to a multiple of `size`; rank r holds text chunk r then video chunk r.
    """

    size: int
    txt_len: int
    img_len: int

    @property
    def txt_chunk(self) -> int:
        return math.ceil(self.txt_len / self.size)

    @property
    def img_chunk(self) -> int:
        return math.ceil(self.img_len / self.size)

    def chunk(self, x: torch.Tensor, rank: int, text: bool) -> torch.Tensor:
        """This rank's chunk of a text or video stream x (B, L, ...), zero-padded at the end of the stream."""
        size = self.txt_chunk if text else self.img_chunk
        pad = size * self.size - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x[:, rank * size : (rank + 1) * size]

    def gathered_positions(self, device: torch.device) -> torch.Tensor:
        """(Lt + Li,) where each token of the unsharded sequence [text, video] sits in the all-to-all's
        concatenation of the ranks' [text chunk, video chunk] (padding has no entry)."""
        local = self.txt_chunk + self.img_chunk
        txt = torch.arange(self.txt_len, device=device)
        img = torch.arange(self.img_len, device=device)
        return torch.cat(
            [
                (txt // self.txt_chunk) * local + txt % self.txt_chunk,
                (img // self.img_chunk) * local + self.txt_chunk + img % self.img_chunk,
            ]
        )


class SequenceParallel:
    """Makes an `MMDiT` run sequence-parallel over `group` by registering hooks on it; `remove()` undoes it.

    The model's code is untouched: the hooks sit on `txt_in`, `img_in`, `cond_in` (split), on every block (its RoPE
    angles), on every `Attention` (all-to-all) and on `final_layer` (gather). Every rank of the group must call the
    model with the same inputs.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        check_heads(model, self.size)
        self.txt_len = self.img_len = 0
        self._angles: tuple[torch.Tensor, Split, torch.Tensor] | None = None  # (full, split, this rank's) cache
        hooks: list[RemovableHandle] = [
            model.txt_in.register_forward_hook(self._split_text),
            model.img_in.register_forward_hook(self._split_video),
            model.final_layer.register_forward_pre_hook(self._gather_video),
        ]
        if model.cond_in is not None:
            hooks.append(model.cond_in.register_forward_hook(self._split_video))
        hooks += [block.register_forward_pre_hook(self._local_angles) for block in _blocks(model)]
        for module in model.modules():
            if isinstance(module, Attention):
                hooks.append(module.register_forward_pre_hook(self._to_heads))
                hooks.append(module.register_forward_hook(self._to_sequence))
        self.hooks = hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    @property
    def split(self) -> Split:
        return Split(self.size, self.txt_len, self.img_len)

    # -- hooks ----------------------------------------------------------------------------------------------

    def _split_text(self, module, args, out: torch.Tensor) -> torch.Tensor:
        self.txt_len = out.shape[1]
        return self.split.chunk(out, self.rank, text=True)  # (B, Lt/S, C)

    def _split_video(self, module, args, out: torch.Tensor) -> torch.Tensor:
        self.img_len = out.shape[1]
        return self.split.chunk(out, self.rank, text=False)  # (B, Li/S, C)

    def _local_angles(self, module, args: tuple) -> tuple:
        """The block's last argument, the angles of the whole sequence, becomes those of this rank's tokens."""
        angles, split = args[-1], self.split  # (B, Lt + Li, D/2)
        if self._angles is None or self._angles[0] is not angles or self._angles[1] != split:
            txt, img = angles[:, : split.txt_len], angles[:, split.txt_len :]
            local = torch.cat([split.chunk(txt, self.rank, True), split.chunk(img, self.rank, False)], dim=1)
            self._angles = (angles, split, local)
        return (*args[:-1], self._angles[2])

    def _to_heads(self, module, args: tuple) -> tuple:
        """q, k, v (B, Lt/S + Li/S, H, D) -> (B, Lt + Li, H/S, D): padding removed, tokens in unsharded order."""
        order = self.split.gathered_positions(args[0].device)
        return tuple(seq_to_heads(x, self.group).index_select(1, order) for x in args)

    def _to_sequence(self, module, args, out: torch.Tensor) -> torch.Tensor:
        """(B, Lt + Li, H/S, D) -> (B, Lt/S + Li/S, H, D), padding positions zero."""
        split, (B, _, h, D) = self.split, out.shape
        full = out.new_zeros(B, self.size * (split.txt_chunk + split.img_chunk), h, D)
        return heads_to_seq(full.index_copy(1, split.gathered_positions(out.device), out), self.group)

    def _gather_video(self, module, args: tuple) -> tuple:
        """final_layer's input: this rank's video chunk (B, Li/S, C) -> every video token (B, Li, C)."""
        img, *rest = args
        return (_GatherSequence.apply(img, self.group)[:, : self.img_len], *rest)
