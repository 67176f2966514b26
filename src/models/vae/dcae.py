"""Video DC-AE (Open-Sora 2.0's `dc-ae-f32t4c128`) behind Kiln's VAE interface.

A deterministic, non-causal autoencoder compressing 4 x 32 x 32 (time x space) into 128 channels. Each of the six
stages holds blocks (3D ResBlocks in the first three, EfficientViT blocks with multi-scale linear attention in the
last three) and, between stages, strided-conv downsampling (encoder) or interpolate+conv upsampling (decoder),
both with parameter-free shortcuts; the downsampling after stages 3 and 4 (0-based) also halves time. The module
tree reproduces the names of `F32T4C128_AE.safetensors`, loaded strictly. Blocks live in `dcae_blocks.py`.

Open-Sora divides the encoder output by its `scaling_factor` 0.493; Kiln multiplies (latent = (z - shift) *
scaling_factor), so the same latents come from Kiln's scaling_factor = 1 / 0.493, the default here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.models.provenance import constructor_args
from src.models.vae.dcae_blocks import (
    BLOCK_TYPES,
    AveragingShortcut,
    ConvLayer,
    DuplicatingShortcut,
    OpSequence,
    Residual,
    RMSNorm3d,
    build_block,
    downsample_block,
    upsample_block,
)
from src.models.vae.tiling import AxisTiles, axis_tiles, tile_starts, tiled
from src.models.weights import read_state_dict, strict_load, weights_sha256

log = logging.getLogger("kiln.vae")

WIDTHS = (128, 256, 512, 512, 1024, 1024)
ENCODER_DEPTHS = (2, 2, 2, 3, 3, 3)
DECODER_DEPTHS = (3, 3, 3, 3, 3, 3)
STAGE_BLOCKS = ("ResBlock", "ResBlock", "ResBlock", "EViTS5_GLU", "EViTS5_GLU", "EViTS5_GLU")
TEMPORAL_STAGES = (3, 4)
OPEN_SORA_SCALE = 0.493  # Open-Sora's latent is z / 0.493


def _check_architecture(
    widths: Sequence[int],
    encoder_depths: Sequence[int],
    decoder_depths: Sequence[int],
    block_types: Sequence[str],
    temporal_stages: Sequence[int],
) -> None:
    n = len(widths)
    for name, values in (("encoder_depths", encoder_depths), ("decoder_depths", decoder_depths)):
        if len(values) != n or min(values) < 1:
            raise ValueError(f"{name}={list(values)}: give one depth >= 1 per stage ({n} stages, from widths)")
    if len(block_types) != n or any(b not in BLOCK_TYPES for b in block_types):
        raise ValueError(f"block_types={list(block_types)}: give one of {BLOCK_TYPES} per stage ({n} stages)")
    if any(not 0 <= s < n - 1 for s in temporal_stages) or len(set(temporal_stages)) != len(temporal_stages):
        raise ValueError(f"temporal_stages={list(temporal_stages)}: distinct stage indices in [0, {n - 2}]")


class Encoder(nn.Module):
    """(B, 3, T, H, W) -> (B, latent, T/2^k, H/2^(n-1), W/2^(n-1)); k = number of temporal stages."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        block_types: Sequence[str],
        temporal_stages: Sequence[int],
        latent_channels: int,
        head_dim: int,
        in_channels: int = 3,
    ):
        super().__init__()
        self.project_in = ConvLayer(in_channels, widths[0], 3, bias=True)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            ops = [build_block(block_types[i], width, head_dim) for _ in range(depth)]
            if i < len(widths) - 1:
                ops.append(downsample_block(width, widths[i + 1], temporal=i in temporal_stages))
            stages.append(OpSequence(ops))
        self.stages = nn.ModuleList(stages)
        # the latent is a conv of the last features plus their channel-group averages
        head = OpSequence([ConvLayer(widths[-1], latent_channels, 3, bias=True)])
        self.project_out = Residual(head, AveragingShortcut(widths[-1], latent_channels, factor=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)  # (B, W0, T, H, W)
        for stage in self.stages:
            x = stage(x)  # (B, W_{i+1}, T_i, H_i, W_i)
        return self.project_out(x)  # (B, latent, T', H', W')


class Decoder(nn.Module):
    """(B, latent, T', H', W') -> (B, 3, T, H, W); a 1-frame latent decodes to 1 frame (an image)."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        block_types: Sequence[str],
        temporal_stages: Sequence[int],
        latent_channels: int,
        head_dim: int,
        out_channels: int = 3,
    ):
        super().__init__()
        # a conv of the latent plus the latent's channels repeated to the last width
        conv = ConvLayer(latent_channels, widths[-1], 3, bias=True)
        self.project_in = Residual(conv, DuplicatingShortcut(latent_channels, widths[-1], factor=1))
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            ops = []
            if i < len(widths) - 1:
                ops.append(upsample_block(widths[i + 1], width, temporal=i in temporal_stages))
            ops.extend(build_block(block_types[i], width, head_dim) for _ in range(depth))
            stages.append(OpSequence(ops))
        self.stages = nn.ModuleList(stages)  # stored coarse-last (as the checkpoint), run in reverse
        self.project_out = OpSequence([RMSNorm3d(widths[0]), nn.ReLU(), ConvLayer(widths[0], out_channels, 3)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)  # (B, W_last, T', H', W')
        for stage in reversed(self.stages):
            x = stage(x)  # (B, W_i, T_i, H_i, W_i)
        return self.project_out(x)  # (B, 3, T, H, W)


class VideoDCAE(nn.Module):
    """Video (B, 3, T, H, W) in [-1, 1] <-> latent (B, 128, T/4, H/32, W/32): Open-Sora 2.0's Video DC-AE.

    `path`: `F32T4C128_AE.safetensors` (loaded strictly); random weights need `path: null` and `random_init: true`
    (tests, demos: recorded as `weights_sha256: null`). The architecture arguments default to the released model;
    smaller ones build tiny test models with the same structure (compression 2^(stages - 1) in space,
    2^len(temporal_stages) in time).
    `temporal_stages`: 0-based stages whose down/upsampling also halves/doubles time. `head_dim`: channels per
    linear-attention head (32 in the release). Frames: 1 (an image) or a multiple of the temporal factor with at
    least 2 latent frames (a 1-frame latent is decoded as an image). Tiling (on by default, Open-Sora's sizes):
    `tile_size` pixels x `tile_frames` frames, neighbours overlapping by `tile_overlap` of a tile, placed and blended
    in encode and decode exactly as Open-Sora 2.0 does (`src.models.vae.tiling`); None turns off that direction.
    """

    def __init__(
        self,
        path: str | None = None,
        dtype: str = "float32",
        scaling_factor: float = 1 / OPEN_SORA_SCALE,
        shift_factor: float = 0.0,
        latent_channels: int = 128,
        widths: Sequence[int] = WIDTHS,
        encoder_depths: Sequence[int] = ENCODER_DEPTHS,
        decoder_depths: Sequence[int] = DECODER_DEPTHS,
        block_types: Sequence[str] = STAGE_BLOCKS,
        temporal_stages: Sequence[int] = TEMPORAL_STAGES,
        head_dim: int = 32,
        tiling: bool = True,
        tile_size: int | None = 256,
        tile_frames: int | None = 32,
        tile_overlap: float = 0.25,
        random_init: bool = False,
    ):
        super().__init__()
        widths, block_types, temporal_stages = list(widths), list(block_types), list(temporal_stages)
        encoder_depths, decoder_depths = list(encoder_depths), list(decoder_depths)
        _check_architecture(widths, encoder_depths, decoder_depths, block_types, temporal_stages)
        if path is None and not random_init:
            raise ValueError(
                "vae.path is null: point it to Open-Sora's F32T4C128_AE.safetensors "
                "(random weights only with vae.random_init=true, for tests)"
            )
        if path is not None and not Path(path).exists():
            raise ValueError(f"Video DC-AE checkpoint {path!r} does not exist")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype: use float32, bfloat16 or float16")
        self.spatial_compression = 2 ** (len(widths) - 1)
        self.temporal_compression = 2 ** len(temporal_stages)
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.encode_tiles = self._tiles(tiling, tile_frames, tile_size, tile_overlap, encode=True)  # (time, space)
        self.decode_tiles = self._tiles(tiling, tile_frames, tile_size, tile_overlap, encode=False)
        self.args = dict(
            path=path,
            dtype=dtype,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latent_channels=latent_channels,
            widths=widths,
            encoder_depths=encoder_depths,
            decoder_depths=decoder_depths,
            block_types=block_types,
            temporal_stages=temporal_stages,
            head_dim=head_dim,
            tiling=tiling,
            tile_size=tile_size,
            tile_frames=tile_frames,
            tile_overlap=tile_overlap,
            random_init=random_init,
        )
        arch = (block_types, temporal_stages, latent_channels, head_dim)
        with torch.device("meta") if path is not None else nullcontext():  # weights come from the file
            self.encoder = Encoder(widths, encoder_depths, *arch)
            self.decoder = Decoder(widths, decoder_depths, *arch)
        if path is None:
            log.warning("Video DC-AE with RANDOM weights (path: null): for tests and demos only")
        else:
            strict_load(self, read_state_dict(path), f"Video DC-AE {path}")
        self.to(getattr(torch, dtype)).eval().requires_grad_(False)

    def _tiles(
        self, tiling: bool, frames: int | None, size: int | None, overlap: float, encode: bool
    ) -> tuple[AxisTiles | None, AxisTiles | None]:
        """(time, space) tiling of `encode` (pixels -> latents) or `decode` (latents -> pixels) in Open-Sora's
        numbers; None for a direction that is not tiled."""
        if not tiling:
            return None, None
        s, t = self.spatial_compression, self.temporal_compression
        if size is not None and (size < s or size % s):
            raise ValueError(f"tile_size={size} must be a positive multiple of the spatial factor {s}")
        if frames is not None and (frames < 2 * t or frames % t):
            raise ValueError(f"tile_frames={frames} must be a multiple of {t} and at least {2 * t}")
        if not 0 <= overlap < 1:
            raise ValueError(f"tile_overlap={overlap} must be in [0, 1)")
        out: list[AxisTiles | None] = []
        for pixels, factor in ((frames, t), (size, s)):
            if pixels is None:
                out.append(None)
                continue
            ends = (pixels, pixels // factor) if encode else (pixels // factor, pixels)
            out.append(axis_tiles(*ends, overlap))
        return out[0], out[1]

    def check_frames(self, num_frames: int) -> None:
        """Non-causal: 1 frame (an image) or a multiple of the temporal factor giving at least 2 latent frames."""
        t = self.temporal_compression
        if num_frames == 1 or (num_frames % t == 0 and num_frames >= 2 * t) or (t == 1 and num_frames >= 1):
            return
        above = max(2 * t, -(-num_frames // t) * t)
        raise ValueError(
            f"{num_frames} frames do not fit the Video DC-AE: use 1 (an image) or a multiple of {t} from {2 * t} "
            f"(e.g. {above}); {t} frames would give a 1-frame latent, which decodes as an image"
        )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a (frames, height, width) video."""
        self.check_frames(frames)
        s = self.spatial_compression
        if height < s or width < s or height % s or width % s:
            raise ValueError(f"video size {height}x{width} does not fit the Video DC-AE: use multiples of {s}")
        latent_frames = 1 if frames == 1 else frames // self.temporal_compression
        return self.latent_channels, latent_frames, height // s, width // s

    def _check_decode_tiles(self, latent_frames: int) -> None:
        """A temporal tile of one latent frame decodes to one frame (an image), not `temporal_compression`."""
        time = self.decode_tiles[0]
        if time is None or latent_frames <= time.tile:
            return
        last = tile_starts(latent_frames, time)[-1]
        if latent_frames - last == 1:
            raise ValueError(
                f"a latent of {latent_frames} frames cannot be decoded with temporal tiling: tiles of {time.tile} "
                f"latent frames every {time.stride} leave a last tile of 1 latent frame, which decodes as an image, "
                f"so the clip would come back {self.temporal_compression - 1} frames short (as in Open-Sora); decode "
                f"with vae.tile_frames=null, or use a latent length T' with (T' - 1) % {time.stride} != 0"
            )

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, T', H', W'), shifted and scaled, fp32."""
        self.latent_shape(*video.shape[-3:])
        x = video.to(next(self.parameters()).dtype)
        z = tiled(self.encoder, x, *self.encode_tiles).float()  # (B, C, T', H', W')
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, T', H', W') -> (B, 3, T, H, W) in about [-1, 1], fp32; a 1-frame latent gives 1 frame."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent of shape {tuple(z.shape)}: expected (B, {self.latent_channels}, T', H', W')")
        self._check_decode_tiles(z.shape[2])
        z = (z.float() / self.scaling_factor + self.shift_factor).to(next(self.parameters()).dtype)
        return tiled(self.decoder, z, *self.decode_tiles).float()  # (B, 3, T, H, W)

    @classmethod
    def latent_channels_of(cls, **kwargs: Any) -> int:
        """The latent channels of a config with these constructor arguments, without building it."""
        return constructor_args(cls, **kwargs)["latent_channels"]

    @classmethod
    def provenance(cls, **kwargs: Any) -> dict:
        """What a cache encoded with this VAE depends on (see `src.models.vae`); builds nothing, loads no weights."""
        args = constructor_args(cls, **kwargs)
        tiling = None
        if args["tiling"]:  # "layout": Open-Sora 2.0's placement and blending (caches of another layout are refused)
            tiling = {k: args[k] for k in ("tile_size", "tile_frames", "tile_overlap")} | {"layout": "open-sora-2.0"}
        return {
            "name": "dcae",
            "weights_sha256": weights_sha256(args["path"]) if args["path"] else None,
            "dtype": args["dtype"],
            "spatial_compression": 2 ** (len(args["widths"]) - 1),
            "temporal_compression": 2 ** len(args["temporal_stages"]),
            "latent_channels": args["latent_channels"],
            "scaling_factor": args["scaling_factor"],
            "shift_factor": args["shift_factor"],
            "tiling": tiling,
            "posterior": "deterministic",
            # random weights record no hash: the architecture at least must match
            "architecture": {
                k: args[k] if isinstance(args[k], int) else list(args[k])
                for k in ("widths", "encoder_depths", "decoder_depths", "block_types", "temporal_stages", "head_dim")
            },
        }

    def describe(self) -> dict:
        return self.provenance(**self.args)
