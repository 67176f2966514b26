"""The HunyuanVideo causal 3D VAE (diffusers `AutoencoderKLHunyuanVideo`) behind Kiln's VAE interface.

Open-Sora 2.0 distributes it as one `hunyuan_vae.safetensors` whose names and shapes equal the state dict of
`AutoencoderKLHunyuanVideo()` with its default config; a diffusers directory (config.json + weights) loads too.
Either way every tensor is loaded strictly. Compression 4 x 8 x 8, 16 channels, causal: 4k+1 frames.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.models.provenance import constructor_args
from src.models.weights import read_state_dict, strict_load, weights_sha256

log = logging.getLogger("kiln.vae")
POSTERIORS = ("mode", "sample")


def _architecture(path: str | None, arch: dict[str, Any] | None) -> dict[str, Any]:
    """Constructor arguments of the diffusers class: its defaults, a directory's config.json, then `arch`."""
    config: dict[str, Any] = {}
    if path and Path(path).is_dir() and (Path(path) / "config.json").is_file():
        saved = json.loads((Path(path) / "config.json").read_text())
        config = {k: v for k, v in saved.items() if not k.startswith("_")}
    config.update(arch or {})
    return config


class HunyuanVAE(nn.Module):
    """Video (B, 3, 4k+1, H, W) in [-1, 1] <-> latent (B, 16, k+1, H/8, W/8), scaled by 0.476986.

    `path`: a `hunyuan_vae.safetensors` file or a diffusers directory. Random weights need `path: null` and
    `random_init: true` (tiny test models; recorded as `weights_sha256: null`, so such a cache never passes for
    the real VAE). `arch` overrides
    the diffusers config (tiny test models). `posterior`: `mode` (deterministic, the default for caches) or
    `sample`. Tiling (diffusers' own, spatial and temporal) is on by default with Open-Sora's sizes.
    """

    def __init__(
        self,
        path: str | None = None,
        dtype: str = "float32",
        scaling_factor: float = 0.476986,
        shift_factor: float = 0.0,
        posterior: str = "mode",
        tiling: bool = True,
        tile_size: int = 256,
        tile_stride: int = 192,
        tile_frames: int = 16,
        tile_frame_stride: int = 12,
        arch: dict[str, Any] | None = None,
        random_init: bool = False,
    ):
        super().__init__()
        from diffusers import AutoencoderKLHunyuanVideo

        if posterior not in POSTERIORS:
            raise ValueError(f"posterior={posterior!r}: use one of {POSTERIORS}")
        if path is None and not random_init:
            raise ValueError(
                "vae.path is null: point it to Open-Sora's hunyuan_vae.safetensors or a diffusers directory "
                "(random weights only with vae.random_init=true, for tests)"
            )
        if path is not None and not Path(path).exists():
            raise ValueError(f"HunyuanVideo VAE checkpoint {path!r} does not exist")
        self.args = dict(
            path=path,
            dtype=dtype,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            posterior=posterior,
            tiling=tiling,
            tile_size=tile_size,
            tile_stride=tile_stride,
            tile_frames=tile_frames,
            tile_frame_stride=tile_frame_stride,
            arch=arch,
            random_init=random_init,
        )
        self.vae = AutoencoderKLHunyuanVideo(**_architecture(path, arch))
        if path is None:
            log.warning("HunyuanVideo VAE with RANDOM weights (path: null): for tests only")
        else:
            strict_load(self.vae, read_state_dict(path), f"HunyuanVideo VAE {path}")
        if dtype != "float32":
            self.vae.to(getattr(torch, dtype))
        self.vae.eval().requires_grad_(False)
        if tiling:
            self.vae.enable_tiling(tile_size, tile_size, tile_frames, tile_stride, tile_stride, tile_frame_stride)
        else:
            self.vae.disable_tiling()
            self.vae.use_framewise_encoding = self.vae.use_framewise_decoding = False
        config = self.vae.config
        self.spatial_compression = config.spatial_compression_ratio
        self.temporal_compression = config.temporal_compression_ratio
        self.latent_channels = config.latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    @classmethod
    def provenance(cls, **kwargs: Any) -> dict:
        """What a cache encoded with this VAE depends on (see `src.models.vae`); reads no weights into memory."""
        args = constructor_args(cls, **kwargs)
        path = args["path"]
        config = _architecture(path, args["arch"])
        tiling = None
        if args["tiling"]:
            tiling = {k: args[k] for k in ("tile_size", "tile_stride", "tile_frames", "tile_frame_stride")}
        return {
            "name": "hunyuan",
            "weights_sha256": weights_sha256(path) if path else None,
            "dtype": args["dtype"],
            "spatial_compression": config.get("spatial_compression_ratio", 8),
            "temporal_compression": config.get("temporal_compression_ratio", 4),
            "latent_channels": config.get("latent_channels", 16),
            "scaling_factor": args["scaling_factor"],
            "shift_factor": args["shift_factor"],
            "tiling": tiling,
            "posterior": args["posterior"],
            "architecture": config,  # the diffusers config: random weights record no hash, so it must match
        }

    def describe(self) -> dict:
        return self.provenance(**self.args)

    def check_frames(self, num_frames: int) -> None:
        """Causal: the first frame is encoded alone, then groups of 4, so 4k+1 frames."""
        t = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % t:
            below = (num_frames - 1) // t * t + 1
            raise ValueError(
                f"{num_frames} frames do not fit the causal HunyuanVideo VAE: use {t}k+1 frames, "
                f"e.g. {max(below, 1)} or {below + t}"
            )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a (frames, height, width) video."""
        self.check_frames(frames)
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(f"video size {height}x{width} is not divisible by the HunyuanVideo VAE's factor {s}")
        return self.latent_channels, (frames - 1) // self.temporal_compression + 1, height // s, width // s

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 16, T', H', W'), shifted and scaled, fp32."""
        self.latent_shape(*video.shape[-3:])
        dist = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        z = dist.mode() if self.args["posterior"] == "mode" else dist.sample()
        return (z.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 16, T', H', W') -> (B, 3, T, H, W) in about [-1, 1], fp32."""
        z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()
