"""Tiled encoding and decoding laid out and blended as Open-Sora 2.0 does for its Video DC-AE.

Kiln's own code for the rules of Open-Sora's `DCAE.{spatial,temporal}_tiled_{encode,decode}`, so that tiled latents
and decodes are Open-Sora's, to fp32 rounding:

- **Time outside, space inside.** A clip longer than the temporal tile is cut into temporal tiles; each is cut in
  space if its height or width exceeds the spatial tile, and its spatial tiles are assembled before the temporal
  tiles are blended. Space is cut in both directions as soon as either one exceeds the tile, so a side that fits
  one tile is still cut.
- **Placement.** Along an axis of size n, tiles of `tile` input units start at 0, stride, 2 stride, ... while the
  start is < n, with stride = int(tile * (1 - overlap)): the last tiles may be short or lie inside the one before.
- **Blending.** With e = int(tile_out * overlap) output units (tile_out: what one whole tile becomes), tiles are
  visited in row-major order; a tile's first e' = min(e, its length, its predecessor's length) entries along an
  axis become prev[-e' + y] * (1 - y / e') + cur[y] * (y / e'), y = 0 .. e' - 1, where prev is the tile before it
  along that axis *after its own blending*. In space the tile above is blended in first, then the tile to the left.
- **Assembly.** Each tile keeps its first tile_out - e entries along every tiled axis; the kept parts are
  concatenated.

The blend reads the neighbour's tail, which that neighbour does not keep: the output is a blend of two encodings
only inside the overlaps, and a single tile's output elsewhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AxisTiles:
    """How one axis is tiled: `tile` and `stride` in the units of the function's input, `blend` and `keep` in the
    units of its output."""

    tile: int
    stride: int
    blend: int
    keep: int


def axis_tiles(tile_in: int, tile_out: int, overlap: float) -> AxisTiles:
    """Open-Sora's numbers for tiles of `tile_in` input units that the function maps to `tile_out` output units.

    Raises ValueError where the kept parts would not sit edge to edge (their length in input units differs from the
    stride), i.e. where Open-Sora's own tiling would put a seam or a gap in the output.
    """
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    keep = tile_out - blend
    if stride < 1 or keep * tile_in != stride * tile_out:
        raise ValueError(
            f"tile_overlap={overlap} does not tile a {tile_in}-unit tile ({tile_out} output units) edge to edge: "
            f"tiles start every {stride} input units but each keeps {keep} output units ({keep * tile_in / tile_out:g} "
            f"input units); use an overlap that makes tile * overlap whole in both units, e.g. 0.25 or 0.5"
        )
    return AxisTiles(tile_in, stride, blend, keep)


def tile_starts(size: int, axis: AxisTiles) -> range:
    """Where the tiles of an axis of `size` input units start: every stride while the start is inside."""
    return range(0, size, axis.stride)


def blend(prev: torch.Tensor, cur: torch.Tensor, dim: int, extent: int) -> torch.Tensor:
    """`cur` with its first entries along `dim` ramped from the last ones of `prev` (its neighbour before it)."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    if e <= 0:
        return cur
    y = torch.arange(e, dtype=torch.float64) / e  # weights rounded once to fp32, as a Python float scalar would be
    shape = [1] * cur.ndim
    shape[dim] = e
    w_cur = y.to(torch.float32).view(shape).to(cur.device)
    w_prev = (1 - y).to(torch.float32).view(shape).to(cur.device)
    tail = prev.narrow(dim, prev.shape[dim] - e, e)
    head = (tail * w_prev + cur.narrow(dim, 0, e) * w_cur).to(cur.dtype)
    return torch.cat([head, cur.narrow(dim, e, cur.shape[dim] - e)], dim)


def _kept(y: torch.Tensor, tiling: dict[int, AxisTiles]) -> torch.Tensor:
    for dim, axis in tiling.items():
        y = y.narrow(dim, 0, min(axis.keep, y.shape[dim]))
    return y


def _concatenate(pieces: dict[tuple[int, ...], torch.Tensor], dims: list[int], counts: list[int]) -> torch.Tensor:
    def join(prefix: tuple[int, ...]) -> torch.Tensor:
        if len(prefix) == len(dims):
            return pieces[prefix]
        return torch.cat([join((*prefix, i)) for i in range(counts[len(prefix)])], dims[len(prefix)])

    return join(())


def tile_grid(fn: Fn, x: torch.Tensor, tiling: dict[int, AxisTiles]) -> torch.Tensor:
    """`fn` on every tile of `x` along the dims of `tiling` (the others whole), blended and assembled (module doc).

    Tiles are visited in row-major order over the dims in increasing order; each is blended with its final
    predecessor along every tiled dim in that order, then only its kept part is held.
    """
    dims = sorted(tiling)
    starts = [tile_starts(x.shape[d], tiling[d]) for d in dims]
    full: dict[tuple[int, ...], torch.Tensor] = {}  # blended tiles a later tile may still blend with
    kept: dict[tuple[int, ...], torch.Tensor] = {}
    for pos in itertools.product(*(range(len(s)) for s in starts)):
        piece = x
        for d, s, i in zip(dims, starts, pos, strict=True):
            piece = piece.narrow(d, s[i], min(tiling[d].tile, x.shape[d] - s[i]))
        y = fn(piece)
        for k, d in enumerate(dims):
            if pos[k] > 0:
                y = blend(full[(*pos[:k], pos[k] - 1, *pos[k + 1 :])], y, d, tiling[d].blend)
        full[pos] = y
        kept[pos] = _kept(y, tiling).clone()  # a copy, so that the whole tile can be freed
        if pos[0] > 0:  # the tile above has had its last reader (row-major order)
            full.pop((pos[0] - 1, *pos[1:]))
    return _concatenate(kept, dims, [len(s) for s in starts])


def tiled(
    fn: Fn, x: torch.Tensor, time: AxisTiles | None, space: AxisTiles | None, dims: tuple[int, int, int] = (2, 3, 4)
) -> torch.Tensor:
    """`fn` over `x` (B, C, T, H, W) as Open-Sora tiles it: in time if T > time.tile, then each temporal tile in
    space if its H or W > space.tile (both directions), else whole; None turns a direction off."""
    t_dim, h_dim, w_dim = dims

    def spatial(piece: torch.Tensor) -> torch.Tensor:
        if space is not None and max(piece.shape[h_dim], piece.shape[w_dim]) > space.tile:
            return tile_grid(fn, piece, {h_dim: space, w_dim: space})
        return fn(piece)

    if time is not None and x.shape[t_dim] > time.tile:
        return tile_grid(spatial, x, {t_dim: time})
    return spatial(x)
