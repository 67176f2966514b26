"""A run directory's names and the loop state beside its checkpoints; shared by the loop, the engines, the
checkpoint readers and the commands.

    RUN_DIR/config.yaml                     the resolved config (rank 0)
    RUN_DIR/metrics.jsonl                   one row per logged step
    RUN_DIR/checkpoints/latest              the tag of the newest complete checkpoint
    RUN_DIR/checkpoints/step_00000100/...   engine-specific shards (+ per-rank loop state), sealed by src/integrity.py
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named in `ckpt_dir/latest`, or None when there is no checkpoint yet.

    Raises ValueError when `latest` names a checkpoint folder that does not exist.
    """
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise ValueError(
            f"{latest} is empty, so it names no checkpoint (a save was interrupted while writing it): "
            "resume=latest_intact resumes from the newest intact checkpoint"
        )
    if not (Path(ckpt_dir) / tag).is_dir():
        found = sorted(p.name for p in Path(ckpt_dir).glob("step_*"))
        raise ValueError(f"{latest} names {tag!r}, which does not exist; checkpoints present: {found}")
    return tag


def refuse_unreadable(ckpt_dir: Path, tag: str, err: Exception) -> ValueError:
    """The error for a checkpoint that exists but cannot be read: never train on from a half-loaded state."""
    return ValueError(
        f"checkpoint {Path(ckpt_dir) / tag} cannot be loaded ({type(err).__name__}: {err}); "
        "it is not used. Restore it, or resume from the newest intact checkpoint with resume=latest_intact."
    )


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, numpy, python), as tensors and plain values only, so
    that a checkpoint loads with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states. The generators take their states as CPU ByteTensors, wherever a checkpoint
    was mapped to."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in older checkpoints
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
