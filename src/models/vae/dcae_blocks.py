"""Building blocks of the Video DC-AE (Deep Compression Autoencoder, video variant of Open-Sora 2.0).

Every block works on (B, C, T, H, W) tensors with non-causal 3D convolutions (zero padding on every side). The
attribute names (`op_list`, `main`, `shortcut`, `conv`, `norm`, `context_module`, `aggreg`, ...) are those of the
released checkpoint, so that `F32T4C128_AE.safetensors` loads strictly; the code is Kiln's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_MAX_NUMEL = 2**31 - 1  # kernels index with int32 beyond this


class RMSNorm3d(nn.Module):
    """RMS norm over channels of a (B, C, T, H, W) tensor (statistics in fp32), then a per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        mean_square = x.float().square().mean(dim=1, keepdim=True)
        x = (x / torch.sqrt(mean_square + self.eps)).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


class ConvLayer(nn.Module):
    """3D convolution ('same' zero padding, odd kernel), then an optional RMS norm and SiLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
        groups: int = 1,
        bias: bool = True,
        norm: bool = False,
        act: bool = False,
    ):
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias
        )
        self.norm = RMSNorm3d(out_channels) if norm else None
        self.act = nn.SiLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, C_out, T', H', W')
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequence(nn.Module):
    """Modules applied in order, kept in `op_list` (the checkpoint's name for stages and heads)."""

    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """main(x) + shortcut(x); the shortcut is the identity unless given (a parameter-free resampling)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class ResBlock(nn.Module):
    """conv3x3x3 (bias) -> SiLU -> conv3x3x3 (no bias) -> RMS norm; wrapped in a `Residual` by its stage."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=True)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))  # (B, C, T, H, W)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention over all T*H*W positions of a clip.

    q, k, v come from a 1x1x1 conv; each `aggreg` branch (depthwise s x s x s conv, then a 1x1x1 conv grouped per
    head and q/k/v) adds another set of heads computed from a local neighbourhood. Per head:
    out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), with q, k after ReLU. Computed in fp32.
    """

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,), eps: float = 1e-15):
        super().__init__()
        heads = channels // head_dim
        if heads < 1:
            raise ValueError(f"LiteMLA on {channels} channels needs head_dim <= {channels}, got {head_dim}")
        self.head_dim = head_dim
        self.eps = eps
        inner = heads * head_dim
        self.qkv = ConvLayer(channels, 3 * inner, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(3 * inner, 3 * inner, s, padding=s // 2, groups=3 * inner, bias=False),
                nn.Conv3d(3 * inner, 3 * inner, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.proj = ConvLayer(inner * (1 + len(scales)), channels, 1, bias=False, norm=True)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, G*3*d, T, H, W), G heads laid out as [q | k | v] blocks of d channels -> (B, G*d, T, H, W)."""
        _, _, t, h, w = qkv.shape
        qkv = rearrange(qkv.float(), "b (g c) t h w -> b g c (t h w)", c=3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=2)  # each (B, G, d, N)
        q, k = F.relu(q), F.relu(k)
        kv = torch.einsum("bgdn,bgen->bgde", v, k)  # (B, G, d_v, d_k)
        numerator = torch.einsum("bgde,bgen->bgdn", kv, q)  # (B, G, d_v, N)
        denominator = torch.einsum("bge,bgen->bgn", k.sum(dim=-1), q).unsqueeze(2)  # (B, G, 1, N)
        out = numerator / (denominator + self.eps)
        return rearrange(out, "b g d (t h w) -> b (g d) t h w", t=t, h=h, w=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        qkv = self.qkv(x)  # (B, 3*inner, T, H, W)
        qkv = torch.cat([qkv, *(branch(qkv) for branch in self.aggreg)], dim=1)  # (B, 3*inner*(1+S), T, H, W)
        out = self.attend(qkv).to(x.dtype)  # (B, inner*(1+S), T, H, W)
        return self.proj(out)  # (B, C, T, H, W)


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1x1 conv (SiLU) to 2*mid, depthwise 3x3x3, x * SiLU(gate), 1x1x1 conv + RMS."""

    def __init__(self, channels: int, expand_ratio: float = 4.0):
        super().__init__()
        mid = round(channels * expand_ratio)
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, act=True)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, bias=True)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        x = self.depth_conv(self.inverted_conv(x))  # (B, 2*mid, T, H, W)
        x, gate = x.chunk(2, dim=1)
        return self.point_conv(x * F.silu(gate))  # (B, C, T, H, W)


class EfficientViTBlock(nn.Module):
    """LiteMLA (global context) then GLUMBConv (local mixing), each with an identity shortcut."""

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,)):
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, head_dim, scales))
        self.local_module = Residual(GLUMBConv(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))  # (B, C, T, H, W)


BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")


def build_block(block_type: str, channels: int, head_dim: int) -> nn.Module:
    """One block of a stage by its Open-Sora name: `ResBlock`, `EViT_GLU` (no aggregation), `EViTS5_GLU` (5^3)."""
    if block_type == "ResBlock":
        return Residual(ResBlock(channels))
    if block_type == "EViT_GLU":
        return EfficientViTBlock(channels, head_dim, scales=())
    if block_type == "EViTS5_GLU":
        return EfficientViTBlock(channels, head_dim, scales=(5,))
    raise ValueError(f"block type {block_type!r} is unknown: use one of {BLOCK_TYPES}")


def space_to_channels(x: torch.Tensor, temporal: bool) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*[2]*2*2, T[/2], H/2, W/2), channel order (c, rt, rh, rw)."""
    if temporal:
        return rearrange(x, "b c (t rt) (h rh) (w rw) -> b (c rt rh rw) t h w", rt=2, rh=2, rw=2)
    return rearrange(x, "b c t (h rh) (w rw) -> b (c rh rw) t h w", rh=2, rw=2)


def channels_to_space(x: torch.Tensor, temporal: bool) -> torch.Tensor:
    """The inverse of `space_to_channels`."""
    if temporal:
        return rearrange(x, "b (c rt rh rw) t h w -> b c (t rt) (h rh) (w rw)", rt=2, rh=2, rw=2)
    return rearrange(x, "b (c rh rw) t h w -> b c t (h rh) (w rw)", rh=2, rw=2)


class AveragingShortcut(nn.Module):
    """Parameter-free downsampling shortcut: space-to-channels by `factor` (1 or 2), then the mean of each group
    of consecutive channels down to `out_channels`. Time is folded in too when `temporal` and T > 1."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, temporal: bool = False):
        super().__init__()
        self.out_channels, self.factor, self.temporal = out_channels, factor, temporal
        for folded in (in_channels * factor**2, in_channels * factor ** (3 if temporal else 2)):
            if folded % out_channels:
                raise ValueError(f"averaging shortcut: {folded} channels do not split into {out_channels} groups")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        if self.factor == 2:
            x = space_to_channels(x, self.temporal and x.shape[2] > 1)  # (B, C*r, T', H/2, W/2)
        x = rearrange(x, "b (c g) t h w -> b c g t h w", c=self.out_channels)
        return x.mean(dim=2)  # (B, C_out, T', H', W')


class DuplicatingShortcut(nn.Module):
    """Parameter-free upsampling shortcut: repeat each channel, then channels-to-space by `factor` (1 or 2); time
    is unfolded too when `temporal` and T > 1."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, temporal: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.factor, self.temporal = in_channels, out_channels, factor, temporal
        for unfolded in (out_channels * factor**2, out_channels * factor ** (3 if temporal else 2)):
            if unfolded % in_channels:
                raise ValueError(f"duplicating shortcut: {unfolded} channels are no multiple of {in_channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        temporal = self.temporal and x.shape[2] > 1
        spread = 1 if self.factor == 1 else (8 if temporal else 4)
        x = x.repeat_interleave(self.out_channels * spread // self.in_channels, dim=1)  # (B, C_out*r, T, H, W)
        return channels_to_space(x, temporal) if self.factor == 2 else x  # (B, C_out, T', H', W')


def downsample_block(in_channels: int, out_channels: int, temporal: bool) -> Residual:
    """Strided 3x3x3 conv (stride 2 in H and W, and T when `temporal`) plus the averaging shortcut.

    A 1-frame input (an image) keeps T = 1: the strided conv leaves it, and the shortcut folds space only.
    """
    conv = ConvLayer(in_channels, out_channels, 3, stride=(2 if temporal else 1, 2, 2), bias=True)
    return Residual(conv, AveragingShortcut(in_channels, out_channels, 2, temporal))


class InterpolateConv(nn.Module):
    """Nearest-neighbour upsampling by 2 (in T too when `temporal` and T > 1), then a 3x3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = ConvLayer(in_channels, out_channels, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        scale = (2 if self.temporal and x.shape[2] > 1 else 1, 2, 2)
        out_numel = x.numel() * scale[0] * 4
        chunks = max(1, -(-out_numel // _MAX_NUMEL))  # split channels so each interpolation stays int32-indexable
        x = torch.cat([F.interpolate(c, scale_factor=scale, mode="nearest") for c in x.chunk(chunks, dim=1)], dim=1)
        return self.conv(x)  # (B, C_out, T', 2H, 2W)


def upsample_block(in_channels: int, out_channels: int, temporal: bool) -> Residual:
    """Interpolation + conv plus the duplicating shortcut: the decoder's mirror of `downsample_block`."""
    main = InterpolateConv(in_channels, out_channels, temporal)
    return Residual(main, DuplicatingShortcut(in_channels, out_channels, 2, temporal))
