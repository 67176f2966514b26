"""Generate videos from a trained run: `python -m src.sample RUN_DIR --prompt "a red square moves left"`.

Rebuilds the model, VAE and text encoder from RUN_DIR/config.yaml, loads the consolidated weights of a
checkpoint (the latest by default), integrates the flow with the Euler sampler and classifier-free
guidance, decodes with the configured VAE and writes one mp4 per prompt.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.checkpoint import load_model_weights
from src.data.video import write_mp4
from src.diffusion.sampler import euler_sample
from src.models.diffusers_flux import is_diffusers_flux


def load_run(run_dir: Path, tag: str | None = None, device: str = "cpu", ema: bool = True):
    """(cfg, model, vae, text, tag) of a run directory, the model holding the checkpoint's weights (its EMA by
    default; ValueError when the run kept none and `ema` is asked for)."""
    diffusers = is_diffusers_flux(run_dir)  # an export with --format diffusers: Kiln's config beside it
    config = run_dir / ("kiln_config.yaml" if diffusers else "config.yaml")
    if not config.is_file():
        raise ValueError(f"{run_dir} is neither a Kiln run directory nor an export: it has no {config.name}")
    cfg = OmegaConf.load(config)
    model = instantiate(cfg.model)
    weights, tag = load_model_weights(run_dir, tag, ema=ema, names=list(model.state_dict()))
    model.load_state_dict(weights, strict=True)
    return cfg, model.to(device).eval(), instantiate(cfg.vae).to(device), instantiate(cfg.text).to(device), tag


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


@torch.no_grad()
def sample_prompts(
    velocity,
    text,
    vae,
    prompts: list[str],
    latent_shape: tuple[int, ...],
    null_txt: torch.Tensor,
    null_vec: torch.Tensor,
    out_dir: Path | None,
    device: torch.device | str,
    seed: int = 0,
    steps: int = 30,
    guidance: float = 4.0,
    fps: int = 8,
    batch: int = 16,
) -> tuple[list[Path], torch.Tensor | None]:
    """One video per prompt: prompt i from noise seeded `seed + i` of shape (C, T', H', W'), Euler + CFG through
    `velocity(x, txt, vec, t)`, `batch` prompts at a time (the noise, hence the video, does not depend on it).
    With `out_dir`: decoded, written to `out_dir/NN_<prompt>.mp4`; returns (paths, videos (N, 3, T, H, W) in
    [-1, 1] on the CPU). With `out_dir` None the sampling still runs (a ZeRO-3 rank must take part in every
    forward) but nothing is decoded or written: ([], None)."""
    if batch < 1:
        raise ValueError(f"sampling batch must be >= 1, got {batch}")
    paths, videos = [], []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first : first + batch]
        noise = torch.stack(
            [
                torch.randn(*latent_shape, generator=torch.Generator().manual_seed(seed + first + i))
                for i in range(len(chunk))
            ]
        ).to(device)  # (b, C, T', H', W')
        txt, vec = text(chunk)
        z = euler_sample(velocity, noise, txt, vec, null_txt[0], null_vec[0], steps=steps, guidance=guidance)
        if out_dir is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, video in enumerate(vae.decode(z.float()).clamp(-1, 1).cpu()):  # (3, T, H, W)
            videos.append(video)
            n = first + i
            paths.append(write_mp4(out_dir / f"{n:02d}_{slug(prompts[n])}.mp4", video, fps))
    return paths, (torch.stack(videos) if videos else None)


def pick_shape(cfg, vae, frames: int | None = None, height: int | None = None, width: int | None = None):
    """The latent (C, T', H', W') to sample: frames/height/width default to the largest training bucket's
    longest clip, closest to square."""
    buckets = instantiate(cfg.data.buckets)
    res = buckets.order[0]
    default_h, default_w = buckets.nearest_shape(res, 1, 1)
    frames, height, width = frames or buckets.frames[res][0][0], height or default_h, width or default_w
    return vae.latent_shape(frames, height, width)


def generate(
    run_dir: str | Path,
    prompts: list[str],
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 30,
    guidance: float = 4.0,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    fps: int = 8,
    tag: str | None = None,
    device: str = "cpu",
    ema: bool = True,
) -> list[Path]:
    """Sample one video per prompt (frames/height/width default to the largest training bucket)."""
    cfg, model, vae, text, tag = load_run(Path(run_dir), tag, device, ema)
    latent = pick_shape(cfg, vae, frames, height, width)
    null_txt, null_vec = text([""])
    paths, _ = sample_prompts(
        model, text, vae, prompts, latent, null_txt, null_vec, Path(out_dir), device, seed, steps, guidance, fps
    )
    for prompt, path in zip(prompts, paths, strict=True):
        print(f"{tag}{' (EMA)' if ema else ''}: {prompt!r} -> {path}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (config.yaml, checkpoints/) or an export folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="Euler steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="sample with the EMA weights (default) or the raw ones")  # fmt: skip
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts-file")
    generate(
        args.run_dir,
        prompts,
        args.out or args.run_dir / "samples",
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        frames=args.frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
        tag=args.tag,
        device=args.device,
        ema=args.ema,
    )


if __name__ == "__main__":
    main()
