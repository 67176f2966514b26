"""Open-Sora-2.0-style video MMDiT: double-stream then single-stream blocks with 3D RoPE over (t, h, w).

The model predicts the flow velocity of a latent video. It knows nothing of distribution: sharding, sequence
parallelism and activation checkpointing are applied from `src/parallel/`.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from src.models.layers import (
    DoubleStreamBlock,
    FinalLayer,
    MLPEmbedder,
    SingleStreamBlock,
    rope_angles,
    timestep_embedding,
    video_position_ids,
)


def _zero_parameters(module: nn.Module) -> None:
    for param in module.parameters(recurse=False):
        nn.init.zeros_(param)


class MMDiT(nn.Module):
    """Text-to-video (and, with `cond_channels`, image-to-video) flow-matching transformer.

    Args:
        in_channels: latent channels of the VAE.
        patch_size: (pt, ph, pw) patch of latent voxels that becomes one token.
        hidden: model width; heads * head_dim, with head_dim == sum(axes_dim).
        txt_dim: width of the text encoder's token features; vec_dim: width of its pooled vector.
        cond_channels: channels of the I2V condition, cat(mask (1), masked latent (C)) in that order: 1 + C
            (`src.diffusion.condition`; None: no `cond_in`).
        attn_backend: "auto", "sdpa", "cudnn" or "flash" (see `src.models.attention`).
    """

    def __init__(
        self,
        in_channels: int = 16,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden: int = 3072,
        heads: int = 24,
        depth_double: int = 19,
        depth_single: int = 38,
        mlp_ratio: float = 4.0,
        axes_dim: tuple[int, ...] = (16, 56, 56),
        theta: float = 10000.0,
        txt_dim: int = 4096,
        vec_dim: int = 768,
        qkv_bias: bool = True,
        cond_channels: int | None = None,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        if sum(axes_dim) != hidden // heads:
            raise ValueError(f"sum(axes_dim)={sum(axes_dim)} must equal head_dim={hidden // heads}")
        self.in_channels = in_channels
        self.patch_size = tuple(patch_size)
        self.axes_dim = list(axes_dim)
        self.theta = theta
        patch_dim = in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        patch_voxels = patch_dim // in_channels

        self.img_in = nn.Linear(patch_dim, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(vec_dim, hidden)
        self.cond_in = nn.Linear(cond_channels * patch_voxels, hidden) if cond_channels else None
        self.txt_in = nn.Linear(txt_dim, hidden)
        block_args = dict(hidden=hidden, heads=heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(**block_args, attn_backend=attn_backend) for _ in range(depth_double)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(**block_args, attn_backend=attn_backend) for _ in range(depth_single)]
        )
        self.final_layer = FinalLayer(hidden, patch_dim)
        self.zero_init_()

    def zero_init_(self) -> None:
        """Zero the output projection (a fresh model predicts zero velocity) and the I2V condition input."""
        layers = [self.final_layer.linear] + ([self.cond_in] if self.cond_in is not None else [])
        for layer in layers:
            layer.apply(_zero_parameters)  # through Module.apply: a context that builds the model in pieces hooks it

    # -- patches --------------------------------------------------------------------------------------------

    def token_grid(self, latent_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """(t, h, w) token grid of a latent (B, C, T, H, W); a ValueError if it does not divide by the patch."""
        *_, T, H, W = latent_shape
        pt, ph, pw = self.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent (T, H, W)={(T, H, W)} is not divisible by patch_size={self.patch_size}")
        return T // pt, H // ph, W // pw

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, t*h*w, C*pt*ph*pw)."""
        pt, ph, pw = self.patch_size
        self.token_grid(x.shape)
        return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, t*h*w, C*pt*ph*pw) -> (B, C, T, H, W); exact inverse of `patchify`."""
        pt, ph, pw = self.patch_size
        t, h, w = grid
        return rearrange(
            tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
        )

    # -- forward --------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the velocity.

        x: (B, C, T, H, W) noisy latents; txt: (B, Lt, txt_dim) token features; vec: (B, vec_dim) pooled text;
        t: (B,) flow time in [0, 1]; cond: (B, cond_channels, T, H, W) I2V condition, mask first, or None (for a
        model with `cond_in`: the all-zero condition, text-to-video as trained).
        Returns (B, C, T, H, W).
        """
        B, text_len = x.shape[0], txt.shape[1]
        grid = self.token_grid(x.shape)
        txt_ids = torch.zeros(B, text_len, 3, device=x.device, dtype=torch.long)  # text sits at position 0
        ids = torch.cat([txt_ids, video_position_ids(B, *grid, device=x.device)], dim=1)  # (B, Lt + Li, 3)
        angles = rope_angles(ids, self.axes_dim, self.theta)  # (B, Lt + Li, head_dim / 2)

        dtype = self.img_in.weight.dtype  # inputs follow the weights (bf16 under mixed precision); t stays fp32
        img = self.img_in(self.patchify(x.to(dtype)))  # (B, Li, hidden)
        if cond is not None and self.cond_in is None:
            raise ValueError("a condition was given but the model was built with cond_channels=None")
        if self.cond_in is not None:  # no condition: text-to-video, the all-zero condition its t2v samples trained on
            patches = (
                self.patchify(cond.to(dtype))
                if cond is not None
                else img.new_zeros(*img.shape[:2], self.cond_in.in_features)
            )
            img = img + self.cond_in(patches)
        vec = self.time_in(timestep_embedding(t).to(dtype)) + self.vector_in(vec.to(dtype))  # (B, hidden)
        txt = self.txt_in(txt.to(dtype))  # (B, Lt, hidden)

        # Sequence parallelism (src/parallel/ulysses.py) cuts img and txt above into this rank's chunks, and the
        # angles of the whole sequence into theirs as each block is entered; the code below works on either.
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, angles)
        seq = torch.cat([txt, img], dim=1)  # (B, Lt + Li, hidden)
        for block in self.single_blocks:
            seq = block(seq, vec, angles)
        img = seq[:, txt.shape[1] :]  # (B, Li, hidden)
        return self.unpatchify(self.final_layer(img, vec), grid)  # (B, C, T, H, W)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
