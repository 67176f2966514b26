"""Generate videos from a trained run: `python -m src.sample RUN_DIR --prompt "a red square moves left"`.

Rebuilds the model, VAE and text encoder from RUN_DIR/config.yaml, loads the consolidated weights of a
checkpoint (the latest by default), integrates the flow with the Euler sampler and classifier-free
guidance, decodes with the configured VAE and writes one mp4 per prompt.

A model trained with I2V conditions (`diffusion.cond`) also takes given frames: `--image first.png` (the first
frame, `--cond-type i2v_head`), `--cond-type i2v_tail` (the last), `i2v_loop` (the first `--image` first, the last
one last). Each image is resized and centre-cropped to the sample's size and encoded alone through the run's VAE;
the condition is Open-Sora's cat(mask, masked latent), guided with `--image-guidance`, and the given latents are put
back in place before decoding (`src/diffusion/condition.py`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from hydra.utils import instantiate

from src.cli import HelpFormatter
from src.diffusion.condition import COND_TYPES
from src.evaluation.sampling import condition_for, drop_duplicates, load_run, sample_prompts
from src.run.metrics import read_metrics

BUCKET_NAME = re.compile(r"\w+/(\d+)f/(\d+)x(\d+)")  # resolution/frames/HEIGHTxWIDTH (src.data.buckets.Bucket)


def default_shape(cfg, trained: Iterable[str] = ()) -> tuple[int, int, int, str]:
    """(frames, height, width, where from): the largest bucket training clips went into (`trained`: bucket names
    like `256px/33f/192x336` from metrics.jsonl's loss_by_bucket), else the largest configured resolution's longest
    clip, closest to square (an export keeps no metrics)."""
    shapes = [tuple(map(int, m.groups())) for m in map(BUCKET_NAME.fullmatch, trained) if m]  # (frames, h, w)
    if shapes:
        frames, height, width = max(shapes, key=lambda s: (s[1] * s[2], s[0]))
        return frames, height, width, "the largest bucket the run trained on"
    buckets = instantiate(cfg.data.buckets)
    res = buckets.order[0]
    height, width = buckets.nearest_shape(res, 1, 1)
    return buckets.frames[res][0][0], height, width, f"the largest configured bucket ({res}, closest to square)"


def trained_buckets(run_dir: Path) -> set[str]:
    """The buckets a run's logged training rows name (none for an export or a run without metrics.jsonl)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return set()
    return {name for row in read_metrics(run_dir) for name in row.get("loss_by_bucket") or {}}


def weights_label(tag: str, ema: bool) -> str:
    """How the sampled weights are named: the checkpoint tag and (EMA); an export's tag says itself whether it holds
    the EMA ("export:step_00000004 (EMA)")."""
    return f"{tag}{' (EMA)' if ema and not tag.startswith('export:') else ''}"


def pick_shape(
    cfg,
    vae,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    trained: Iterable[str] = (),
) -> tuple[int, ...]:
    """The latent (C, T', H', W') to sample: frames/height/width not given come from `default_shape`."""
    f, h, w, _ = default_shape(cfg, trained)
    return vae.latent_shape(frames or f, height or h, width or w)


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
    images: list[Path] | None = None,
    cond_type: str | None = None,
    image_options: dict | None = None,
) -> list[Path]:
    """Sample one video per prompt (frames/height/width default to the largest training bucket); with `images`, the
    frames `cond_type` places (default i2v_head) are given."""
    cfg, model, vae, text, tag = load_run(Path(run_dir), tag, device, ema)
    f, h, w, source = default_shape(cfg, trained_buckets(Path(run_dir)))
    if not (frames and height and width):
        print(f"{frames or f} frames of {height or h}x{width or w} (height x width); not given: from {source}")
    latent = vae.latent_shape(frames or f, height or h, width or w)
    null_txt, null_vec = text([""])
    cond_type = cond_type or ("i2v_head" if images else "t2v")
    cond = condition_for(cfg, vae, latent, list(images or []), cond_type, device)
    kept = (lambda v: drop_duplicates(vae, v, cond_type)) if cond is not None else None
    paths, _ = sample_prompts(
        model, text, vae, prompts, latent, null_txt, null_vec, Path(out_dir), device, seed, steps, guidance, fps,
        cond=cond, image_options=image_options, keep_frames=kept,
    )  # fmt: skip
    for prompt, path in zip(prompts, paths, strict=True):
        print(f"{weights_label(tag, ema)}: {prompt!r} -> {path}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="a given frame (I2V); i2v_loop: the first is the head, the last the tail")  # fmt: skip
    parser.add_argument("--cond-type", choices=sorted(COND_TYPES), default=None,
                        help="which frames the images give (default: i2v_head with --image, else t2v)")  # fmt: skip
    parser.add_argument("--image-guidance", type=float, default=3.0, help="image guidance scale (Open-Sora: 3)")
    parser.add_argument("--temporal-image-guidance", action=argparse.BooleanOptionalAction, default=True,
                        help="image guidance rising over the clip, falling over the steps (Open-Sora)")  # fmt: skip
    parser.add_argument("--oscillate", action=argparse.BooleanOptionalAction, default=True,
                        help="I2V: both guidance scales 1 on odd steps from step 10 (Open-Sora)")  # fmt: skip
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
        images=args.image,
        cond_type=args.cond_type,
        image_options={
            "image_guidance": args.image_guidance,
            "temporal_image_guidance": args.temporal_image_guidance,
            "oscillate": args.oscillate,
        },
    )


if __name__ == "__main__":
    main()
