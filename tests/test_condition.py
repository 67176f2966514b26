"""Image-to-video conditioning (src/diffusion/condition.py): Open-Sora 2.0's condition layout, the seeded per-sample
draw of its types, the loop feeding it to the model (cached and online data), and `src.sample --image`."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from src.data.source import training_condition
from src.diffusion.condition import (
    build_condition,
    check_condition_input,
    check_weights,
    draw_types,
    guided_velocity_i2v,
    image_guidance_scale,
    needed_images,
    oscillating,
    place_given,
)
from src.diffusion.flow import FlowMatching
from src.diffusion.sampler import euler_sample
from tests.conftest import ROOT

B, C, T, H, W = 4, 3, 5, 2, 2


def given_latents() -> tuple[torch.Tensor, torch.Tensor]:
    head = torch.arange(B * C * H * W, dtype=torch.float32).view(B, C, 1, H, W) + 1  # never 0
    return head, -head


@pytest.mark.parametrize(
    ("kind", "frames"),
    [("t2v", {}), ("i2v_head", {0: "head"}), ("i2v_tail", {T - 1: "tail"}), ("i2v_loop", {0: "head", T - 1: "tail"})],
)
def test_each_type_places_its_frames_as_mask_then_masked_latent(kind, frames):
    head, tail = given_latents()
    cond = build_condition([kind] * B, (B, C, T, H, W), head, tail)
    assert cond.shape == (B, 1 + C, T, H, W)
    for f in range(T):
        image = {"head": head, "tail": tail}.get(frames.get(f))
        expect_mask = 1.0 if image is not None else 0.0
        assert torch.equal(cond[:, 0, f], torch.full((B, H, W), expect_mask))  # channel 0: the mask
        expected = image[:, :, 0] if image is not None else torch.zeros(B, C, H, W)
        assert torch.equal(cond[:, 1:, f], expected)  # channels 1..C: the given latent where the mask is 1, else 0


def test_types_mix_within_a_batch_and_missing_images_are_named():
    head, tail = given_latents()
    cond = build_condition(["t2v", "i2v_head", "i2v_tail", "i2v_loop"], (B, C, T, H, W), head, tail)
    assert cond[:, 0, :, 0, 0].tolist() == [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 1]]
    assert torch.equal(cond[3, 1:, 0], head[3, :, 0]) and torch.equal(cond[3, 1:, -1], tail[3, :, 0])
    assert torch.equal(build_condition(["t2v"] * B, (B, C, T, H, W)), torch.zeros(B, 1 + C, T, H, W))
    with pytest.raises(ValueError, match=r"condition types \['i2v_tail'\] need the tail image latents"):
        build_condition(["t2v", "i2v_tail", "t2v", "t2v"], (B, C, T, H, W), head, None)
    with pytest.raises(ValueError, match=r"head image latents \(4, 3, 2, 2, 2\), expected \(4, 3, 1, 2, 2\)"):
        build_condition(["i2v_head"] * B, (B, C, T, H, W), torch.zeros(B, C, 2, H, W))


def test_draw_frequencies_follow_the_configured_weights():
    """Open-Sora's stage-2 mixture 1 : 5 : 1 : 1 over 20,000 sample indices: each type's share within 4 standard
    errors of weight / 8 (a binomial proportion: sqrt(p (1 - p) / n), 0.0023 for p = 1/8)."""
    weights = check_weights({"t2v": 1, "i2v_head": 5, "i2v_loop": 1, "i2v_tail": 1})
    n = 20_000
    types = draw_types(weights, torch.arange(n), seed=7)
    for kind, w in weights.items():
        p = w / 8
        share = types.count(kind) / n
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (kind, share, p)
    assert set(draw_types({"t2v": 0.0, "i2v_head": 1.0}, torch.arange(500), 0)) == {"i2v_head"}  # weight 0: never


def test_the_draw_depends_only_on_seed_and_global_index():
    weights = {"t2v": 1.0, "i2v_head": 5.0, "i2v_loop": 1.0, "i2v_tail": 1.0}
    indices = torch.arange(100, 164)
    whole = draw_types(weights, indices, seed=3)
    for ranks in (2, 4, 8):  # each rank draws its strided slice of the global batch
        split = [draw_types(weights, indices[r::ranks], seed=3) for r in range(ranks)]
        assert [split[i % ranks][i // ranks] for i in range(len(indices))] == whole
    assert draw_types(weights, indices, seed=4) != whole  # another run seed draws otherwise


def test_weights_and_model_inputs_are_checked_naming_the_values():
    assert check_weights(None) is None and needed_images(None) == ()
    assert needed_images({"t2v": 1, "i2v_head": 7}) == ("head",)
    assert needed_images({"t2v": 1, "i2v_loop": 1, "i2v_tail": 0}) == ("head", "tail")
    with pytest.raises(ValueError, match=r"unknown condition types \['v2v_head'\]; valid: \['i2v_head', 'i2v_loop'"):
        check_weights({"v2v_head": 1})
    with pytest.raises(ValueError, match=r"weights must be >= 0, got \{'t2v': -1.0\}"):
        check_weights({"t2v": -1, "i2v_head": 1})
    with pytest.raises(ValueError, match="at least one weight must be positive"):
        check_weights({"t2v": 0})
    with pytest.raises(ValueError, match="text_dropout"):
        FlowMatching(text_dropout=2.0, cond={"t2v": 1})
    model = instantiate_tiny(cond_channels=None)
    with pytest.raises(ValueError, match=r"cond_in takes None; set model.cond_channels=49"):
        check_condition_input(model, {"t2v": 1.0}, 48)
    check_condition_input(instantiate_tiny(cond_channels=49), {"t2v": 1.0}, 48)
    check_condition_input(model, None, 48)  # T2V only: no condition, whatever the model


def instantiate_tiny(**overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model.{k}={'null' if v is None else v}" for k, v in overrides.items()])
    return instantiate(cfg.model)


def test_the_loop_gives_the_model_the_condition_from_cache_keys_or_the_video():
    """Online data: the first / last frame encoded alone by the VAE; cached data: the stored image latents. The
    condition reaches the model's fifth input, and text dropout is drawn regardless of it."""
    from src.models.vae.patch import PatchVAE

    vae = PatchVAE(spatial=4)
    video = torch.rand(B, 3, T, 8, 8) * 2 - 1
    x0 = vae.encode(video)  # (B, 48, T, 2, 2)
    flow = FlowMatching(cond={"i2v_loop": 1.0}, text_dropout=0.5)
    batch = {"index": torch.arange(B), "video": video}
    online = training_condition(flow, batch, x0, vae, seed=0)
    assert torch.equal(online[:, 1:, 0], vae.encode(video[:, :, :1])[:, :, 0])
    assert torch.equal(online[:, 1:, -1], vae.encode(video[:, :, -1:])[:, :, 0])
    cached = {
        "index": torch.arange(B),
        "image_head": torch.ones(B, 48, 1, 2, 2),
        "image_tail": torch.zeros(B, 48, 1, 2, 2),
    }
    assert torch.equal(training_condition(flow, cached, x0, None, seed=0)[:, 1:, 0], torch.ones(B, 48, 2, 2))
    with pytest.raises(ValueError, match="the feature cache holds no image_head: write the cache again"):
        training_condition(flow, {"index": torch.arange(B)}, x0, None, seed=0)
    assert training_condition(FlowMatching(), batch, x0, vae, seed=0) is None  # T2V only

    seen = []

    def model(x, txt, vec, t, *cond):
        seen.append(cond)
        return torch.zeros_like(x)

    txt, vec = torch.ones(B, 2, 4), torch.ones(B, 4)
    flow.training_losses(model, x0, txt, vec, batch["index"], 0, torch.zeros(2, 4), torch.zeros(4), online)
    FlowMatching().training_losses(model, x0, txt, vec, batch["index"], 0, torch.zeros(2, 4), torch.zeros(4))
    assert torch.equal(seen[0][0], online) and seen[1] == ()


def test_no_condition_is_the_all_zero_condition_the_t2v_samples_trained_on():
    # evaluation, probes and text-to-video sampling call the model without a condition: a trained cond_in's bias
    # must still be added, as for the t2v samples of training (mask 0, latent 0)
    from src.models.mmdit import MMDiT
    from tests.conftest import tiny_model_kwargs

    torch.manual_seed(0)
    model = MMDiT(**tiny_model_kwargs(cond_channels=49)).eval()
    for layer in (model.cond_in, model.final_layer.linear):  # zero at init, as a fresh model's: as after training
        torch.nn.init.normal_(layer.weight, std=0.02)
        torch.nn.init.normal_(layer.bias)
    x, txt, vec, t = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 5, 384), torch.randn(2, 384), torch.rand(2)
    zeros = torch.zeros(2, 49, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x, txt, vec, t), model(x, txt, vec, t, zeros))
        assert not torch.equal(model(x, txt, vec, t), model(x, txt, vec, t, zeros + 1))


def test_guidance_follows_open_soras_i2v_denoiser():
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(2, 3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    assert torch.allclose(guided_velocity_i2v(*v, 1.0, 1.0), v[0], rtol=0, atol=1e-12)
    expected = v[2] + 3.0 * (v[1] - v[2]) + 7.5 * (v[0] - v[1])
    assert torch.allclose(guided_velocity_i2v(*v, 7.5, 3.0), expected, rtol=0, atol=1e-12)
    # the image scale at step 5 of 50: upper = linspace(3, 1, 51)[5] = 2.8, rising over 4 latent frames from 1
    assert image_guidance_scale(3.0, 5, 50, 4).tolist() == pytest.approx([1.0, 1.6, 2.2, 2.8])
    assert image_guidance_scale(3.0, 5, 50, 4, temporal=False).tolist() == [3.0] * 4
    assert image_guidance_scale(1.0, 5, 50, 4).tolist() == [1.0] * 4
    assert [oscillating(7.5, i) for i in (0, 9, 10, 11, 12, 13)] == [7.5, 7.5, 7.5, 1.0, 7.5, 1.0]


def test_sampling_with_a_condition_runs_three_branches_and_keeps_the_given_frames():
    head, tail = given_latents()
    cond = build_condition(["i2v_loop"] * B, (B, C, T, H, W), head, tail)
    calls = []

    def model(x, txt, vec, t, cond_in):
        calls.append((x.shape[0], cond_in[:, 0].sum().item()))
        return -x

    z = euler_sample(model, torch.randn(B, C, T, H, W), torch.ones(B, 1, 2), torch.ones(B, 2), torch.zeros(1, 2),
                     torch.zeros(2), steps=3, guidance=4.0, cond=cond)  # fmt: skip
    assert calls == [(3 * B, 2 * B * 2 * H * W)] * 3  # (text, cond), (empty, cond), (empty, no cond)
    out = place_given(z, cond)
    assert torch.equal(out[:, :, 0], head[:, :, 0]) and torch.equal(out[:, :, -1], tail[:, :, 0])
    assert torch.equal(out[:, :, 1:-1], z[:, :, 1:-1])


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_in_process(cfg, run_dir, monkeypatch) -> list[dict]:
    from src.parallel.dist import shutdown
    from src.run.metrics import read_metrics
    from src.train import train

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    try:
        train(cfg, run_dir)
    finally:
        shutdown()
    return read_metrics(run_dir)


def test_stage2_tiny_caches_the_given_frames_and_trains_t2v_and_i2v(tmp_path, monkeypatch):
    """stage2_tiny (tiny DC-AE, Open-Sora's stage2_i2v mixture): the cache stores each clip's first and last frame
    encoded alone, and 2 steps train from it with the condition reaching cond_in (non-zero after the steps)."""
    import json

    from src.checkpoint import load_model_weights
    from src.data.cached import FeatureReader
    from src.data.preprocess import preprocess

    overrides = ["+experiment=stage2_tiny", f"data.urls={tmp_path / 'cache'}", "init_from=null", "parallel=local",
                 "steps=3", "ckpt_every=3", "optim.groups=[]", "optim.schedule=[]", "ema=null"]  # fmt: skip
    cfg = compose_run(*overrides)
    preprocess(cfg)
    side = json.loads((tmp_path / "cache" / "shard-000000.json").read_text())
    assert side["storage"]["cond_images"] == ["head", "tail"]
    loader = instantiate(cfg.data)(dp_rank=0, dp_world=1, seed=0)
    batch = next(iter(loader))
    assert batch["latent"].shape[1:] == (128, 2, 1, 1) and batch["image_head"].shape[1:] == (128, 1, 1, 1)
    vae = instantiate(cfg.vae)
    stored = FeatureReader(loader.dataset.expect)
    shard, sample = loader.dataset.planner.locate(int(batch["index"][0]))
    tensors = stored.read(shard.url, sample.key)
    stored.close()
    assert not torch.allclose(tensors["image_head"], tensors["latent"][:, :1])  # not the clip's own latent frame
    assert vae.temporal_compression == 4
    rows = train_in_process(cfg, tmp_path / "run", monkeypatch)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    weights, _ = load_model_weights(tmp_path / "run", None, ema=False)
    assert weights["cond_in.weight"].abs().sum() > 0  # zero-initialised: only a condition's gradient moves it


def test_sample_with_an_image_starts_or_ends_on_that_image(tmp_path, monkeypatch):
    """The smoke run (patch VAE, online fixture clips) trained 2 steps with every condition type; `src.sample --image`
    gives the image back as the first frame (i2v_head) or the last (i2v_tail) after decoding, to fp32 rounding of
    the lossless patch VAE, and writes the mp4s."""
    from PIL import Image

    from src.evaluation.sampling import condition_for, load_run, sample_prompts
    from src.sample import main, pick_shape

    run_dir = tmp_path / "run"
    cfg = compose_run("+experiment=smoke", "parallel=local", "steps=2", "ckpt_every=2", "model.cond_channels=49",
                      "diffusion.cond={t2v: 1, i2v_head: 1, i2v_tail: 1, i2v_loop: 1}")  # fmt: skip
    rows = train_in_process(cfg, run_dir, monkeypatch)
    assert [r["step"] for r in rows] == [1, 2]
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(tmp_path / "first.png")
    image = pixels.permute(2, 0, 1).float() / 127.5 - 1  # (3, 32, 32) in [-1, 1]

    run_cfg, model, vae, text, _ = load_run(run_dir)
    latent = pick_shape(run_cfg, vae)
    null_txt, null_vec = text([""])
    for cond_type, frame in (("i2v_head", 0), ("i2v_tail", -1)):
        cond = condition_for(run_cfg, vae, latent, [tmp_path / "first.png"], cond_type, "cpu")
        _, videos = sample_prompts(model, text, vae, ["a red square"], latent, null_txt, null_vec, tmp_path / cond_type,
                                   "cpu", steps=2, cond=cond)  # fmt: skip
        assert videos.shape == (1, 3, 8, 32, 32)
        assert (videos[0, :, frame] - image).abs().max() < 1e-5
        assert (videos[0, :, 3] - image).abs().max() > 0.1  # the other frames are sampled
    main([str(run_dir), "--prompt", "a red square", "--image", str(tmp_path / "first.png"), "--steps", "2",
          "--out", str(tmp_path / "cli")])  # fmt: skip
    assert len(list((tmp_path / "cli").glob("*.mp4"))) == 1
    with pytest.raises(ValueError, match="--cond-type i2v_loop needs an --image"):
        condition_for(run_cfg, vae, latent, [], "i2v_loop", "cpu")


def first_frame(path) -> torch.Tensor:
    """A written mp4's first frame, (H, W, 3) uint8 as int32."""
    import av

    with av.open(str(path)) as container:
        return torch.from_numpy(next(container.decode(video=0)).to_ndarray(format="rgb24")).int()


def test_eval_images_sample_i2v_at_each_evaluation_on_the_given_frames(tmp_path, monkeypatch):
    """`eval.images` in the smoke run (patch VAE) trained with every condition type: each evaluation writes the entries
    as NN_<type>_<prompt>.mp4 beside the text-to-video prompt, entry i from noise seed + i. The i2v_head video starts
    on the PNG and the i2v_tail one ends on the mp4's first frame: to fp32 rounding in the decoded video (the lossless
    patch VAE), to H.264's rounding in the written file."""
    from PIL import Image

    import src.evaluation.sampling as sampling
    from src.data.video import decode_clip, write_mp4

    decoded = {}  # "step_N/file name" -> the (3, T, H, W) video written there

    def spy(path, video, fps):
        decoded[f"{path.parent.name}/{path.name}"] = video.clone()
        return write_mp4(path, video, fps)

    monkeypatch.setattr(sampling, "write_mp4", spy)
    ramp = torch.linspace(0, 255, 32).round()  # smooth, so H.264 keeps it nearly exact
    pixels = torch.stack([ramp[None].expand(32, 32), ramp[:, None].expand(32, 32), torch.full((32, 32), 200.0)], -1)
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / "first.png")
    image = pixels.permute(2, 0, 1) / 127.5 - 1  # (3, 32, 32) in [-1, 1]
    clip = torch.zeros(3, 4, 32, 32)
    clip[0, 0], clip[2, 1:] = 0.5, -0.5  # the first frame reddish grey, the others bluish
    write_mp4(tmp_path / "clip.mp4", clip, fps=8)
    clip_first = decode_clip((tmp_path / "clip.mp4").read_bytes(), 1, 32, 32)[:, 0]  # (3, 32, 32)
    images = (f"[{{prompt: a red square, image: {tmp_path / 'first.png'}}}, "
              f"{{prompt: a blue circle, image: {tmp_path / 'clip.mp4'}, type: i2v_tail}}]")  # fmt: skip
    cfg = compose_run("+experiment=smoke", "parallel=local", "steps=2", "ckpt_every=2", "model.cond_channels=49",
                      "diffusion.cond={t2v: 1, i2v_head: 1, i2v_tail: 1, i2v_loop: 1}", "eval.every=1", "eval.steps=2",
                      "eval.prompts=[a red square]", f"eval.images={images}")  # fmt: skip
    train_in_process(cfg, tmp_path / "run", monkeypatch)
    names = ["00_a_red_square.mp4", "00_i2v_head_a_red_square.mp4", "01_i2v_tail_a_blue_circle.mp4"]
    assert sorted(decoded) == [f"step_0000000{s}/{n}" for s in (1, 2) for n in names]
    head, tail = decoded[f"step_00000002/{names[1]}"], decoded[f"step_00000002/{names[2]}"]
    assert head.shape == tail.shape == (3, 8, 32, 32)
    assert (head[:, 0] - image).abs().max() < 1e-5 and (head[:, 3] - image).abs().max() > 0.1  # the rest sampled
    assert (tail[:, -1] - clip_first).abs().max() < 1e-5 and (tail[:, -1] - tail[:, 0]).abs().max() > 0.1
    t2v = decoded[f"step_00000002/{names[0]}"]  # the same noise as entry 0 without the image
    assert (t2v[:, 0] - image).abs().mean() > 0.1
    written = first_frame(tmp_path / "run" / "eval" / "step_00000002" / names[1])
    assert (written - pixels.int()).abs().float().mean() < 5  # of 255: H.264 at crf 18 beside noisy frames


def test_eval_images_are_refused_at_setup_without_cond_in_or_without_the_file(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    entry = f"eval.images=[{{prompt: a red square, image: {tmp_path / 'red.png'}}}]"
    with pytest.raises(
        ValueError, match=r"red\.png'\) needs .* cond_in taking 1 \+ 48 channels; this model has no cond_in"
    ):
        train_in_process(compose_run("+experiment=smoke", "parallel=local", entry), tmp_path / "a", monkeypatch)
    missing = f"eval.images=[{{prompt: a red square, image: {tmp_path / 'gone.png'}}}]"
    cfg = compose_run("+experiment=smoke", "parallel=local", "model.cond_channels=49", missing)
    with pytest.raises(ValueError, match=r"eval.images\[0\]: image file '.*gone\.png' not found"):
        train_in_process(cfg, tmp_path / "b", monkeypatch)
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"prompt": "a", "image": "gone.png"}, r"eval.images\[0\]: image file 'gone.png' not found"),
        ({"prompt": "a"}, r"eval.images\[0\] needs 'image'"),
        ({"prompt": "a", "image": "x.png", "type": "t2v"}, r"eval.images\[0\].type is 't2v'; valid: \['i2v_head'"),
        ({"prompt": "a", "image": "x.png", "tail": "y.png"}, r"tail 'y.png' is only for type i2v_loop, not i2v_head"),
        ({"prompt": "a", "image": "x.png", "size": 3}, r"unknown keys \['size'\]"),
        ("x.png", r"eval.images\[0\] must be a mapping with keys \['prompt', 'image', 'type', 'tail'\], got 'x.png'"),
    ],
)
def test_each_bad_eval_image_entry_is_named(entry, error):
    from src.evaluation.images import eval_images

    with pytest.raises(ValueError, match=error):
        eval_images([entry], None, (48, 8, 8, 8), 49, "cpu")
    with pytest.raises(ValueError, match=r"cond_in taking 1 \+ 48 channels; this model has a cond_in taking 5 "):
        eval_images([{"prompt": "a", "image": "x.png"}], None, (48, 8, 8, 8), 5, "cpu")
