"""Shared fixtures: a tiny MMDiT matching conf/model/mmdit_tiny.yaml, and the repository root."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_kwargs(**overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/mmdit_tiny.yaml"))
    cfg.pop("_target_")
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_model():
    from src.models.mmdit import MMDiT

    torch.manual_seed(0)
    return MMDiT(**tiny_model_kwargs())
