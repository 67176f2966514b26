"""Video autoencoders behind one small interface (patch, hunyuan, dcae).

Every VAE class has:
- `spatial_compression`, `temporal_compression`, `latent_channels`, `scaling_factor`, `shift_factor`;
- `check_frames(n)` (the frame-count rule: raise ValueError naming n and what would be valid) and
  `latent_shape(frames, height, width) -> (C, T', H', W')`;
- `encode(video (B, 3, T, H, W) in [-1, 1]) -> latent (B, C, T', H', W')`, already shifted and scaled:
  latent = (z - shift_factor) * scaling_factor; `decode` inverts it. Tiling (spatial and temporal) is a
  constructor setting and is recorded;
- `provenance(**constructor_args) -> dict` (a classmethod: computable from a config without building the model,
  so a cache can be checked without loading weights) and `describe()`, the same dict for a built instance. The
  dict holds `name`, `weights_sha256` (None without weights), `dtype`, `scaling_factor`, `shift_factor`,
  `spatial_compression`, `temporal_compression`, `latent_channels`, `tiling` and `posterior`.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf


def config_provenance(node: DictConfig | dict) -> dict[str, Any]:
    """The provenance an encoder config (a Hydra node with `_target_`) would record, without building it."""
    args = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    cls = get_class(args.pop("_target_"))
    args.pop("_partial_", None)
    return cls.provenance(**args)


def constructor_args(cls: type, **kwargs: Any) -> dict[str, Any]:
    """Every constructor argument of `cls`, the given ones over the defaults (unknown names raise TypeError)."""
    bound = inspect.signature(cls.__init__).bind(None, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}
