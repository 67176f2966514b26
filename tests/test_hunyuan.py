"""The HunyuanVideo VAE wrapper: Open-Sora's checkpoint names, strict loading, the 4k+1 rule, provenance."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from src.diffusion.flow import sample_generator
from src.models.provenance import config_provenance
from src.models.vae.hunyuan import HunyuanVAE
from src.models.vae.posterior import sample_posterior

FIXTURES = Path(__file__).parent / "fixtures"
TINY = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/vae/hunyuan_tiny.yaml"))["arch"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return HunyuanVAE(arch=TINY, random_init=True)


def test_default_diffusers_class_has_the_names_and_shapes_open_sora_distributes():
    from diffusers import AutoencoderKLHunyuanVideo

    manifest = json.loads((FIXTURES / "hunyuan_vae_state_dict.json").read_text())
    with torch.device("meta"):
        state = AutoencoderKLHunyuanVideo().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == manifest


def test_encode_decode_shapes_and_frame_rule(tiny):
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    z = tiny.encode(video)
    assert z.shape == (2, *tiny.latent_shape(9, 32, 48)) == (2, 16, 3, 4, 6)
    assert tiny.decode(z).shape == video.shape
    with pytest.raises(ValueError, match=r"8 frames .* 4k\+1 frames, e.g. 5 or 9"):
        tiny.latent_shape(8, 32, 32)
    with pytest.raises(ValueError, match=r"^0 frames .* 4k\+1 frames, e.g. 1 or 5$"):
        tiny.latent_shape(0, 32, 32)
    with pytest.raises(ValueError, match="30x32 is not divisible"):
        tiny.latent_shape(9, 30, 32)


def test_mode_posterior_is_deterministic_and_scaled(tiny):
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    raw = tiny.vae.encode(video).latent_dist.mode()
    assert torch.equal(tiny.encode(video), tiny.encode(video))
    assert torch.allclose(tiny.encode(video), raw * 0.476986)


def test_temporal_tiling_is_off_unless_asked(tiny):
    """Open-Sora's stage configs encode a clip whole in time; diffusers would tile past 16 frames by default."""
    video = torch.rand(1, 3, 21, 16, 16) * 2 - 1  # 21 frames: beyond diffusers' 16-frame temporal tile
    whole = tiny.vae.quant_conv(tiny.vae.encoder(video)).chunk(2, dim=1)[0]  # the mean of one untiled pass
    assert torch.equal(tiny.encode(video), (whole - 0.0) * 0.476986)
    framewise = HunyuanVAE(arch=TINY, random_init=True, temporal_tiling=True)
    framewise.load_state_dict(tiny.state_dict())
    tiled = framewise.encode(video)
    assert tiled.shape == (1, 16, 6, 2, 2) and not torch.allclose(tiled, tiny.encode(video), atol=1e-3)
    assert framewise.describe()["tiling"] == {
        "spatial": {"tile_size": 256, "tile_stride": 192},
        "temporal": {"tile_frames": 16, "tile_frame_stride": 12},
    }
    assert tiny.describe()["tiling"] == {"spatial": {"tile_size": 256, "tile_stride": 192}, "temporal": None}
    assert HunyuanVAE.provenance(arch=TINY, tiling=False)["tiling"] is None


def test_posterior_mean_and_std_in_latent_units(tiny):
    """encode_posterior gives what a cache stores for `posterior: sample`: mean' = mean * scale (the mode `encode`
    gives) and std' = std * scale, so mean' + std' * eps is a scaled posterior sample."""
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    dist = tiny.vae.encode(video).latent_dist
    mean, std = tiny.encode_posterior(video)
    assert torch.equal(mean, tiny.encode(video))
    assert torch.equal(std, dist.std * 0.476986) and (std > 0).all()
    sample = sample_posterior(mean[0], std[0], seed=3, index=7)
    assert torch.equal(sample, sample_posterior(mean[0], std[0], seed=3, index=7))  # a function of (seed, index)
    assert not torch.equal(sample, sample_posterior(mean[0], std[0], seed=3, index=8))
    with pytest.raises(ValueError, match="posterior='random'"):
        HunyuanVAE(arch=TINY, random_init=True, posterior="random")


@pytest.mark.numerics
def test_posterior_draws_are_standard_normal_and_apart_from_the_flow_noise():
    """eps = (sample - mean) / std over n = 65,536 values: its mean is within 5 / sqrt(n) = 0.020 of 0, its variance
    within 5 sqrt(2 / n) = 0.028 of 1 (5 standard errors), and it is not the flow noise of the same (seed, index)
    (their correlation within 5 / sqrt(n) of 0)."""
    mean, std = torch.full((16, 4, 32, 32), 0.5), torch.full((16, 4, 32, 32), 2.0)
    n = mean.numel()
    eps = (sample_posterior(mean, std, seed=0, index=42) - mean) / std
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    noise = torch.randn(mean.shape, generator=sample_generator(0, 42))
    assert abs((eps * noise).mean().item()) < 5 / n**0.5


def test_loads_a_single_file_and_a_diffusers_directory_strictly(tiny, tmp_path):
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    state = {k: v.contiguous() for k, v in tiny.vae.state_dict().items()}
    save_file(state, tmp_path / "hunyuan_vae.safetensors")
    from_file = HunyuanVAE(path=str(tmp_path / "hunyuan_vae.safetensors"), arch=TINY)
    assert torch.equal(from_file.encode(video), tiny.encode(video))

    tiny.vae.save_pretrained(tmp_path / "diffusers")  # config.json carries the tiny architecture
    from_dir = HunyuanVAE(path=str(tmp_path / "diffusers"))
    assert torch.equal(from_dir.encode(video), tiny.encode(video))


def test_a_damaged_checkpoint_is_refused_listing_the_keys(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.vae.state_dict().items()}
    state.pop("encoder.conv_in.conv.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    state["quant_conv.weight"] = torch.zeros(3, 3, 1, 1, 1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as err:
        HunyuanVAE(path=str(tmp_path / "bad.safetensors"), arch=TINY)
    message = str(err.value)
    assert "1 missing: encoder.conv_in.conv.bias" in message
    assert "1 unexpected: encoder.extra.weight" in message
    assert "1 mis-shaped: quant_conv.weight (checkpoint [3, 3, 1, 1, 1]" in message
    assert load_file(tmp_path / "bad.safetensors")  # the file itself is left as it was


def test_provenance_from_config_equals_the_built_model(tiny, tmp_path):
    node = OmegaConf.load(Path(__file__).parents[1] / "conf/vae/hunyuan.yaml")
    node.dtype, node.arch = "float32", TINY
    assert config_provenance(node) == tiny.describe()
    save_file({k: v.contiguous() for k, v in tiny.vae.state_dict().items()}, tmp_path / "w.safetensors")
    node.path = str(tmp_path / "w.safetensors")
    recorded = config_provenance(node)
    assert recorded["weights_sha256"] and recorded["weights_sha256"] != tiny.describe()["weights_sha256"]
    assert recorded["scaling_factor"] == 0.476986 and recorded["latent_channels"] == 16


def test_random_weights_need_an_explicit_opt_in():
    with pytest.raises(ValueError, match="vae.path is null: point it to Open-Sora's hunyuan_vae.safetensors"):
        HunyuanVAE(arch=TINY)
    with pytest.raises(ValueError, match="does not exist"):
        HunyuanVAE(path="/nowhere/hunyuan_vae.safetensors")
