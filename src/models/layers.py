"""Building blocks of the MMDiT: embedders, RoPE, norms, modulation, double- and single-stream blocks.

Parameter names follow the released Open-Sora 2.0 MMDiT (see shared/reference), so its weights load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from src.models.attention import Attention

# ---------------------------------------------------------------------------------------------------------
# Positional and timestep embeddings
# ---------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0):
    """Sinusoidal embedding of flow time t in [0, 1] (scaled by 1000 as in FLUX / Open-Sora). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: torch.Tensor, axes_dim: list[int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of 3D RoPE.

    ids: (B, L, n_axes) integer positions (t, h, w); text tokens sit at position 0 on every axis.
    Returns (B, L, sum(axes_dim) // 2): one angle per rotated pair, axis after axis.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dim is {axes_dim}")
    parts = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        parts.append(ids[..., i, None].double() * omega)  # (B, L, dim/2)
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by `angles`. x: (B, L, H, D), angles: (B, L, D/2)."""
    cos = angles.cos()[:, :, None, :]  # (B, L, 1, D/2)
    sin = angles.sin()[:, :, None, :]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, L, H, D/2, 2)
    return out.flatten(-2).type_as(x)


def video_position_ids(batch: int, t: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(t, h, w) integer coordinates of each video token in patch units, row-major. Returns (B, t*h*w, 3)."""
    grid = torch.stack(
        torch.meshgrid(
            torch.arange(t, device=device),
            torch.arange(h, device=device),
            torch.arange(w, device=device),
            indexing="ij",
        ),
        dim=-1,
    )  # (t, h, w, 3)
    return grid.reshape(1, t * h * w, 3).expand(batch, -1, -1)


# ---------------------------------------------------------------------------------------------------------
# Small layers
# ---------------------------------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; embeds the timestep features and the pooled text vector."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned `scale`, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.scale.float()).type_as(x)


class QKNorm(nn.Module):
    """RMS norm of queries and keys per head (names match `norm.query_norm.scale`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


class Modulation(nn.Module):
    """adaLN: SiLU(vec) -> Linear -> n chunks of (shift, scale, gate), each (B, 1, hidden)."""

    def __init__(self, hidden: int, n_sets: int):
        super().__init__()
        self.n_chunks = 3 * n_sets
        self.lin = nn.Linear(hidden, self.n_chunks * hidden)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.lin(F.silu(vec))[:, None, :].chunk(self.n_chunks, dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm output scaled and shifted by adaLN. x: (B, L, C); shift, scale: (B, 1, C)."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


class SelfAttention(nn.Module):
    """q/k/v projections, RMS q/k norm and the output projection of one stream of a double block."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, C) -> q, k, v each (B, L, H, D), q and k normalised."""
        split = lambda y: rearrange(y, "b l (h d) -> b l h d", h=self.heads)
        q, k = self.norm(split(self.q_proj(x)), split(self.k_proj(x)))
        return q, k, split(self.v_proj(x))


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


def rotated_attention(q, k, v, angles: torch.Tensor, attend: Attention) -> torch.Tensor:
    """RoPE on q and k, attention, heads merged. q, k, v: (B, L, H, D) -> (B, L, H*D)."""
    out = attend(apply_rope(q, angles), apply_rope(k, angles), v)
    return rearrange(out, "b l h d -> b l (h d)")


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


class DoubleStreamBlock(nn.Module):
    """Separate weights for text and video tokens, joint attention over both."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool, attn_backend: str = "auto"):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.attention = Attention(attn_backend)
        self.img_mod = Modulation(hidden, n_sets=2)
        self.img_attn = SelfAttention(hidden, heads, qkv_bias)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, n_sets=2)
        self.txt_attn = SelfAttention(hidden, heads, qkv_bias)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor):
        """img: (B, Li, C), txt: (B, Lt, C), vec: (B, C), angles: (B, Lt + Li, D/2) -> (img, txt)."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv(modulate(img, i_shift1, i_scale1))  # (B, Li, H, D)
        tq, tk, tv = self.txt_attn.qkv(modulate(txt, t_shift1, t_scale1))  # (B, Lt, H, D)
        q, k, v = (torch.cat(pair, dim=1) for pair in ((tq, iq), (tk, ik), (tv, iv)))  # (B, Lt + Li, H, D)
        out = rotated_attention(q, k, v, angles, self.attention)  # (B, Lt + Li, C)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over the joint sequence; attention and MLP run in parallel from one input."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool, attn_backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.hidden = hidden
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.attention = Attention(attn_backend)
        self.q_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.v_mlp = nn.Linear(hidden, hidden + self.mlp_hidden, bias=qkv_bias)  # value and MLP input, fused
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.modulation = Modulation(hidden, n_sets=1)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """x: (B, L, C), vec: (B, C), angles: (B, L, D/2) -> (B, L, C)."""
        shift, scale, gate = self.modulation(vec)
        x_mod = modulate(x, shift, scale)
        split = lambda y: rearrange(y, "b l (h d) -> b l h d", h=self.heads)
        q, k = self.norm(split(self.q_proj(x_mod)), split(self.k_proj(x_mod)))  # (B, L, H, D)
        v, mlp = self.v_mlp(x_mod).split([self.hidden, self.mlp_hidden], dim=-1)
        attn = rotated_attention(q, k, split(v), angles, self.attention)  # (B, L, C)
        out = self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x + gate * out


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised projection back to patch values."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, C) each
        return self.linear(modulate(x, shift, scale))
