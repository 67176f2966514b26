"""Fixed-prompt evaluation with an image (`eval.images`): each entry's I2V condition, checked and encoded at setup.

An entry is {prompt, image, type, tail}: `image` (a PNG/JPEG/WebP file, or a video whose first frame is taken) is the
first frame for `type: i2v_head` (the default), the last for `i2v_tail`, the first for `i2v_loop`, whose last frame
is `tail` (default: the same image, a loop back to it). Every rank encodes the images with the run's VAE once, so
every rank can take part in each evaluation's forwards; the sampling itself is `sampling.sample_prompts`, the
path `python -m src.sample --image` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from src.diffusion.condition import COND_TYPES
from src.evaluation.sampling import encode_condition

ENTRY_KEYS = ("prompt", "image", "type", "tail")
I2V_TYPES = tuple(name for name in COND_TYPES if name != "t2v")


@dataclass(frozen=True)
class EvalImage:
    """One `eval.images` entry, ready to sample: its prompt, condition type and condition (1, 1 + C, T', H', W')."""

    prompt: str
    cond_type: str
    cond: torch.Tensor


def entry_files(index: int, entry: dict) -> tuple[str, str, list[Path]]:
    """(prompt, type, image files head first) of `eval.images[index]`; ValueError naming a bad key, type or path."""
    where = f"eval.images[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping with keys {list(ENTRY_KEYS)}, got {entry!r}")
    if unknown := sorted(set(entry) - set(ENTRY_KEYS)):
        raise ValueError(f"{where}: unknown keys {unknown}; an entry has {list(ENTRY_KEYS)}")
    for key in ("prompt", "image"):
        if not entry.get(key):
            raise ValueError(f"{where} needs {key!r}, got {entry}")
    cond_type = entry.get("type") or "i2v_head"
    if cond_type not in I2V_TYPES:
        raise ValueError(f"{where}.type is {cond_type!r}; valid: {list(I2V_TYPES)}")
    if entry.get("tail") and cond_type != "i2v_loop":
        raise ValueError(f"{where}.tail {entry['tail']!r} is only for type i2v_loop, not {cond_type}")
    files = [Path(entry["image"])] + ([Path(entry["tail"])] if entry.get("tail") else [])
    for path in files:
        if not path.is_file():
            raise ValueError(f"{where}: image file {str(path)!r} not found (from {Path.cwd()})")
    return str(entry["prompt"]), cond_type, files


def eval_images(
    entries: list[dict], vae, latent_shape: tuple[int, ...], channels: int | None, device: torch.device | str
) -> list[EvalImage]:
    """The entries' conditions for samples of `latent_shape` (C, T', H', W'). channels: what the model's cond_in takes
    per latent voxel (`cond_channels`); ValueError unless it is 1 + C when there are entries."""
    if entries and channels != 1 + latent_shape[0]:
        has = "has no cond_in" if channels is None else f"has a cond_in taking {channels}"
        raise ValueError(
            f"eval.images ({len(entries)}, the first {str(dict(entries[0]).get('image'))!r}) needs a model trained "
            f"with image conditions, cond_in taking 1 + {latent_shape[0]} channels; this model {has} "
            f"(model.cond_channels, diffusion.cond)"
        )
    images = []
    for index, entry in enumerate(entries):
        prompt, cond_type, files = entry_files(index, entry)
        with torch.no_grad():
            cond = encode_condition(vae, latent_shape, files, cond_type, device)  # (1, 1 + C, T', H', W')
        images.append(EvalImage(prompt, cond_type, cond))
    return images
