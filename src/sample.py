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
import io
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.checkpoint import load_model_weights
from src.cli import HelpFormatter
from src.data.video import decode_clip, is_image, write_mp4
from src.diffusion.condition import COND_TYPES, build_condition, place_given
from src.diffusion.sampler import euler_sample
from src.models.diffusers_flux import is_diffusers_flux
from src.run.metrics import read_metrics

BUCKET_NAME = re.compile(r"\w+/(\d+)f/(\d+)x(\d+)")  # resolution/frames/HEIGHTxWIDTH (src.data.buckets.Bucket)


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
    cond: torch.Tensor | None = None,
    image_options: dict | None = None,
    keep_frames=None,
    start: int = 0,
    prefix: str = "",
) -> tuple[list[Path], torch.Tensor | None]:
    """One video per prompt: prompt i from noise seeded `seed + i` of shape (C, T', H', W'), Euler + CFG through
    `velocity(x, txt, vec, t)`, `batch` prompts at a time (the noise, hence the video, does not depend on it).
    With `out_dir`: decoded, written to `out_dir/NN_<prompt>.mp4`; returns (paths, videos (N, 3, T, H, W) in
    [-1, 1] on the CPU). With `out_dir` None the sampling still runs (a ZeRO-3 rank must take part in every
    forward) but nothing is decoded or written: ([], None). cond (1, 1 + C, T', H', W'): the same I2V condition for
    every prompt (`build_condition`; a model trained with conditions needs one, all zeros for T2V), its given frames
    put back before decoding, as Open-Sora does; image_options: `euler_sample`'s image-guidance settings;
    keep_frames: decoded (b, 3, T, H, W) -> the frames to keep (`drop_duplicates`). start: the first prompt's number
    (prompt i is seeded `seed + start + i` and written as NN = start + i); prefix: put before the prompt in file names
    (`NN_<prefix><prompt>.mp4`)."""
    if batch < 1:
        raise ValueError(f"sampling batch must be >= 1, got {batch}")
    paths, videos = [], []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first : first + batch]
        noise = torch.stack(
            [
                torch.randn(*latent_shape, generator=torch.Generator().manual_seed(seed + start + first + i))
                for i in range(len(chunk))
            ]
        ).to(device)  # (b, C, T', H', W')
        txt, vec = text(chunk)
        extra = {} if cond is None else {"cond": cond.expand(len(chunk), *cond.shape[1:]), **(image_options or {})}
        z = euler_sample(velocity, noise, txt, vec, null_txt[0], null_vec[0], steps=steps, guidance=guidance, **extra)
        if cond is not None:
            z = place_given(z, extra["cond"])  # (b, C, T', H', W')
        if out_dir is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        decoded = vae.decode(z.float()).clamp(-1, 1).cpu()  # (b, 3, T, H, W)
        for i, video in enumerate(keep_frames(decoded) if keep_frames else decoded):  # (3, T, H, W)
            videos.append(video)
            n = first + i
            paths.append(write_mp4(out_dir / f"{start + n:02d}_{prefix}{slug(prompts[n])}.mp4", video, fps))
    return paths, (torch.stack(videos) if videos else None)


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


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file, or a video's first frame, as one frame (1, 3, 1, height, width) in [-1, 1]: resized to cover,
    then centre-cropped (as Open-Sora's resize_crop; a video through the training decoder, `decode_clip`)."""
    from PIL import Image

    data = Path(path).read_bytes()
    if not is_image(data):
        return decode_clip(data, 1, height, width)[None]  # (1, 3, 1, H, W)
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        scale = max(height / img.height, width / img.width)
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        if size != img.size:
            img = img.resize(size, Image.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.permute(2, 0, 1).float() / 127.5 - 1)[None, :, None]  # (1, 3, 1, H, W)


def condition_for(cfg, vae, latent: tuple[int, ...], images: list[Path], cond_type: str, device) -> torch.Tensor | None:
    """The I2V condition (1, 1 + C, T', H', W') of a sample of `latent` (C, T', H', W'), or None for a model trained
    text-to-video only. The first image is the head, the last the tail (Open-Sora's rule for i2v_loop)."""
    if cond_type not in COND_TYPES:
        raise ValueError(f"unknown cond_type {cond_type!r}; valid: {sorted(COND_TYPES)}")
    trained = cfg.get("diffusion", {}).get("cond")
    if not trained:
        if images or cond_type != "t2v":
            raise ValueError(f"this run trained text-to-video only (diffusion.cond is null): no --image or {cond_type}")
        return None
    if cond_type == "t2v" and images:
        raise ValueError("--image was given with --cond-type t2v: pick i2v_head, i2v_tail or i2v_loop")
    if cond_type != "t2v" and not images:
        raise ValueError(f"--cond-type {cond_type} needs an --image")
    if cond_type not in trained:
        print(f"warning: {cond_type} is not among the condition types this run trained: {dict(trained)}")
    return encode_condition(vae, latent, images, cond_type, device)


def encode_condition(vae, latent: tuple[int, ...], images: list[Path], cond_type: str, device) -> torch.Tensor:
    """The condition (1, 1 + C, T', H', W') of `cond_type` for a sample of `latent` (C, T', H', W'): each image the
    type places loaded at the sample's size and encoded alone through `vae`; the first image is the head, the last
    the tail."""
    C, _, H, W = latent
    height, width = H * vae.spatial_compression, W * vae.spatial_compression
    given = {}
    for name, path in (("head", images[0] if images else None), ("tail", images[-1] if images else None)):
        if path is not None and name in COND_TYPES[cond_type]:
            given[name] = vae.encode(load_image(path, height, width).to(device)).float()  # (1, C, 1, H', W')
    return build_condition([cond_type], (1, *latent), given.get("head"), given.get("tail")).to(device)


def drop_duplicates(vae, video: torch.Tensor, cond_type: str) -> torch.Tensor:
    """A non-causal VAE decodes a given image's latent frame into `temporal_compression` copies: keep one at each
    conditioned end (Open-Sora removes the same frames). video (B, 3, T, H, W)."""
    r = vae.temporal_compression
    if r == 1 or cond_type == "t2v":
        return video
    try:
        vae.check_frames(r + 1)  # causal: the first latent frame is one frame, the last r
        return video
    except ValueError:
        pass
    head, tail = ("head" in COND_TYPES[cond_type]), ("tail" in COND_TYPES[cond_type])
    return video[:, :, (r - 1 if head else 0) : video.shape[2] - (r - 1 if tail else 0)]


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
