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
from src.data.video import write_mp4
from src.diffusion.sampler import euler_sample
from src.sample import slug


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
    fps: int = 8,
) -> list[Path]:
    """Sample `prompts` (prompt i from noise seeded `seed + i`, shape (C, T', H', W')); write mp4s when `out_dir`
    is given (rank 0). Returns the written paths."""
    folder = out_dir / step_tag(step) if out_dir is not None else None
    paths = []
    for i, prompt in enumerate(prompts):
        noise = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(seed + i)).to(device)
        txt, vec = text([prompt])
        z = euler_sample(engine, noise, txt.to(device), vec.to(device), null_txt[0], null_vec[0], steps, guidance)
        if folder is not None:
            with torch.no_grad():
                video = vae.decode(z.float())[0].clamp(-1, 1)  # (3, T, H, W)
            folder.mkdir(parents=True, exist_ok=True)
            paths.append(write_mp4(folder / f"{i:02d}_{slug(prompt)}.mp4", video.cpu(), fps))
    return paths
