"""Shared fixtures: a tiny MMDiT matching conf/model/mmdit_tiny.yaml, and the repository root."""

import os
from pathlib import Path

import pytest
import torch

from src.config import model_config

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    """The environment for a child process, without what an in-process test's process group left behind (RANK,
    MASTER_PORT...: a child would wait for peers that never come); one OpenMP thread per process."""
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in dist_vars} | {"OMP_NUM_THREADS": "1"}


def tiny_model_kwargs(**overrides) -> dict:
    cfg = model_config("mmdit_tiny", vae="patch")
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_model():
    from src.models.mmdit import MMDiT

    torch.manual_seed(0)
    return MMDiT(**tiny_model_kwargs())
