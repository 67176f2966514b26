"""Provenance of encoder configs: what features made by an encoder depend on, computed without building it.

Every encoder class (text encoders and VAEs) has a classmethod `provenance(**constructor_args) -> dict`, so a
cache can be checked against a run's config without loading any weights.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf


def config_provenance(node: DictConfig | dict) -> dict[str, Any]:
    """The provenance an encoder config (a Hydra node with `_target_`) would record, without building it."""
    args = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    cls = get_class(args.pop("_target_"))
    args.pop("_partial_", None)
    return cls.provenance(**args)


def constructor_args(cls: type, **kwargs: Any) -> dict[str, Any]:
    """Every constructor argument of `cls`, the given ones over the defaults (unknown names raise TypeError).

    Hydra config nodes among them (an `arch` dict passed by `instantiate`) become plain dicts and lists, so
    that a provenance built from them can be written as JSON.
    """
    bound = inspect.signature(cls.__init__).bind(None, **kwargs)
    bound.apply_defaults()
    return {k: _plain(v) for k, v in bound.arguments.items() if k != "self"}


def _plain(value: Any) -> Any:
    """A Hydra DictConfig / ListConfig as plain Python containers; anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
