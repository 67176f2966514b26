"""Encode a video dataset once into the feature cache (`torchrun --nproc_per_node=N -m src.preprocess +experiment=NAME`
runs `preprocess(cfg)`), beside the cache format it writes (feature_shards.py) and the reader (cached.py).

It reads the experiment's `data.preprocess` source shards through the same buckets and clip options the
training loader uses, runs the experiment's text encoder and VAE on every rank, and writes one feature shard
per source shard into `data.urls` (format: `src/data/feature_shards.py`), each with its provenance and
statistics. Source shards are dealt to ranks round-robin; a shard whose feature shard and sidecar exist is
skipped, so an interrupted run continues where it stopped. A final report sums every rank's work.

Training the same experiment (`data=cached`) then builds neither encoder and checks every shard's provenance.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from src.data.buckets import Bucket, BucketConfig
from src.data.catalog import MemberReader, ShardInfo, expand_urls, scan_shards
from src.data.feature_shards import merge_stats, sidecar_path, tensor_stats, write_feature_shard
from src.data.provenance import check_provenance, kiln_version
from src.data.shards import ClipOptions, failure_reason
from src.data.video import VideoDecodeError
from src.diffusion.condition import IMAGE_KEYS, check_weights, needed_images
from src.parallel.dist import barrier, init_distributed

log = logging.getLogger("kiln.preprocess")
CACHED_LOADER = "src.data.cached.build_cached_loader"


def output_path(out_dir: Path, url: str) -> Path:
    """The feature shard of a source shard: the same file name in `out_dir`."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split(" ")[-1]
    return out_dir / (name if name.endswith(".tar") else f"{name}.tar")


class ShardEncoder:
    """Encodes the samples of source shards into feature-shard contents with one text encoder and one VAE."""

    def __init__(self, text, vae, buckets: BucketConfig, clips: ClipOptions, seed: int, storage: dict[str, Any]):
        self.text, self.vae, self.buckets, self.clips, self.seed = text, vae, buckets, clips, seed
        self.latent_dtype = getattr(torch, storage["latent_dtype"])
        self.text_dtype = getattr(torch, storage["text_dtype"])
        self.device = next(iter(vae.parameters()), torch.empty(0)).device
        null_txt, null_vec = text([""])  # (1, L, D), (1, Dv)
        self.null = {"null_txt": null_txt[0].to(self.text_dtype), "null_vec": null_vec[0].to(self.text_dtype)}
        # Open-Sora samples the VAE posterior at training: keep its mean and std, the loader draws per step
        self.latent_keys = ("latent", "latent_std") if vae.describe()["posterior"] == "sample" else ("latent",)
        # the I2V condition's given frames, each encoded alone as Open-Sora encodes them (src/diffusion/condition.py)
        self.images = tuple(storage.get("cond_images", ()))
        self.latent_keys += tuple(IMAGE_KEYS[name] for name in self.images)

    def encode_video(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """`latent` (B, C, T', H', W') of clips (B, 3, T, H, W), and `latent_std` (the posterior's std in latent
        units, `src.models.vae.posterior`) when the VAE's posterior is sampled, and `image_head` / `image_tail`
        (B, C, 1, H', W'), the first / last frame encoded alone, when the run's I2V condition places them."""
        if "latent_std" in self.latent_keys:
            mean, std = self.vae.encode_posterior(video)
            out = {"latent": mean, "latent_std": std}
        else:
            out = {"latent": self.vae.encode(video)}
        for name in self.images:
            out[IMAGE_KEYS[name]] = self.vae.encode(video[:, :, :1] if name == "head" else video[:, :, -1:])
        return out

    def assign(self, shard: ShardInfo) -> dict[Bucket, list]:
        """Samples of a shard grouped by bucket (a coin seeded by the shard name and key: stable on re-runs)."""
        groups: dict[Bucket, list] = {}
        name = shard.url.rsplit("/", 1)[-1]
        for sample in shard.samples:
            rng = random.Random(f"{self.seed}/bucket/{name}/{sample.key}")
            bucket = self.buckets.assign(sample.meta, rng, self.clips.can_supply)
            groups.setdefault(bucket, []).append(sample)
        return groups

    def no_bucket(self, meta: dict) -> str:
        """Why a sample got no bucket: it fits none, or the coin of every bucket it fits said no."""
        why = self.buckets.why_no_bucket(meta, self.clips.can_supply)
        return why or f"declined by the coin of every bucket it fits (probabilities below 1): {self.buckets.describe()}"

    def encode(self, shard: ShardInfo, reader: MemberReader) -> tuple[list, list[dict], dict[str, Any]]:
        """(samples for `write_feature_shard`, skipped samples, statistics) of one source shard."""
        written, skipped = [], []
        stats: dict[str, list] = {name: [] for name in (*self.latent_keys, "txt", "vec")}
        for bucket, samples in self.assign(shard).items():
            if bucket is None:
                skipped += [{"key": s.key, "reason": "no_bucket", "detail": self.no_bucket(s.meta)} for s in samples]
                continue
            for start in range(0, len(samples), bucket.batch_size):
                clips, captions, kept = [], [], []
                for sample in samples[start : start + bucket.batch_size]:
                    try:
                        video, caption = self.clips.decode(
                            reader, shard, sample, bucket, f"{self.seed}/clip/{shard.url}/{sample.key}"
                        )
                    except (VideoDecodeError, UnicodeDecodeError, OSError) as err:
                        skipped.append({"key": sample.key, "reason": failure_reason(err), "detail": str(err)})
                        continue
                    clips.append(video)
                    captions.append(caption)
                    kept.append(sample)
                if not kept:
                    continue
                latents = self.encode_video(torch.stack(clips).to(self.device))  # each (B, C, T', H', W')
                txt, vec = self.text(captions)  # (B, L, D), (B, Dv)
                for i, sample in enumerate(kept):
                    tensors = {
                        **{k: v[i].to(self.latent_dtype) for k, v in latents.items()},
                        "txt": txt[i].to(self.text_dtype),
                        "vec": vec[i].to(self.text_dtype),
                    }
                    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
                    if bad:  # counted in the statistics below, never written
                        skipped.append({"key": sample.key, "reason": "nonfinite", "detail": f"non-finite {bad}"})
                    else:
                        meta = {
                            "caption": captions[i],
                            "bucket": {
                                "resolution": bucket.resolution,
                                "num_frames": bucket.num_frames,
                                "height": bucket.height,
                                "width": bucket.width,
                            },
                            "latent_shape": list(latents["latent"].shape[1:]),
                            "source": f"{shard.url}:{sample.key}",
                        }
                        written.append((sample.key, {k: v.cpu() for k, v in tensors.items()}, meta))
                    for name, value in tensors.items():
                        stats[name].append(tensor_stats(value))
        return written, skipped, {name: merge_stats(parts) for name, parts in stats.items()}


def provenance(text, vae, clips: ClipOptions, seed: int, storage: dict[str, Any]) -> dict[str, Any]:
    """The shard-independent part of every header: encoders, clip options, storage dtypes, Kiln's version."""
    return {
        "text": text.describe(),
        "vae": vae.describe(),
        "clips": clips.provenance(),
        "seed": seed,
        "storage": storage,
        "kiln_version": kiln_version(),
    }


def preprocess(cfg: DictConfig) -> dict[str, Any]:
    """Write the feature shards of `cfg` (see the module docstring); returns the report (on every rank)."""
    if cfg.data.get("_target_") != CACHED_LOADER:
        raise ValueError(
            f"src.preprocess writes the cache of a `data=cached` config, but data._target_ is "
            f"{cfg.data.get('_target_')!r}: run it with the experiment you will train (e.g. +experiment=dcae)"
        )
    dist = init_distributed(cfg.dist_backend)
    source = cfg.data.preprocess
    out_dir = Path(cfg.data.urls)
    urls = expand_urls(source.urls)
    outputs = [output_path(out_dir, u) for u in urls]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"source shards {urls} do not have distinct file names; feature shards would collide")
    storage = {"latent_dtype": source.latent_dtype, "text_dtype": source.text_dtype}
    images = needed_images(check_weights(cfg.diffusion.get("cond")))
    if images:  # a text-to-video cache's provenance stays as it was
        storage["cond_images"] = list(images)
    clips = ClipOptions(source.fps, source.frame_stride, source.crop)

    torch.manual_seed(cfg.seed)
    text = instantiate(cfg.text).to(dist.device)
    vae = instantiate(cfg.vae).to(dist.device)
    common = provenance(text, vae, clips, cfg.seed, storage)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    mine = [(u, o) for i, (u, o) in enumerate(zip(urls, outputs, strict=True)) if i % dist.world_size == dist.rank]
    todo = []
    for url, out in mine:
        if sidecar_path(out).is_file() and out.is_file():  # finished earlier: it must match this config
            check_provenance(json.loads(sidecar_path(out).read_text()), common, f"the existing feature shard {out}")
        else:
            todo.append((url, out))
    log.info("rank %d: %d of its %d shards to encode into %s", dist.rank, len(todo), len(mine), out_dir)

    encoder = ShardEncoder(text, vae, instantiate(cfg.data.buckets), clips, cfg.seed, storage)
    reader = MemberReader()
    report = Counter(shards_done=len(mine) - len(todo))
    reasons: Counter = Counter()
    t0 = time.perf_counter()
    for url, out in tqdm(todo, desc=f"preprocess rank {dist.rank}", disable=not dist.is_main, dynamic_ncols=True):
        shards, scan_skips = scan_shards([url])
        skipped = [{"key": s.key, "reason": s.reason, "detail": s.detail} for s in scan_skips]
        written, stats = [], {}
        if shards:
            written, decode_skips, stats = encoder.encode(shards[0], reader)
            skipped += decode_skips
        buckets = Counter(
            f"{m['bucket']['resolution']}/{m['bucket']['num_frames']}f/{m['bucket']['height']}x{m['bucket']['width']}"
            for _, _, m in written
        )
        header = {**common, "source": url, "buckets": dict(buckets), "count": len(written), "stats": stats}
        header.update(text_shape=list(encoder.null["null_txt"].shape), vec_dim=encoder.null["null_vec"].shape[0])
        samples = [{"key": key, **meta} for key, _, meta in written]
        write_feature_shard(out, header, encoder.null, written, {"samples": samples, "skipped": skipped})
        report.update(shards_written=1, samples_written=len(written), samples_skipped=len(skipped))
        reasons.update(s["reason"] for s in skipped)
    reader.close()
    report["seconds"] = round(time.perf_counter() - t0, 2)

    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, (dict(report), dict(reasons)))
    total, by_reason = Counter(), Counter()
    for rank_report, rank_reasons in gathered:
        total.update({k: v for k, v in rank_report.items() if k != "seconds"})
        by_reason.update(rank_reasons)
    final = {**total, "skipped_by_reason": dict(by_reason), "seconds": max(r["seconds"] for r, _ in gathered)}
    final["ranks"], final["out"] = dist.world_size, str(out_dir)
    if dist.is_main:
        (out_dir / "report.json").write_text(json.dumps(final, indent=1))
        log.info("preprocess report: %s", json.dumps(final))
        print(
            f"feature cache {out_dir}: {final.get('shards_written', 0)} shards written, "
            f"{final.get('shards_done', 0)} already done; {final.get('samples_written', 0)} samples, "
            f"{final.get('samples_skipped', 0)} skipped {dict(by_reason)}; "
            f"{final['seconds']} s on {dist.world_size} ranks"
        )
    barrier()
    return final
