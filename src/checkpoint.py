"""Reading checkpoints outside training: consolidated weights for sampling and export, run state on disk.

Layout of a run directory:
    RUN_DIR/config.yaml                     the resolved config (rank 0)
    RUN_DIR/metrics.jsonl                   one row per logged step
    RUN_DIR/checkpoints/latest              the tag of the newest complete checkpoint
    RUN_DIR/checkpoints/step_00000100/...   engine-specific shards (+ per-rank loop state)
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from src.parallel.engine import latest_tag


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, numpy, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_weights(run_or_ckpt: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Consolidated fp32 model weights of a checkpoint, whichever engine wrote it.

    `run_or_ckpt` is a run directory or its `checkpoints/` folder; `tag` defaults to the latest.
    Returns (state dict, tag). Raises ValueError when there is no checkpoint to read.
    """
    ckpt_dir = Path(run_or_ckpt)
    if (ckpt_dir / "checkpoints").is_dir():
        ckpt_dir = ckpt_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise ValueError(f"no checkpoint {tag or '(latest)'} in {ckpt_dir}")
    local = ckpt_dir / tag / "local_engine.pt"
    if local.is_file():
        blob = torch.load(local, map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in blob["module"].items()}, tag
    from src.parallel.deepspeed import _import_deepspeed

    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float() for k, v in state.items()}, tag
