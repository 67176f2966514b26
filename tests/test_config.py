"""Every experiment composes, every group instantiates (models on the meta device), and models fit encoders."""

import functools
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.data.source import bucket_latent_shapes
from src.run.setup import check_compatible, check_patches
from tests.conftest import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))


def compose_experiment(name: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", *overrides])


@functools.cache
def encoder(text_cfg_yaml: str):
    return instantiate(OmegaConf.create(text_cfg_yaml))


def test_the_required_experiments_exist():
    assert {"smoke", "demo", "stage1", "dcae", "stage1_tiny", "dcae_tiny"} <= set(EXPERIMENTS)


@pytest.mark.parametrize(("name", "channels", "patch"), [("stage1", 16, [1, 2, 2]), ("dcae", 128, [1, 1, 1])])
def test_recipe_experiments_train_from_the_cache_with_the_recipes_latents(name, channels, patch):
    cfg = compose_experiment(name)
    assert cfg.data._target_ == "src.data.cached.build_cached_loader"
    assert cfg.model.in_channels == channels and list(cfg.model.patch_size) == patch
    assert cfg.text._target_.endswith("T5CLIPTextEncoder") and cfg.text.max_length == 512


def test_the_learning_check_trains_the_demos_stage_1_recipe_on_a_narrower_model():
    # the learning regression test stands for the demo: it may differ in width and engine, not in recipe or data
    demo, check = compose_experiment("demo"), compose_experiment("learning_check")
    narrower = {"hidden", "heads"}
    assert {k: v for k, v in check.model.items() if k not in narrower} == {
        k: v for k, v in demo.model.items() if k not in narrower
    }
    assert check.model.hidden // check.model.heads == demo.model.hidden // demo.model.heads  # the same RoPE split
    for group in ("diffusion", "optim", "text", "vae"):
        assert check[group] == demo[group], group
    assert check.data.buckets == demo.data.buckets and check.data.frame_stride == demo.data.frame_stride
    assert check.eval.prompts == demo.eval.prompts and check.eval.val == demo.eval.val
    assert check.steps == check.eval.alarm_after == demo.eval.alarm_after


def text_dims(text_cfg) -> tuple[int, int]:
    """(token dim, pooled dim) of a text config: built when it needs no weights path, else from its provenance."""
    if "t5_path" in text_cfg and text_cfg.t5_path is None:
        return 4096, 768  # T5-v1.1-XXL d_model, CLIP-L/14 pooled: the recipe's encoders (weights are the user's)
    text = encoder(OmegaConf.to_yaml(text_cfg))
    return text.dim, text.pooled_dim


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name):
    cfg = compose_experiment(name)
    for key in ("steps", "seed", "log_every", "ckpt_every"):
        assert isinstance(cfg[key], int), key
    with torch.device("meta"):
        model = instantiate(cfg.model)
        opt_in = {} if cfg.vae._target_.endswith("PatchVAE") else {"random_init": True}
        vae = instantiate(cfg.vae, **opt_in)  # real checkpoints are the user's: the architecture suffices
    shapes = bucket_latent_shapes(instantiate(cfg.data.buckets), vae)
    check_compatible(model, vae.latent_channels, *text_dims(cfg.text))
    check_patches(shapes, model)
    for group in ("data", "parallel", "logger", "optim.optimizer", "optim.scheduler"):
        node = OmegaConf.select(cfg, group)
        assert "_target_" in node, group
        assert isinstance(instantiate(node), functools.partial), group
    instantiate(cfg.diffusion)


def test_every_group_option_names_a_target():
    for path in (ROOT / "conf").glob("**/*.yaml"):
        if path.parent.name in ("experiment", "optim", "curriculum") or path.parent == ROOT / "conf":
            continue
        node = OmegaConf.load(path)
        assert "_target_" in node or "defaults" in node, path


@pytest.mark.parametrize(
    ("overrides", "channels"),
    [((), 48), (("vae.spatial=8",), 192), (("vae=dcae_tiny",), 128), (("vae=hunyuan_tiny", "model=mmdit_11b"), 16)],
)
def test_model_in_channels_follow_the_vae(overrides, channels):
    cfg = compose_experiment("smoke", overrides)
    assert cfg.model.in_channels == channels
    assert OmegaConf.to_container(cfg.model, resolve=True)["in_channels"] == channels  # as config.yaml records it


def test_no_experiment_restates_the_vae_channels():
    for path in (ROOT / "conf/experiment").glob("*.yaml"):
        assert "in_channels" not in OmegaConf.load(path).get("model", {}), path


def test_a_vae_config_without_target_is_named():
    cfg = OmegaConf.create({"vae": {"spatial": 4}, "model": {"in_channels": "${latent_channels:${vae}}"}})
    with pytest.raises(ValueError, match=r"needs a VAE config with a _target_, got keys \['spatial'\]"):
        _ = cfg.model.in_channels


def test_mismatched_encoders_are_refused():
    # the channels follow the VAE; one stated by hand against it is still caught at start
    cfg = compose_experiment("smoke", ("model=mmdit_1b", "model.in_channels=16"))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    with pytest.raises(ValueError, match=r"in_channels=16 but the VAE gives 48.*txt_dim=4096"):
        check_compatible(model, instantiate(cfg.vae).latent_channels, *text_dims(cfg.text))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("log_every=0", "log_every must be >= 1, got 0"),
        ("ckpt_every=-5", r"ckpt_every must be >= 1, or 0 for no checkpoint \(benchmarks\), got -5"),
        ("steps=-1", "steps must be >= 0, got -1"),
        ("resume=newest", r"resume must be one of \('latest', 'latest_intact'\), got 'newest'"),
        ("ckpt_keep=0", r"ckpt_keep must be >= 1 \(the newest N checkpoints\), or null to keep all, got 0"),
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
    with pytest.raises(ValueError, match=r"bucket 20px/8f/20x20 does not fit the model.*patch_size"):
        check_patches(bucket_latent_shapes(odd, instantiate(cfg.vae)), model)
    with pytest.raises(ValueError, match=r"bucket 20px/8f/20x20 does not fit the VAE.*not divisible"):
        bucket_latent_shapes(odd, instantiate(cfg.vae, spatial=8))


def test_every_curriculum_composes_stage_by_stage(tmp_path):
    # each stage's config composes, and stage i+1 starts from stage i's run directory
    from src.stages import plan, read_curriculum

    for path in (ROOT / "conf" / "curriculum").glob("*.yaml"):
        stages = plan(read_curriculum(path), tmp_path, 2, [])
        assert [s["run_dir"].parent for s in stages] == [tmp_path] * len(stages), path
        for before, after in zip(stages, stages[1:], strict=False):
            assert f"init_from={before['run_dir']}" in after["train"], path
            assert after["train"][:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2"]  # fmt: skip
