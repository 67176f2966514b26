"""Loading a checkpoint never runs code from it.

Every `torch.load` in Kiln goes through `load_tensors` (`weights_only=True`: tensors, containers and numbers,
plus the few plain types below, allow-listed by name). What DeepSpeed itself loads (`load_checkpoint` on resume,
`zero_to_fp32` for consolidated weights) it loads with `weights_only=False`, so Kiln first reads the pickle of every
file it will hand to DeepSpeed (`refuse_unsafe_pickles`, which executes nothing) and refuses one that names any
other global. See docs/design.md, "What is checked and what is refused".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

# Beyond torch's own weights_only allow-list: numpy's array reconstruction (the RNG state of checkpoints written
# before it was stored as a tensor) and the two plain DeepSpeed types of a ZeRO optimizer state (a loss scaler of
# numbers, an int enum). None of them can call anything but its own constructor.
NUMPY_GLOBALS = ("numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType")
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum")
ALLOWED = frozenset(NUMPY_GLOBALS + DEEPSPEED_GLOBALS)


def _resolve(name: str) -> object:
    module, _, attr = name.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _allowed_present(names: Iterable[str]) -> list:
    """The allow-listed objects a file needs, imported (DeepSpeed only when the file names it). A numpy array
    names only its first globals: its dtype's class comes up while it is rebuilt."""
    names = set(names)
    needed = [n for group in (NUMPY_GLOBALS, DEEPSPEED_GLOBALS) if names & set(group) for n in group]
    return [(_resolve(n), n) for n in needed]


def unsafe_globals(path: Path) -> list[str]:
    """The globals a torch checkpoint's pickle names beyond torch's weights_only allow-list (nothing executed)."""
    return get_unsafe_globals_in_checkpoint(path)


def refuse_unsafe_pickles(paths: Iterable[Path]) -> None:
    """ValueError naming the file and the globals when a file's pickle names anything outside `ALLOWED`."""
    for path in paths:
        others = sorted(set(unsafe_globals(path)) - ALLOWED)
        if others:
            raise ValueError(
                f"{path} would run code when loaded: its pickle names {others}, which a Kiln checkpoint never holds. "
                "It is not loaded; do not use checkpoints from an untrusted source"
            )


def load_tensors(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)` with the allow-listed globals the file names; refuses any other."""
    path = Path(path)
    named = unsafe_globals(path)
    refuse_unsafe_pickles([path])
    allowed = _allowed_present(named)
    with safe_globals(allowed) if allowed else contextlib.nullcontext():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
