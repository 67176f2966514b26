"""What a trained model draws: a run's (or an export's) model loaded for sampling, and prompts (with given frames
for I2V) turned into videos with the Euler sampler and classifier-free guidance. Used by the fixed-prompt
evaluation of training, by the judge of the synthetic demo (src/data/judge.py) and by `python -m src.sample`.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.checkpoint import load_model_weights
from src.data.video import decode_clip, is_image, write_mp4
from src.diffusion.condition import COND_TYPES, build_condition, place_given
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
