"""The feature-shard format written by `src.preprocess` and read by `src.data.cached`.

A feature shard is a webdataset tar:

    __kiln__.json          the header: provenance (text encoder, VAE, buckets, Kiln version), statistics, count
    __kiln__.safetensors   the null (empty-prompt) text features: null_txt (L, D), null_vec (Dv)
    <key>.safetensors      latent (C, T', H', W'), txt (L, D), vec (Dv); with `vae.posterior: sample` latent is
                           the posterior's mean and latent_std (C, T', H', W') its std (both in latent units)
                           for an I2V recipe (header storage.cond_images) also image_head / image_tail
                           (C, 1, H', W'): the clip's first / last frame encoded alone (src/diffusion/condition.py)
    <key>.json             caption, bucket, source shard and key

The header comes first, so a reader streaming the tar checks the provenance before it reads any feature.
Beside each tar, `<name>.json` repeats the header with the list of samples and the skipped ones; it is
written last, so its presence marks a finished shard (what makes preprocessing resumable).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

HEADER_KEY = "__kiln__"
FORMAT_VERSION = 1


def sidecar_path(tar_path: str | Path) -> Path:
    return Path(tar_path).with_suffix(".json")


def tensor_stats(tensor: torch.Tensor) -> dict[str, float | int]:
    """mean, std, min, max over the finite values, and the count of non-finite ones."""
    values = tensor.detach().float().flatten()
    finite = values[torch.isfinite(values)]
    stats: dict[str, float | int] = {"count": values.numel(), "nonfinite": int(values.numel() - finite.numel())}
    if finite.numel():
        stats["mean"], stats["std"] = finite.mean().item(), finite.std(unbiased=False).item()
        stats["min"], stats["max"] = finite.min().item(), finite.max().item()
    return stats


def merge_stats(parts: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Combine `tensor_stats` of disjoint parts (weighted means and variances)."""
    parts = [p for p in parts if p.get("count")]
    if not parts:
        return {"count": 0, "nonfinite": 0}
    finite = [(p["count"] - p["nonfinite"], p) for p in parts if "mean" in p]
    total = sum(n for n, _ in finite)
    merged: dict[str, float | int] = {
        "count": sum(p["count"] for p in parts),
        "nonfinite": sum(p["nonfinite"] for p in parts),
    }
    if total:
        mean = sum(n * p["mean"] for n, p in finite) / total
        var = sum(n * (p["std"] ** 2 + (p["mean"] - mean) ** 2) for n, p in finite) / total
        merged.update(
            mean=mean, std=var**0.5, min=min(p["min"] for _, p in finite), max=max(p["max"] for _, p in finite)
        )
    return merged


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_feature_shard(
    path: str | Path,
    header: Mapping[str, Any],
    null: Mapping[str, torch.Tensor],
    samples: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, Any]]],
    sidecar: Mapping[str, Any],
) -> None:
    """Write the tar atomically (a temporary name, then rename), then its sidecar: a crash leaves no half shard."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, f"{HEADER_KEY}.json", json.dumps({"format": FORMAT_VERSION, **header}).encode())
        _add(tar, f"{HEADER_KEY}.safetensors", save_tensors({k: v.contiguous() for k, v in null.items()}))
        for key, tensors, meta in samples:
            _add(tar, f"{key}.safetensors", save_tensors({k: v.contiguous() for k, v in tensors.items()}))
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    tmp.replace(path)
    side_tmp = sidecar_path(path).with_name(f".{path.stem}.{os.getpid()}.json.tmp")
    side_tmp.write_text(json.dumps({"format": FORMAT_VERSION, **header, **sidecar}, indent=1))
    side_tmp.replace(sidecar_path(path))


def index_tar(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (offset, size)} of a local tar, from its headers only."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isreg() and "." in info.name:
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = (info.offset_data, info.size)
    return members
