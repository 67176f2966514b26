"""Reading checkpoints, hashing them, and loading them strictly.

The field's worst silent failure is a `strict=False` load that leaves weights at their random init (black or noisy
videos after weeks of training). Every pretrained encoder in Kiln is loaded through `strict_load`: each tensor of
the checkpoint must land in the model and each parameter of the model must come from the checkpoint, shapes equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Container
from pathlib import Path

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HASH_CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "weights_sha256.json"
_LIST_MAX = 20  # keys listed per category in an error


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: the file itself, or every weight file in a directory (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    files = safetensors or files  # transformers directories often hold both formats of the same weights
    if not files:
        raise ValueError(f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) in {str(path)!r}")
    return files


def read_state_dict(path: str | Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or directory, on the CPU, but those under the `skip` key prefixes.

    Skipped tensors are never read (safetensors are opened lazily, pickles memory-mapped), so dropping the decoder
    half of a 45 GB T5 checkpoint costs no memory. A corrupt file raises naming it.
    """
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    part = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip)}  # noqa: SIM118
            else:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                part = part.get("state_dict", part) if isinstance(part, dict) else part
                if isinstance(part, dict):
                    part = {k: v for k, v in part.items() if not k.startswith(skip)}
        except Exception as err:
            raise ValueError(f"checkpoint file {str(file)!r} cannot be read: {err}") from err
        if not isinstance(part, dict):
            raise ValueError(f"checkpoint file {str(file)!r} holds a {type(part).__name__}, not a state dict")
        state.update(part)
    return state


def read_sharded(path: str | Path) -> dict[str, torch.Tensor]:
    """A released checkpoint: one weight file, or a directory of shards. With a `*.index.json` (the Hugging Face
    layout), every shard it names must exist and every key it lists must be read, or ValueError names them."""
    path = Path(path)
    indexes = sorted(path.glob("*.index.json")) if path.is_dir() else []  # before reading: a missing shard names it
    for index in indexes:
        _check_shards(index)
    state = read_state_dict(path)
    for index in indexes:
        _check_keys(index, state)
    return state


def _check_shards(index: Path) -> None:
    """Refuse a `*.index.json` naming shard files that are not beside it."""
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    absent = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if absent:
        raise ValueError(f"{index} names shards that are not there: {', '.join(absent)}")


def _check_keys(index: Path, present: Container[str]) -> None:
    """Refuse a `*.index.json` listing tensors that no shard holds."""
    unread = sorted(k for k in json.loads(index.read_text()).get("weight_map", {}) if k not in present)
    if unread:
        raise ValueError(f"{index} lists tensors no shard holds: {_listing('keys', unread)}")


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of a checkpoint, without reading its tensors where the format allows."""
    keys: list[str] = []
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                keys.extend(f.keys())
        else:
            keys.extend(read_state_dict(file))
    return keys


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """A content hash of a checkpoint's weight files (names within a directory included).

    Hashing 10 GB of T5 takes a while, so file hashes are cached by (absolute path, size, mtime) in
    ~/.cache/kiln/weights_sha256.json (`KILN_CACHE` moves it); a changed file is hashed again.
    """
    try:
        cache = json.loads(_HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    parts, dirty = [], False
    for file in weight_files(path):
        st = file.stat()
        key = f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key], dirty = file_sha256(file), True
        parts.append(f"{file.name}:{cache[key]}" if Path(path).is_dir() else cache[key])
    if dirty:
        try:
            _HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = _HASH_CACHE.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0))
            tmp.replace(_HASH_CACHE)
        except OSError:
            pass  # a read-only home only costs re-hashing
    if Path(path).is_file():
        return parts[0]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_MAX]) + (f", ... ({len(keys) - _LIST_MAX} more)" if len(keys) > _LIST_MAX else "")
    return f"{len(keys)} {title}: {shown}"


def strict_load(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    what: str,
    ignore_unexpected: tuple[str, ...] = (),
) -> None:
    """Load `state_dict` into `module`, refusing any missing, unexpected or mis-shaped key (all listed).

    Tied parameters (one tensor under two names, as T5's `shared` and `encoder.embed_tokens`) count as loaded when
    any of their names is in the checkpoint. `ignore_unexpected` names key prefixes the caller knowingly drops
    (the decoder half of a full T5 checkpoint when only the encoder is built); nothing else is dropped.
    """
    own = module.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in own.items():
        aliases.setdefault(id(tensor), []).append(name)
    unexpected = sorted(k for k in state_dict if k not in own and not k.startswith(ignore_unexpected))
    mis_shaped = sorted(
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(own[k].shape)})"
        for k in state_dict
        if k in own and state_dict[k].shape != own[k].shape
    )
    missing = sorted(
        name for name, tensor in own.items() if not any(alias in state_dict for alias in aliases[id(tensor)])
    )
    if missing or unexpected or mis_shaped:
        problems = [
            _listing(title, keys)
            for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
            if keys
        ]
        raise ValueError(f"{what} does not load strictly: " + "; ".join(problems))
    present = {k: v for k, v in state_dict.items() if k in own}
    for names in aliases.values():  # give every alias its value so load_state_dict(strict=True) is satisfied
        source = next(n for n in names if n in present)
        for name in names:
            present.setdefault(name, present[source])
    module.load_state_dict(present, strict=True, assign=any(p.is_meta for p in module.parameters()))


def safetensors_index(path: str | Path) -> dict[str, tuple[Path, torch.Size]] | None:
    """Where each tensor of a released checkpoint lies (file, shape), read from the safetensors headers alone; None
    when some weight file is not safetensors. The same refusals as `read_sharded` for a `*.index.json` that names
    absent shards or tensors no shard holds."""
    from safetensors import safe_open

    path = Path(path)
    indexes = sorted(path.glob("*.index.json")) if path.is_dir() else []
    for index in indexes:
        _check_shards(index)
    files = weight_files(path)
    if any(f.suffix != ".safetensors" for f in files):
        return None
    where: dict[str, tuple[Path, torch.Size]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                where |= {k: (file, torch.Size(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise ValueError(f"checkpoint file {str(file)!r} cannot be read: {err}") from err
    for index in indexes:
        _check_keys(index, where)
    return where


def read_safetensor(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, the file mapped only while it is read."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)
