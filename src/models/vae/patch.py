"""The lossless `patch` autoencoder: space-to-depth of pixels, its exact inverse, and a fixed affine scaling.

It has no weights, so the CPU demo and the tests need no VAE checkpoint; it shares the interface of the real
VAEs (HunyuanVideo, Video DC-AE): encode/decode, compression factors, channels, scaling/shift, frame rule.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from src.models.provenance import constructor_args


class PatchVAE(nn.Module):
    """Video (B, 3, T, H, W) in [-1, 1] <-> latent (B, 3*pt*ps*ps, T/pt, H/ps, W/ps).

    latent = (space_to_depth(video) - shift_factor) * scaling_factor; decode inverts it exactly.
    """

    def __init__(
        self,
        spatial: int = 4,
        temporal: int = 1,
        channels: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        if spatial < 1 or temporal < 1:
            raise ValueError(f"patch VAE factors must be >= 1, got spatial={spatial}, temporal={temporal}")
        self.spatial_compression = spatial
        self.temporal_compression = temporal
        self.channels = channels
        self.latent_channels = channels * temporal * spatial * spatial
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def check_frames(self, num_frames: int) -> None:
        """The frame-count rule: a multiple of the temporal factor."""
        if num_frames % self.temporal_compression:
            raise ValueError(
                f"{num_frames} frames do not fit the patch VAE: use a multiple of {self.temporal_compression}"
            )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the latent of a (frames, height, width) video."""
        self.check_frames(frames)
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(f"video size {height}x{width} is not divisible by the patch VAE's factor {s}")
        return self.latent_channels, frames // self.temporal_compression, height // s, width // s

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, C, T', H', W'), scaled."""
        self.latent_shape(*video.shape[-3:])
        s, pt = self.spatial_compression, self.temporal_compression
        z = rearrange(video, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=pt, ph=s, pw=s)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, T', H', W') -> (B, 3, T, H, W); decode(encode(x)) == x."""
        s, pt = self.spatial_compression, self.temporal_compression
        z = z / self.scaling_factor + self.shift_factor
        return rearrange(z, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)", pt=pt, ph=s, pw=s)

    @classmethod
    def latent_channels_of(cls, **kwargs: Any) -> int:
        """The latent channels of a config with these constructor arguments, without building it."""
        args = constructor_args(cls, **kwargs)
        return args["channels"] * args["temporal"] * args["spatial"] ** 2

    @classmethod
    def provenance(
        cls,
        spatial: int = 4,
        temporal: int = 1,
        channels: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> dict:
        """What a cache encoded with this VAE depends on (see `src.models.vae`)."""
        return {
            "name": "patch",
            "weights_sha256": None,
            "dtype": "float32",
            "spatial_compression": spatial,
            "temporal_compression": temporal,
            "latent_channels": cls.latent_channels_of(spatial=spatial, temporal=temporal, channels=channels),
            "scaling_factor": scaling_factor,
            "shift_factor": shift_factor,
            "tiling": None,
            "posterior": "exact",
        }

    def describe(self) -> dict:
        return self.provenance(
            self.spatial_compression, self.temporal_compression, self.channels, self.scaling_factor, self.shift_factor
        )
