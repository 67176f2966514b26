"""What a feature cache was made with, and the check that it matches the run that wants to use it.

A cache holds the outputs of a text encoder and a VAE on clips cut a certain way. Features from another encoder,
weights, architecture, dtype, max length, mask convention, VAE scaling or tiling, or from clips taken at another
fps, frame stride or crop, look like valid tensors and train a model that generates garbage (or moves at the wrong
speed), so every feature shard records its provenance and a run refuses shards whose provenance differs from what
its own config would produce, naming the field and both values. Each section is a plain dict of settings: a new
setting that changes the features is checked as soon as the encoder (or ClipOptions) records it.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

from omegaconf import DictConfig

from src.models.provenance import config_provenance

CHECKED = ("text", "vae", "clips")  # the sections that change the features; the rest (source, seed) is a record


class ProvenanceError(ValueError):
    """A cache made with other encoders or clip settings than the run's: never skipped, always fatal."""


def kiln_version() -> str:
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def expected_provenance(
    text: DictConfig | Mapping, vae: DictConfig | Mapping, clips: Mapping[str, Any]
) -> dict[str, Any]:
    """The provenance a run's encoder configs and clip settings (`ClipOptions.provenance()`) would record, computed
    without loading a model."""
    return {"text": config_provenance(text), "vae": config_provenance(vae), "clips": dict(clips)}


def mismatches(found: Any, expected: Any, path: str = "") -> list[str]:
    """'field: cache has X, this run has Y' for every differing leaf (dicts compared key by key)."""
    if isinstance(found, Mapping) and isinstance(expected, Mapping):
        out = []
        for key in sorted(set(found) | set(expected), key=str):
            out += mismatches(found.get(key), expected.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(found, list | tuple) and isinstance(expected, list | tuple):
        found, expected = list(found), list(expected)
    return [] if found == expected else [f"{path}: the cache has {found!r}, this run's config gives {expected!r}"]


def check_provenance(found: Mapping, expected: Mapping, where: str) -> None:
    """Raise ValueError listing every checked field of `found` that differs from `expected`."""
    problems = [line for section in CHECKED for line in mismatches(found.get(section), expected[section], section)]
    if problems:
        raise ProvenanceError(
            f"{where} was made with other encoders or clip settings than this run uses; its features would be "
            "silently wrong:\n  "
            + "\n  ".join(problems)
            + "\nRe-run `src.preprocess` with this config into a new directory, or point the run at the right cache."
        )
