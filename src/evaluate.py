"""Fixed-prompt evaluation during training: the same prompts, seeds and latent shape every time, so that the
videos of successive steps (and stages) can be compared side by side.

Every rank runs the sampler through the engine (under ZeRO-3 each forward gathers the sharded weights, so all
ranks must take part, with identical inputs); rank 0 decodes and writes `RUN_DIR/eval/step_NNNNNNNN/*.mp4`.
The raw training weights are sampled (the EMA is for `src.sample` and export).
"""

from __future__ import annotations

from pathlib import Path

import torch

from src.checkpoint import step_tag
from src.sample import sample_prompts


def eval_due(step: int, every: int, last_step: int, prompts) -> bool:
    """Whether to sample at `step`: every `every` steps (0: never) and at the run's last step, if there are prompts."""
    return bool(prompts) and ((every > 0 and step % every == 0) or step == last_step)


def evaluate(
    engine,
    text,
    vae,
    prompts: list[str],
    latent_shape: tuple[int, ...],
    null_txt: torch.Tensor,
    null_vec: torch.Tensor,
    out_dir: Path | None,
    step: int,
    device: torch.device,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
) -> list[Path]:
    """Sample `prompts` through the engine; rank 0 (the one given `out_dir`) writes `out_dir/step_N/*.mp4`."""
    folder = out_dir / step_tag(step) if out_dir is not None else None
    return sample_prompts(
        engine, text, vae, prompts, latent_shape, null_txt, null_vec, folder, device, seed, steps, guidance
    )
