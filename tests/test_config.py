"""Every experiment composes, every group instantiates (models on the meta device), and models fit encoders."""

import functools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.train import check_buckets, check_compatible
from tests.conftest import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))


def compose_experiment(name: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", *overrides])


@functools.cache
def encoder(text_cfg_yaml: str):
    return instantiate(OmegaConf.create(text_cfg_yaml))


def test_the_required_experiments_exist():
    assert {"smoke", "demo"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name):
    cfg = compose_experiment(name)
    for key in ("steps", "seed", "log_every", "ckpt_every"):
        assert isinstance(cfg[key], int), key
    with torch.device("meta"):
        model = instantiate(cfg.model)
    vae = instantiate(cfg.vae)
    text = encoder(OmegaConf.to_yaml(cfg.text))
    check_compatible(model, vae, text)
    check_buckets(instantiate(cfg.data.buckets), vae, model)
    for group in ("data", "parallel", "logger", "optim.optimizer", "optim.scheduler"):
        node = OmegaConf.select(cfg, group)
        assert "_target_" in node, group
        assert isinstance(instantiate(node), functools.partial), group
    instantiate(cfg.diffusion)


def test_every_group_option_names_a_target():
    for path in (ROOT / "conf").glob("**/*.yaml"):
        if path.parent.name in ("experiment", "optim") or path.parent == ROOT / "conf":
            continue
        node = OmegaConf.load(path)
        assert "_target_" in node or "defaults" in node, path


def test_mismatched_encoders_are_refused():
    cfg = compose_experiment("smoke", ("model=mmdit_1b",))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    with pytest.raises(ValueError, match=r"in_channels=16 but the VAE gives 48.*txt_dim=4096"):
        check_compatible(model, instantiate(cfg.vae), encoder(OmegaConf.to_yaml(cfg.text)))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("log_every=0", "log_every must be >= 1, got 0"),
        ("ckpt_every=-5", "ckpt_every must be >= 1, got -5"),
        ("steps=-1", "steps must be >= 0, got -1"),
    ],
)
def test_bad_knobs_are_refused_before_anything_starts(override, message):
    from src.train import check_knobs

    with pytest.raises(ValueError, match=message):
        check_knobs(compose_experiment("smoke", (override,)))


def test_buckets_that_do_not_fit_the_vae_and_patch_are_refused():
    from src.data.buckets import BucketConfig

    cfg = compose_experiment("smoke")
    with torch.device("meta"):
        model = instantiate(cfg.model)
    odd = BucketConfig({"20px": {"8": [1.0, 2]}}, aspect_ratios=["1:1"], size_multiple=4)  # 20x20 -> 5x5 latent
    with pytest.raises(ValueError, match=r"bucket 20px/8f/20x20 does not fit the VAE and the model.*patch_size"):
        check_buckets(odd, instantiate(cfg.vae), model)
