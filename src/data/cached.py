"""Training from feature shards (`data=cached`): no text encoder or VAE in memory, provenance checked.

The cache is read through the same global batch plan as video shards (`plan.py`): identical on every rank,
split by data-parallel rank, seeded shuffling, exact resume. Each sample's bucket was fixed when it was
encoded; the run's bucket config only gives the batch size of each (resolution, frames), and a cached bucket
the config does not list is skipped and counted.

Every shard's sidecar is checked against the provenance this run's `text` and `vae` configs would record
before the first step, and the header inside each tar again when a loader worker first opens it, so a shard
replaced while the run streams is refused too. The null (empty-prompt) features for classifier-free guidance
come from the cache's headers, which must all agree.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load as load_tensors
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from src.data.bucket_table import log_bucket_report
from src.data.buckets import Bucket, BucketConfig
from src.data.catalog import SampleInfo, ShardInfo, Skip, expand_urls, is_local, local_path, read_at
from src.data.feature_shards import HEADER_KEY, index_tar, sidecar_path
from src.data.holdout import split as holdout_split
from src.data.plan import GlobalBatch, Planner
from src.data.provenance import ProvenanceError, check_provenance, expected_provenance
from src.data.shards import ClipOptions, plan_order_loader, unfit_samples, write_skips
from src.data.source import Batch, FeatureSpec
from src.diffusion.condition import IMAGE_KEYS
from src.models.vae.posterior import sample_posterior

log = logging.getLogger(__name__)
READ_FAILURES = ("read_error", "nonfinite")


class CachedBuckets:
    """The plan's bucket rule for cached samples: the bucket recorded at encoding, with the configured batch."""

    def __init__(self, config: BucketConfig):
        self.config = config
        self.batch = {(res, frames): batch for res, opts in config.frames.items() for frames, _, batch in opts}

    def assign(self, meta: Mapping, rng: random.Random | None = None, can_supply: Any = None) -> Bucket | None:
        b = meta["bucket"]
        batch = self.batch.get((b["resolution"], b["num_frames"]))
        return None if batch is None else Bucket(b["resolution"], b["num_frames"], b["height"], b["width"], batch)

    def why_no_bucket(self, meta: Mapping) -> str | None:
        """None when the sample's cached bucket is configured; otherwise which bucket it has and which are."""
        if self.assign(meta) is not None:
            return None
        b = meta["bucket"]
        return (
            f"encoded in bucket {b['resolution']}/{b['num_frames']}f/{b['height']}x{b['width']}, which this run's "
            f"bucket config does not list (configured: {self.describe()})"
        )

    def describe(self) -> str:
        return self.config.describe()


def read_sidecar(url: str) -> dict | None:
    """The sidecar of a finished feature shard, None when the shard is unfinished (no sidecar)."""
    path = sidecar_path(local_path(url))
    return json.loads(path.read_text()) if path.is_file() else None


class CachedFeatureDataset(IterableDataset):
    """This rank's batches: `latent` (B, C, T', H', W'), `txt` (B, L, D), `vec` (B, Dv), fp32, plus `caption`, `key`,
    `index`, `valid`, `bucket`, `state`, `failed` and `plan_skipped` as `VideoShardDataset` gives them.

    With `vae.posterior: sample` each training latent is a fresh draw mean + std * eps, seeded by (seed, global
    sample index) (`src.models.vae.posterior`); held-out (validation) latents are the mean."""

    encoded = True  # batches hold the features: no text encoder or VAE is built

    def __init__(
        self,
        urls: str | Sequence[str],
        buckets: BucketConfig,
        expect: Mapping[str, Any],
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        mix_shards: int = 4,
        state: Mapping | None = None,
        skip_dir: str | Path | None = None,
        holdout: int = 0,
        val_urls: str | Sequence[str] | None = None,
    ):
        super().__init__()
        self.expect, self.dp_rank, self.skip_dir, self.seed = dict(expect), dp_rank, skip_dir, seed
        self.sample_posterior = self.expect["vae"].get("posterior") == "sample"  # the cache holds mean and std
        shards, self.scan_skips, headers = [], [], {}
        for url in expand_urls(urls):
            if not is_local(url):
                raise ValueError(f"feature shard {url!r}: cached features are read by offset and must be local files")
            header = read_sidecar(url)
            if header is None:
                self.scan_skips.append(Skip(url, "unfinished_shard", "no sidecar .json: preprocessing did not finish"))
                continue
            check_provenance(header, self.expect, f"feature shard {url}")
            headers[url] = header
            samples = [SampleInfo(s["key"], "safetensors", s) for s in header["samples"]]
            shards.append(ShardInfo(url, samples))
        if not headers:
            raise ValueError(f"no finished feature shard in {urls!r}: run `src.preprocess` with this experiment first")
        first = next(iter(headers.values()))
        self.text_shape = self._agree(headers, "text_shape")
        self.null = self._read_null(next(iter(headers)))  # (L, D), (Dv)
        if tuple(self.null[0].shape) != tuple(self.text_shape):
            raise ValueError(f"null features {tuple(self.null[0].shape)} do not match text_shape {self.text_shape}")
        self.latent_channels = first["vae"]["latent_channels"]
        # the I2V condition's given frames the cache stores, each (C, 1, H', W') (src/diffusion/condition.py)
        self.image_keys = tuple(IMAGE_KEYS[n] for n in first["storage"].get("cond_images", ()))
        self.text_dims = (first["text_shape"][1], first["vec_dim"])
        self.cached_buckets = CachedBuckets(buckets)
        if dp_rank == 0:
            write_skips(skip_dir, "catalog", self.scan_skips)
        shards, self.held = self._hold_out(shards, buckets, holdout, val_urls)
        self.unfit = unfit_samples(shards, self.cached_buckets.why_no_bucket)
        if dp_rank == 0:
            write_skips(skip_dir, "catalog", self.unfit)
        self.planner = Planner(shards, self.cached_buckets, lambda *_: True, dp_world, seed, shuffle, mix_shards, state)
        self.latent_shapes = {
            bucket.name: tuple(s["latent_shape"])
            for header in headers.values()
            for s in header["samples"]
            if (bucket := self.cached_buckets.assign(s)) is not None
        }  # bucket name -> (C, T', H', W')
        if not self.latent_shapes:
            cached = sorted({json.dumps(s["bucket"]) for h in headers.values() for s in h["samples"]})
            raise ValueError(
                f"no cached sample is in a configured bucket. Cached: {', '.join(cached)}; configured: "
                f"{buckets.describe()}"
            )
        log.info("cached features: %d samples in %d shards", self.planner.size, len(shards))
        if dp_rank == 0:
            log_bucket_report(self.planner, self.unfit)

    def _hold_out(self, shards: list[ShardInfo], buckets: BucketConfig, n: int, val_urls) -> tuple[list, list]:
        """(training shards, held-out (shard, sample) pairs) of the first configured bucket that holds samples."""
        if not n:
            return shards, []
        source = shards
        if val_urls:
            source = []
            for url in expand_urls(val_urls):
                header = read_sidecar(url)
                if header is None:
                    raise ValueError(
                        f"validation feature shard {url!r} has no sidecar .json: preprocessing did not finish"
                    )
                check_provenance(header, self.expect, f"validation feature shard {url}")
                source.append(ShardInfo(url, [SampleInfo(s["key"], "safetensors", s) for s in header["samples"]]))
        names = {b.name for sh in source for s in sh.samples if (b := self.cached_buckets.assign(s.meta)) is not None}
        self.val_bucket = next((b for b in buckets.all_buckets() if b.name in names), None)
        if self.val_bucket is None:
            raise ValueError(f"eval.val={n}: no cached sample is in a configured bucket ({buckets.describe()})")

        def eligible(s: SampleInfo) -> bool:
            bucket = self.cached_buckets.assign(s.meta)
            return bucket is not None and bucket.name == self.val_bucket.name

        held = holdout_split(source, n, eligible)[1]
        return (shards if val_urls else holdout_split(shards, n, eligible)[0]), held

    def validation(self) -> Batch | None:
        """The held-out samples' features as one batch (`latent`, `txt`, `vec`, `caption`, `key`); None without a
        hold-out. A damaged or non-finite sample is an error naming it."""
        if not self.held:
            return None
        reader, rows = FeatureReader(self.expect), []
        try:
            for shard, sample in self.held:
                try:
                    tensors = reader.read(shard.url, sample.key)
                except (OSError, KeyError, ValueError) as err:
                    raise ValueError(f"validation sample {shard.url}:{sample.key} cannot be read: {err}") from err
                if not all(torch.isfinite(t).all() for t in tensors.values()):
                    raise ValueError(f"validation sample {shard.url}:{sample.key} has non-finite features")
                rows.append(tensors)
        finally:
            reader.close()
        return {
            **{k: torch.stack([r[k].float() for r in rows]) for k in ("latent", "txt", "vec")},
            "caption": [s.meta.get("caption", "") for _, s in self.held],
            "key": [f"{shard.url}:{s.key}" for shard, s in self.held],
            "bucket": self.val_bucket.name,
        }

    @staticmethod
    def _agree(headers: Mapping[str, dict], key: str) -> Any:
        values = {json.dumps(h[key]): url for url, h in headers.items()}
        if len(values) > 1:
            raise ValueError(
                f"feature shards disagree on {key}: " + "; ".join(f"{v} in {u}" for v, u in values.items())
            )
        return next(iter(headers.values()))[key]

    def _read_null(self, url: str) -> tuple[torch.Tensor, torch.Tensor]:
        members = index_tar(local_path(url))
        with open(local_path(url), "rb") as f:
            null = load_tensors(read_at(f, members[HEADER_KEY]["safetensors"]))
        return null["null_txt"].float(), null["null_vec"].float()

    def feature_spec(self, text=None, vae=None) -> FeatureSpec:
        """What the features are, from the source itself (the encoders, when built for fixed prompts, are unused)."""
        null_txt, null_vec = self.null_features()
        return FeatureSpec(null_txt, null_vec, dict(self.latent_shapes), *self.text_dims)

    def null_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's features from the cache: (1, L, D), (1, Dv)."""
        return self.null[0][None], self.null[1][None]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = FeatureReader(self.expect)
        try:
            for batch in self.planner:
                if batch.number % workers == worker:
                    yield self.read_batch(batch, reader)
        finally:
            reader.close()

    def read_batch(self, batch: GlobalBatch, reader: FeatureReader) -> Batch:
        latents, txts, vecs, captions, keys, valid, skips = [], [], [], [], [], [], []
        images: dict[str, list] = {k: [] for k in self.image_keys}
        shape = self.latent_shapes[batch.bucket.name]
        for g in batch.rank_slice(self.dp_rank):
            shard, sample = self.planner.locate(g)
            try:
                tensors = reader.read(shard.url, sample.key)
                ok = all(torch.isfinite(t).all() for t in tensors.values())
                if not ok:
                    skips.append(Skip(f"{shard.url}:{sample.key}", "nonfinite", "non-finite cached features"))
                elif self.sample_posterior:  # a new draw each time the sample comes round (g counts across epochs)
                    tensors["latent"] = sample_posterior(tensors["latent"], tensors["latent_std"], self.seed, g)
            except ProvenanceError:
                raise
            except (OSError, KeyError, ValueError) as err:  # a damaged member: skipped and counted, never used
                skips.append(Skip(f"{shard.url}:{sample.key}", "read_error", f"{type(err).__name__}: {err}"))
                ok = False
            if not ok:
                tensors = {
                    "latent": torch.zeros(shape),
                    "txt": torch.zeros(self.text_shape),
                    "vec": torch.zeros(self.text_dims[1]),
                    **{k: torch.zeros(shape[0], 1, *shape[2:]) for k in self.image_keys},
                }
            latents.append(tensors["latent"].float())
            txts.append(tensors["txt"].float())
            vecs.append(tensors["vec"].float())
            for k in self.image_keys:
                images[k].append(tensors[k].float())
            captions.append(sample.meta.get("caption", ""))
            keys.append(sample.key)
            valid.append(ok)
        write_skips(self.skip_dir, f"rank{self.dp_rank}", skips)
        return {
            "latent": torch.stack(latents),  # (B, C, T', H', W')
            "txt": torch.stack(txts),  # (B, L, D)
            "vec": torch.stack(vecs),  # (B, Dv)
            **{k: torch.stack(v) for k, v in images.items()},  # (B, C, 1, H', W') each
            "caption": captions,
            "key": keys,
            "index": torch.tensor(batch.rank_slice(self.dp_rank), dtype=torch.int64),  # (B,)
            "valid": torch.tensor(valid),  # (B,)
            "bucket": batch.bucket.name,
            "state": batch.state,
            "failed": {reason: sum(s.reason == reason for s in skips) for reason in READ_FAILURES},
            "plan_skipped": batch.skipped,
        }


class FeatureReader:
    """Reads samples of local feature shards by offset; checks each tar's own header when it first opens it."""

    def __init__(self, expect: Mapping[str, Any]):
        self.expect = expect
        self.open: dict[str, tuple[Any, dict]] = {}

    def read(self, url: str, key: str) -> dict[str, torch.Tensor]:
        if url not in self.open:
            members = index_tar(local_path(url))
            f = open(local_path(url), "rb")  # noqa: SIM115 - kept open for the shard's samples
            header = json.loads(read_at(f, members[HEADER_KEY]["json"]))
            check_provenance(header, self.expect, f"feature shard {url} (its header, read while streaming)")
            self.open[url] = (f, members)
        f, members = self.open[url]
        return load_tensors(read_at(f, members[key]["safetensors"]))

    def close(self) -> None:
        for f, _ in self.open.values():
            f.close()
        self.open.clear()


def build_cached_loader(
    urls: str | Sequence[str],
    buckets: BucketConfig | DictConfig,
    expect: Mapping[str, Any],
    dp_rank: int,
    dp_world: int,
    num_workers: int = 0,
    pin_memory: bool | str = "auto",
    preprocess: Mapping | None = None,
    **options: Any,
) -> DataLoader:
    """A DataLoader of cached feature batches for this data-parallel rank, in plan order.

    `expect` holds the run's `text` and `vae` config nodes and `preprocess` the source `src.preprocess` reads, with
    the clip settings (fps, frame_stride, crop): their provenance (computed without loading any weights) is what
    every shard must match. `options`: seed, shuffle, mix_shards, state, skip_dir (see `CachedFeatureDataset`).
    """
    from hydra.utils import instantiate

    if preprocess is None:
        raise ValueError("data.preprocess is missing: its fps, frame_stride and crop say which clips the cache holds")
    clips = ClipOptions(preprocess.get("fps"), preprocess.get("frame_stride", 1), preprocess.get("crop", "center"))
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if isinstance(buckets, DictConfig | dict):
        buckets = instantiate(buckets)
    expected = expected_provenance(expect["text"], expect["vae"], clips.provenance())
    dataset = CachedFeatureDataset(urls, buckets, expected, dp_rank, dp_world, **options)
    return plan_order_loader(dataset, num_workers, pin_memory)
