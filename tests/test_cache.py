"""The feature cache: preprocess -> train without encoders, provenance refusals, resumable preprocessing.

Uses the stage1_tiny experiment (tiny random HunyuanVideo VAE, real MiniLM) on the shipped fixture shards.
"""

import io
import itertools
import json
import shutil
import sys
import tarfile

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from src.data.cached import FeatureReader
from src.data.preprocess import preprocess
from src.data.provenance import ProvenanceError, check_provenance, expected_provenance
from src.data.shards import ClipOptions
from src.models.provenance import config_provenance
from src.models.vae.posterior import sample_posterior
from src.run.metrics import read_metrics
from tests.conftest import ROOT
from tests.test_train import run


def compose_cfg(cache_dir, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["+experiment=stage1_tiny", f"data.urls={cache_dir}", *overrides])


def loader_for(cache_dir, *overrides: str, **kwargs):
    cfg = compose_cfg(cache_dir, *overrides)
    return instantiate(cfg.data)(dp_rank=0, dp_world=1, seed=0, **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The fixture shards encoded once, on 2 ranks, through the real torchrun entry point."""
    cache_dir = tmp_path_factory.mktemp("cache")
    proc = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "src.preprocess"]
        + ["+experiment=stage1_tiny", f"data.urls={cache_dir}"]
    )
    assert "4 shards written" in proc.stdout
    return cache_dir


def test_preprocess_writes_shards_with_provenance_statistics_and_a_report(cache):
    report = json.loads((cache / "report.json").read_text())
    assert report["shards_written"] == 4 and report["samples_written"] == 16 and report["ranks"] == 2
    side = json.loads((cache / "shard-000000.json").read_text())
    assert side["text"]["max_length"] == 16 and side["text"]["mask_convention"] == "attend_padding"
    assert side["text"]["weights_sha256"] and side["vae"]["name"] == "hunyuan"
    assert side["vae"]["scaling_factor"] == 0.476986 and side["vae"]["tiling"]["spatial"]["tile_size"] == 256
    assert side["buckets"] == {"32px/5f/32x32": 4} and side["kiln_version"]
    assert side["stats"]["latent"]["nonfinite"] == 0 and side["stats"]["latent"]["count"] == 4 * 16 * 2 * 4 * 4
    with tarfile.open(cache / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["__kiln__.json", "__kiln__.safetensors"]  # the header comes before any feature


def test_cached_batches_hold_the_encoders_features(cache):
    loader = loader_for(cache, "data.shuffle=false")
    batch = next(iter(loader))
    assert batch["latent"].shape == (2, 16, 2, 4, 4) and batch["txt"].shape == (2, 16, 384)
    assert batch["vec"].shape == (2, 384) and batch["valid"].all()
    cfg = compose_cfg(cache)
    text = instantiate(cfg.text)
    txt, vec = text(batch["caption"])
    assert torch.allclose(batch["txt"], txt, atol=1e-5) and torch.allclose(batch["vec"], vec, atol=1e-5)
    null_txt, null_vec = loader.dataset.null_features()  # CFG's empty prompt: from the cache itself
    assert torch.allclose(null_txt, text([""])[0], atol=1e-5)


@pytest.mark.parametrize(
    ("override", "field", "cached", "configured"),
    [
        ("text.max_length=8", "text.max_length", "16", "8"),
        ("text.dtype=bfloat16", "text.dtype", "'float32'", "'bfloat16'"),
        ("vae=patch", "vae.name", "'hunyuan'", "'patch'"),
        ("vae.scaling_factor=0.5", "vae.scaling_factor", "0.476986", "0.5"),
        # random weights (weights_sha256 null on both sides): the architecture tells them apart
        ("vae.arch.layers_per_block=2", "vae.architecture.layers_per_block", "1", "2"),
        ("data.preprocess.frame_stride=2", "clips.frame_stride", "1", "2"),
        ("data.preprocess.crop=random", "clips.crop", "'center'", "'random'"),
    ],
)
def test_a_cache_made_with_other_encoders_is_refused_naming_the_field(cache, override, field, cached, configured):
    with pytest.raises(
        ProvenanceError, match=rf"{field}: the cache has {cached}, this run's config gives {configured}"
    ):
        loader_for(cache, override)


def test_a_text_encoder_with_other_weights_is_refused(cache, tmp_path):
    from safetensors.torch import load_file, save_file

    from src.models.text import minilm_path

    other = tmp_path / "minilm"
    shutil.copytree(minilm_path(), other)
    weights = next(other.glob("*.safetensors"))
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, weights)
    with pytest.raises(ProvenanceError, match=r"text\.weights_sha256: the cache has '[0-9a-f]{64}'"):
        loader_for(cache, f"text.path={other}")


def test_a_shard_swapped_while_streaming_is_refused(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    loader = loader_for(copy, "data.shuffle=false")
    # after the start-up check: replace every tar's header with one from another max_length
    for tar_path in copy.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        header = json.loads(members[0][1])
        header["text"]["max_length"] = 77
        members[0] = (members[0][0], json.dumps(header).encode())
        with tarfile.open(tar_path, "w") as tar:
            for info, data in members:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ProvenanceError, match=r"(?s)read while streaming.*text\.max_length: the cache has 77"):
        next(iter(loader))


def test_unfinished_and_damaged_shards_are_reported_not_used(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (copy / "shard-000003.json").unlink()  # preprocessing did not finish this one
    loader = loader_for(copy, "data.shuffle=false")
    assert [s.reason for s in loader.dataset.scan_skips] == ["unfinished_shard"]
    assert loader.dataset.planner.size == 12


def test_preprocess_resumes_and_refuses_to_mix_configs(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (copy / "shard-000001.json").unlink()
    before = (copy / "shard-000000.tar").stat().st_mtime_ns
    report = preprocess(compose_cfg(copy))
    assert report["shards_done"] == 3 and report["shards_written"] == 1
    assert (copy / "shard-000000.tar").stat().st_mtime_ns == before  # finished shards are left alone
    with pytest.raises(ProvenanceError, match="existing feature shard"):
        preprocess(compose_cfg(copy, "text.max_length=8"))
    with pytest.raises(ProvenanceError, match="clips.frame_stride: the cache has 1, this run's config gives 2"):
        preprocess(compose_cfg(copy, "data.preprocess.frame_stride=2"))  # not "3 already done"


def test_a_random_dcae_of_another_architecture_does_not_pass_the_cache_check():
    cfg = compose_cfg("unused", "vae=dcae_tiny")
    clips = ClipOptions().provenance()
    recorded = {**expected_provenance(cfg.text, cfg.vae, clips), "vae": instantiate(cfg.vae).describe()}
    check_provenance(recorded, expected_provenance(cfg.text, cfg.vae, clips), "the same config")  # what preprocess
    # recorded is what training expects; the same compression and channels from other widths are not the same VAE
    other = compose_cfg("unused", "vae=dcae_tiny", "vae.widths=[8,16,32,64,128,256]")
    assert config_provenance(other.vae)["weights_sha256"] is None
    with pytest.raises(ProvenanceError, match=r"vae\.architecture\.widths: the cache has \[8, 16, 32, 64, 128, 128\]"):
        check_provenance(recorded, expected_provenance(other.text, other.vae, clips), "the dcae_tiny cache")


def test_train_from_the_cache_on_two_ranks_builds_no_encoder(cache, tmp_path):
    run_dir = tmp_path / "run"
    run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "src.train"]
        + ["+experiment=stage1_tiny", f"data.urls={cache}", f"hydra.run.dir={run_dir}"]
    )
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    log = (run_dir / "train.log").read_text()
    assert "cached features: 16 samples in 4 shards" in log
    assert "RANDOM weights" not in log  # the (random tiny) VAE was never built


def test_dcae_tiny_preprocesses_and_trains_on_dc_ae_latents(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    common = ["+experiment=dcae_tiny", f"data.urls={cache}"]
    run([sys.executable, "-m", "src.preprocess", *common])
    side = json.loads((cache / "shard-000000.json").read_text())
    assert side["vae"]["name"] == "dcae" and side["vae"]["latent_channels"] == 128
    assert side["samples"][0]["latent_shape"] == [128, 2, 1, 1]  # 8 x 32 x 32 pixels -> 2 x 1 x 1 latents
    run([sys.executable, "-m", "src.train", *common, "parallel=local", f"hydra.run.dir={run_dir}"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)


def test_a_cached_run_holds_out_validation_clips_by_key(cache, tmp_path):
    # the held-out samples never reach the plan; validation reads their cached features (no encoder is built)
    train_keys = {s.key for sh in loader_for(cache, holdout=4).dataset.planner.shards for s in sh.samples}
    held = loader_for(cache, holdout=4).dataset.validation()
    assert len(train_keys) == 12 and held["latent"].shape[0] == 4
    assert not {k.rsplit(":", 1)[1] for k in held["key"]} & train_keys
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "src.train", "+experiment=stage1_tiny", f"data.urls={cache}", "parallel=local",
         "eval.val=4", f"hydra.run.dir={run_dir}"])  # fmt: skip
    (final,) = read_metrics(run_dir, "eval")
    assert final["step"] == 4 and len(final["val_loss_by_t"]) == 8 and final["probe_text_se"] > 0
    assert "RANDOM weights" not in (run_dir / "train.log").read_text()


def test_a_sampled_posterior_is_cached_as_mean_and_std_and_drawn_at_every_visit(tmp_path):
    """vae.posterior=sample (Open-Sora's training): the cache holds the posterior's mean and std; each time a sample
    comes round, the loader gives mean + std * eps drawn from (seed, global index); validation reads the mean."""
    cache = tmp_path / "cache"
    preprocess(compose_cfg(cache, "vae.posterior=sample"))
    side = json.loads((cache / "shard-000000.json").read_text())
    assert side["vae"]["posterior"] == "sample"
    assert side["stats"]["latent_std"]["count"] == side["stats"]["latent"]["count"] == 4 * 16 * 2 * 4 * 4
    assert side["stats"]["latent_std"]["min"] > 0
    loader = loader_for(cache, "vae.posterior=sample", "data.shuffle=false")
    reader, seen = FeatureReader(loader.dataset.expect), {}
    for batch in itertools.islice(loader, 9):  # 8 batches of 2 make an epoch: the 9th revisits its first samples
        for index, latent in zip(batch["index"].tolist(), batch["latent"], strict=True):
            shard, sample = loader.dataset.planner.locate(index)
            stored = reader.read(shard.url, sample.key)
            assert torch.equal(latent, sample_posterior(stored["latent"], stored["latent_std"], 0, index))
            seen.setdefault((shard.url, sample.key), []).append(latent)
    revisited = [draws for draws in seen.values() if len(draws) == 2]
    assert len(revisited) == 2 and not any(torch.equal(*draws) for draws in revisited)  # a new draw per visit
    val = loader_for(cache, "vae.posterior=sample", holdout=2).dataset.validation()
    url, name = val["key"][0].rsplit(":", 1)
    assert torch.equal(val["latent"][0], reader.read(url, name)["latent"].float())
    reader.close()
    with pytest.raises(ProvenanceError, match="vae.posterior: the cache has 'sample', this run's config gives 'mode'"):
        loader_for(cache)
