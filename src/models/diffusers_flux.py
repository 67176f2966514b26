"""Kiln's MMDiT <-> diffusers' `FluxTransformer2DModel`: the same architecture with (t, h, w) position ids.

The Open-Sora 2.0 MMDiT is FLUX with a third RoPE axis. diffusers names every projection separately, so the
mapping is one-to-one except for two places where a silent mistake would still load and give blurry video:

- the single-stream block: Kiln fuses the value and the MLP input (`v_mlp`, rows [value | MLP]); diffusers has
  `attn.to_v` and `proj_mlp`;
- the final layer: Kiln's adaLN gives (shift, scale); diffusers' `AdaLayerNormContinuous` reads (scale, shift), so
  the two halves of `norm_out.linear` are swapped.

diffusers takes already-patchified tokens: feed it `model.patchify(x)` with `img_ids` from
`video_position_ids` and zero `txt_ids`, and `model.unpatchify` its output (`diffusers_forward`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from src.models.layers import video_position_ids


def flux_config(model_cfg: dict) -> dict:
    """`FluxTransformer2DModel(**config)` arguments for a Kiln model config; ValueError for a model it cannot hold."""
    unsupported = {
        "cond_channels": model_cfg.get("cond_channels") is not None,  # the I2V input has no diffusers counterpart
        "qkv_bias": not model_cfg.get("qkv_bias", True),
        "mlp_ratio": float(model_cfg.get("mlp_ratio", 4.0)) != 4.0,
        "theta": float(model_cfg.get("theta", 10000.0)) != 10000.0,
    }
    bad = [f"{k}={model_cfg.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(
            "FluxTransformer2DModel holds text-to-video MMDiTs with cond_channels null, qkv_bias true, mlp_ratio 4 "
            f"and theta 10000; this model has {', '.join(bad)}"
        )
    pt, ph, pw = model_cfg["patch_size"]
    patch_dim = model_cfg["in_channels"] * pt * ph * pw
    return {
        "patch_size": 1,  # diffusers gets Kiln's patchified tokens
        "in_channels": patch_dim,
        "out_channels": patch_dim,
        "num_layers": model_cfg["depth_double"],
        "num_single_layers": model_cfg["depth_single"],
        "attention_head_dim": model_cfg["hidden"] // model_cfg["heads"],
        "num_attention_heads": model_cfg["heads"],
        "joint_attention_dim": model_cfg["txt_dim"],
        "pooled_projection_dim": model_cfg["vec_dim"],
        "guidance_embeds": False,
        "axes_dims_rope": tuple(model_cfg["axes_dim"]),
    }


# Kiln name (regex) -> diffusers name, for every one-to-one tensor.
_RENAMES = [
    (r"img_in\.", "x_embedder."),
    (r"txt_in\.", "context_embedder."),
    (r"time_in\.in_layer\.", "time_text_embed.timestep_embedder.linear_1."),
    (r"time_in\.out_layer\.", "time_text_embed.timestep_embedder.linear_2."),
    (r"vector_in\.in_layer\.", "time_text_embed.text_embedder.linear_1."),
    (r"vector_in\.out_layer\.", "time_text_embed.text_embedder.linear_2."),
    (r"double_blocks\.(\d+)\.img_mod\.lin\.", r"transformer_blocks.\1.norm1.linear."),
    (r"double_blocks\.(\d+)\.txt_mod\.lin\.", r"transformer_blocks.\1.norm1_context.linear."),
    (r"double_blocks\.(\d+)\.img_attn\.([qkv])_proj\.", r"transformer_blocks.\1.attn.to_\2."),
    (r"double_blocks\.(\d+)\.txt_attn\.([qkv])_proj\.", r"transformer_blocks.\1.attn.add_\2_proj."),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
    (r"double_blocks\.(\d+)\.txt_attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
    (r"double_blocks\.(\d+)\.img_mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"double_blocks\.(\d+)\.img_mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"double_blocks\.(\d+)\.txt_mlp\.0\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
    (r"double_blocks\.(\d+)\.txt_mlp\.2\.", r"transformer_blocks.\1.ff_context.net.2."),
    (r"single_blocks\.(\d+)\.([qk])_proj\.", r"single_transformer_blocks.\1.attn.to_\2."),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.proj_out."),
    (r"single_blocks\.(\d+)\.modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear."),
    (r"final_layer\.linear\.", "proj_out."),
]


def _rename(name: str) -> str | None:
    for pattern, target in _RENAMES:
        new, n = re.subn("^" + pattern, target, name)
        if n:
            return new
    return None


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the output dimension."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Kiln state dict -> FluxTransformer2DModel state dict. ValueError listing any key it does not know."""
    out, unknown = {}, []
    for name, tensor in state.items():
        single = re.match(r"single_blocks\.(\d+)\.v_mlp\.(weight|bias)$", name)
        if single:  # rows [value | MLP input]
            i, kind = single.groups()
            out[f"single_transformer_blocks.{i}.attn.to_v.{kind}"] = tensor[:hidden].clone()
            out[f"single_transformer_blocks.{i}.proj_mlp.{kind}"] = tensor[hidden:].clone()
        elif name.startswith("final_layer.adaLN_modulation.1."):
            out["norm_out.linear." + name.rsplit(".", 1)[1]] = _swap_halves(tensor)
        elif (new := _rename(name)) is not None:
            out[new] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"no diffusers name for: {', '.join(sorted(unknown))}")
    return out


def from_diffusers(
    state: dict[str, torch.Tensor], kiln_names: list[str], strict: bool = True
) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel state dict -> Kiln state dict with the keys `kiln_names` (the model's own): the exact
    inverse of `to_diffusers`. Strict: ValueError listing the diffusers keys that are missing or left over. Not
    strict (`init_from`, where declared transition rules decide): what maps is renamed, what does not is kept
    under its diffusers name, and a Kiln key with nothing to map from is simply absent."""
    out, used, missing = {}, set(), []
    for name in kiln_names:
        single = re.match(r"single_blocks\.(\d+)\.v_mlp\.(weight|bias)$", name)
        if single:
            i, kind = single.groups()
            parts = [
                f"single_transformer_blocks.{i}.attn.to_v.{kind}",
                f"single_transformer_blocks.{i}.proj_mlp.{kind}",
            ]
        elif name.startswith("final_layer.adaLN_modulation.1."):
            parts = ["norm_out.linear." + name.rsplit(".", 1)[1]]
        else:
            parts = [_rename(name) or f"(no diffusers name for {name})"]
        absent = [p for p in parts if p not in state]
        if absent:
            missing += absent
            continue
        used.update(parts)
        if single:
            out[name] = torch.cat([state[p] for p in parts], dim=0)
        elif name.startswith("final_layer.adaLN_modulation.1."):
            out[name] = _swap_halves(state[parts[0]])
        else:
            out[name] = state[parts[0]]
    extra = sorted(set(state) - used)
    if not strict:
        return {**out, **{k: state[k] for k in extra}}
    if missing or extra:
        raise ValueError(
            f"diffusers checkpoint does not map onto the model: missing {missing[:20]}, unexpected {extra[:20]}"
        )
    return out


def diffusers_forward(flux, model, x, txt, vec, t) -> torch.Tensor:
    """Run a FluxTransformer2DModel on Kiln's inputs: patchify, (t, h, w) img_ids, zero txt_ids, unpatchify."""
    grid = model.token_grid(x.shape)
    img_ids = video_position_ids(1, *grid, device=x.device)[0].float()  # (Li, 3)
    txt_ids = torch.zeros(txt.shape[1], 3, device=x.device)
    out = flux(
        hidden_states=model.patchify(x),
        encoder_hidden_states=txt,
        pooled_projections=vec,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]
    return model.unpatchify(out, grid)


def is_diffusers_flux(path: str | Path) -> bool:
    """A diffusers FluxTransformer2DModel folder (config.json naming the class, safetensors beside it)."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"
