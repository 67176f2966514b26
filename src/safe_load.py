"""Loading a checkpoint never runs code from it.

Every `torch.load` in Kiln goes through `load_tensors` (`weights_only=True`: tensors, containers and numbers,
plus the few plain types below, allow-listed by name). What DeepSpeed itself loads (`load_checkpoint` on resume,
`zero_to_fp32` for consolidated weights) it loads with `weights_only=False`, so Kiln first reads the pickle of every
file it will hand to DeepSpeed (`refuse_unsafe_pickles`, which executes nothing) and refuses one that names any
other global. See docs/design.md, "What is checked and what is refused".
"""

from __future__ import annotations

import contextlib
import pickletools
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
# torch.distributed.checkpoint's `.metadata` is a plain pickle of its own dataclasses (read by `pickle.load`).
DCP_GLOBALS = ("torch.Size", "pathlib.PosixPath", "torch.serialization._get_layout")
DCP_PREFIXES = ("torch.distributed.checkpoint.metadata.", "torch.distributed.checkpoint.filesystem._StorageInfo")


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


def pickle_globals(data: bytes) -> set[str]:
    """Every global a plain pickle names ("module.name"; "<unknown>" where it cannot tell), read without running it."""
    memo, pushed, found = {}, [], set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif "UNICODE" in op.name or "STRING" in op.name:
            pushed.append(arg)
            continue
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
            continue
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
            continue
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
            continue
        elif op.name == "STACK_GLOBAL":
            module, name = pushed[-2:] if len(pushed) > 1 else (None, None)
            known = isinstance(module, str) and isinstance(name, str)
            found.add(f"{module}.{name}" if known else "<unknown>")
        pushed.append(None)  # anything else on the stack: the next STACK_GLOBAL's names must follow it
    return found


def _dcp_allowed(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    is_dtype = module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)
    return is_dtype or name in DCP_GLOBALS or name.startswith(DCP_PREFIXES)


def _refuse(path: Path, others: list[str]) -> None:
    if others:
        raise ValueError(
            f"{path} would run code when loaded: its pickle names {others}, which a Kiln checkpoint never holds. "
            "It is not loaded; do not use checkpoints from an untrusted source"
        )


def refuse_unsafe_pickles(paths: Iterable[Path]) -> None:
    """ValueError naming the file and the globals when a file's pickle names anything outside `ALLOWED`."""
    for path in paths:
        _refuse(path, sorted(set(unsafe_globals(path)) - ALLOWED))


def refuse_unsafe_files(folder: Path) -> None:
    """Read the pickle of every file of a checkpoint folder that holds one (torch `*.pt` files, DCP `.metadata`)
    without running it, and refuse the folder if any names a global beyond the allow-lists. Engine-agnostic: run
    before any engine loads the folder."""
    folder = Path(folder)
    refuse_unsafe_pickles(sorted(folder.rglob("*.pt")))
    for path in sorted(folder.rglob(".metadata")):
        try:
            named = pickle_globals(path.read_bytes())
        except ValueError as err:  # not a pickle at all: nothing to load it with
            raise ValueError(f"{path} is not a readable pickle ({err}); it is not loaded") from err
        _refuse(path, sorted(n for n in named if not _dcp_allowed(n)))


def load_tensors(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)` with the allow-listed globals the file names; refuses any other."""
    path = Path(path)
    named = unsafe_globals(path)
    refuse_unsafe_pickles([path])
    allowed = _allowed_present(named)
    with safe_globals(allowed) if allowed else contextlib.nullcontext():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
