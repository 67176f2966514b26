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
from src.models.vae.posterior import check_posterior
from src.models.weights import read_state_dict, strict_load, weights_sha256

log = logging.getLogger("kiln.vae")


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
    the diffusers config (tiny test models). `posterior`: `mode` (deterministic) or `sample` (Open-Sora's
    training: `encode` samples, and a feature cache stores mean and std to sample per step, `src.models.vae.posterior`).
    `tiling`: diffusers' spatial tiling (256 px tiles every 192 px, blended over 64 px: Open-Sora's spatial tiling), on
    as in Open-Sora's stage configs. `temporal_tiling`: diffusers' framewise encoding and decoding (`tile_frames`
    frames every `tile_frame_stride`), off as in Open-Sora's stage configs; it bounds memory on long clips but changes
    the latents, so a cache made with it is not Open-Sora's.
    """

    def __init__(
        self,
        path: str | None = None,
        dtype: str = "float32",
        scaling_factor: float = 0.476986,
        shift_factor: float = 0.0,
        posterior: str = "mode",
        tiling: bool = True,
        temporal_tiling: bool = False,
        tile_size: int = 256,
        tile_stride: int = 192,
        tile_frames: int = 16,
        tile_frame_stride: int = 12,
        arch: dict[str, Any] | None = None,
        random_init: bool = False,
    ):
        super().__init__()
        from diffusers import AutoencoderKLHunyuanVideo

        check_posterior(posterior)
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
            temporal_tiling=temporal_tiling,
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
        self.vae.enable_tiling(tile_size, tile_size, tile_frames, tile_stride, tile_stride, tile_frame_stride)
        self.vae.use_tiling = tiling
        # diffusers encodes and decodes long clips framewise (temporal tiles) unless told not to
        self.vae.use_framewise_encoding = self.vae.use_framewise_decoding = temporal_tiling
        config = self.vae.config
        self.spatial_compression = config.spatial_compression_ratio
        self.temporal_compression = config.temporal_compression_ratio
        self.latent_channels = config.latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    @classmethod
    def latent_channels_of(cls, **kwargs: Any) -> int:
        """The latent channels of a config with these constructor arguments (its `arch`, or a diffusers
        directory's config.json), without building it or reading weights."""
        args = constructor_args(cls, **kwargs)
        return _architecture(args["path"], args["arch"]).get("latent_channels", 16)

    @classmethod
    def provenance(cls, **kwargs: Any) -> dict:
        """What a cache encoded with this VAE depends on (see `src.models.vae`); reads no weights into memory."""
        args = constructor_args(cls, **kwargs)
        path = args["path"]
        config = _architecture(path, args["arch"])
        spatial = {k: args[k] for k in ("tile_size", "tile_stride")} if args["tiling"] else None
        temporal = {k: args[k] for k in ("tile_frames", "tile_frame_stride")} if args["temporal_tiling"] else None
        tiling = {"spatial": spatial, "temporal": temporal} if spatial or temporal else None
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
            below = max((num_frames - 1) // t * t + 1, 1)  # the nearest valid counts: 1 and 5 for 0 frames
            raise ValueError(
                f"{num_frames} frames do not fit the causal HunyuanVideo VAE: use {t}k+1 frames, "
                f"e.g. {below} or {below + t}"
            )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a (frames, height, width) video."""
        self.check_frames(frames)
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(f"video size {height}x{width} is not divisible by the HunyuanVideo VAE's factor {s}")
        return self.latent_channels, (frames - 1) // self.temporal_compression + 1, height // s, width // s

    def _posterior(self, video: torch.Tensor) -> Any:
        """diffusers' DiagonalGaussianDistribution of a video (B, 3, T, H, W), its frame count and size checked."""
        self.latent_shape(*video.shape[-3:])
        return self.vae.encode(video.to(self.vae.dtype)).latent_dist

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 16, T', H', W'), shifted and scaled, fp32: the posterior's mode, or a
        sample from the global RNG with `posterior: sample`."""
        dist = self._posterior(video)
        z = dist.mode() if self.args["posterior"] == "mode" else dist.sample()
        return (z.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> the posterior's mean and std, each (B, 16, T', H', W') fp32 in latent units:
        (mean - shift) * scale and std * scale, so that mean + std * eps is a scaled sample."""
        dist = self._posterior(video)
        return (dist.mean.float() - self.shift_factor) * self.scaling_factor, dist.std.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 16, T', H', W') -> (B, 3, T, H, W) in about [-1, 1], fp32."""
        z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()
