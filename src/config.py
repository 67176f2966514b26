"""Config values derived from other config, and a model config read outside Hydra.

`conf/model/*.yaml` state `in_channels: ${latent_channels:${vae}}`: the model's input channels follow the chosen
VAE (its `_target_` class computes them from the same constructor arguments, without building it), so an experiment
that swaps the VAE states only the VAE. Importing `src` registers the resolver (`src/__init__.py`), so every entry
point, `hydra.compose` and test sees it; a run directory's `config.yaml` is written resolved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def vae_latent_channels(vae: DictConfig | dict) -> int:
    """The latent channels a VAE config (a node with `_target_`) gives, without building the VAE."""
    from hydra.utils import get_class  # here: importing `src` (which registers this resolver) stays light

    args = OmegaConf.to_container(vae, resolve=True) if isinstance(vae, DictConfig) else dict(vae)
    target = args.pop("_target_", None)
    if target is None:
        raise ValueError(f"${{latent_channels:...}} needs a VAE config with a _target_, got keys {sorted(args)}")
    args.pop("_partial_", None)
    return get_class(target).latent_channels_of(**args)


def register_resolvers() -> None:
    """Register Kiln's OmegaConf resolvers once (importing `src` does it)."""
    if not OmegaConf.has_resolver("latent_channels"):
        OmegaConf.register_new_resolver("latent_channels", vae_latent_channels)


def model_config(model: str, vae: str) -> dict[str, Any]:
    """`conf/model/<model>.yaml` as MMDiT keyword arguments, its interpolations resolved with `conf/vae/<vae>.yaml`
    (for tools and tests that build a model without composing a whole run)."""
    vae_cfg = OmegaConf.load(CONF / "vae" / f"{vae}.yaml")  # one without a defaults list (patch, hunyuan, dcae)
    cfg = OmegaConf.create({"vae": vae_cfg, "model": OmegaConf.load(CONF / "model" / f"{model}.yaml")})
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs.pop("_target_")
    return kwargs
