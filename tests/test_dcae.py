"""Video DC-AE (Open-Sora 2.0 dc-ae-f32t4c128): checkpoint layout, shapes, frame rules, strict loading, tiling."""

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from src.models.provenance import config_provenance
from src.models.vae.dcae import VideoDCAE, tiled_apply
from src.models.vae.dcae_blocks import LiteMLA, space_to_channels
from src.models.weights import weights_sha256
from tests.conftest import ROOT
from tests.numerics import accumulation_length, rounding_atol

# smaller than conf/vae/dcae_tiny.yaml, same structure: for the loading and tiling tests
SMALL = dict(
    widths=[8, 8, 16, 16, 32, 32],
    encoder_depths=[1, 1, 1, 1, 1, 1],
    decoder_depths=[1, 1, 1, 1, 1, 1],
    latent_channels=32,
    head_dim=8,
    random_init=True,
)


def config(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(ROOT / f"conf/vae/{name}.yaml"), overrides)


def kwargs(name: str) -> dict:
    args = OmegaConf.to_container(config(name))
    args.pop("_target_")
    return args


@pytest.fixture(scope="module")
def tiny() -> VideoDCAE:
    torch.manual_seed(0)
    return instantiate(config("dcae_tiny"))


def test_full_state_dict_equals_the_released_manifest():
    with torch.device("meta"):
        model = VideoDCAE(**{**kwargs("dcae"), "random_init": True})
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # a copy of shared/reference/dcae_f32t4c128_state_dict.json (F32T4C128_AE.safetensors' names and shapes)
    manifest = json.loads((ROOT / "tests/fixtures/dcae_f32t4c128_state_dict.json").read_text())
    shared = ROOT.parent / "shared/reference/dcae_f32t4c128_state_dict.json"
    if shared.is_file():
        assert json.loads(shared.read_text()) == manifest, "the fixture copy is stale: copy the shared manifest again"
    assert ours == manifest
    assert len(ours) == 339
    assert sum(v.numel() for v in model.state_dict().values()) == 459_462_147
    assert (model.spatial_compression, model.temporal_compression, model.latent_channels) == (32, 4, 128)


@pytest.mark.numerics
def test_tiny_shapes_and_round_trip_shapes(tiny):
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    video = torch.rand(2, 3, 8, 64, 96) * 2 - 1
    z = tiny.encode(video)
    assert z.shape == (2, 128, 2, 2, 3) == (2, *tiny.latent_shape(8, 64, 96))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert tiny.decode(z).shape == video.shape
    # samples are independent of their batch: alone, a clip's reductions only run in another order (kernels block a
    # batch of 1 and of 2 differently), so its latent moves by at most k * eps * max|z| * sqrt(n) (tests/numerics.py),
    # n the summed accumulation length of the encoder's convolutions, attention and norms: 18.8k, atol 1.0e-3 at
    # max|z| 20.7, where mixing samples would move it by O(max|z|). Measured: 1.1e-5 (ATEN_CPU_CAPABILITY=default),
    # 1.3e-5 (avx2, avx512).
    alone = tiny.encode(video[1:])
    n = accumulation_length(lambda: tiny.encode(video[1:]))
    assert (alone - z[1:]).abs().max() <= rounding_atol(z, n)
    # an image (1 frame) is a 1-frame latent, decoded back to 1 frame
    image = video[:, :, :1]
    z1 = tiny.encode(image)
    assert z1.shape == (2, 128, 1, 2, 3) == (2, *tiny.latent_shape(1, 64, 96))
    assert tiny.decode(z1).shape == image.shape


def test_frame_and_size_rules(tiny):
    for frames in (6, 4, 2, 0):
        with pytest.raises(ValueError, match=f"^{frames} frames .*multiple of 4 from 8"):
            tiny.latent_shape(frames, 64, 64)
    with pytest.raises(ValueError, match="48x64.*multiples of 32"):
        tiny.latent_shape(8, 48, 64)
    with pytest.raises(ValueError, match="10 frames"):
        tiny.encode(torch.zeros(1, 3, 10, 64, 64))
    with pytest.raises(ValueError, match="expected"):
        tiny.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="encoder_depths"):
        VideoDCAE(**{**SMALL, "encoder_depths": [1, 1]})
    with pytest.raises(ValueError, match="block_types"):
        VideoDCAE(**SMALL, block_types=["ResBlock"] * 5 + ["Transformer"])
    with pytest.raises(ValueError, match="tile_size=100"):
        VideoDCAE(**SMALL, tile_size=100)
    with pytest.raises(ValueError, match="tile_frames=4"):
        VideoDCAE(**SMALL, tile_frames=4)


def test_strict_loading_through_the_config(tmp_path, monkeypatch, tiny):
    monkeypatch.setattr("src.models.weights._HASH_CACHE", tmp_path / "hashes.json")
    file = tmp_path / "F32T4C128_AE.safetensors"
    state = tiny.state_dict()
    save_file(state, str(file))
    loaded = instantiate(config("dcae_tiny", path=str(file)))
    video = torch.rand(1, 3, 8, 64, 64) * 2 - 1
    z = tiny.encode(video)
    assert torch.equal(loaded.encode(video), z)
    assert torch.equal(loaded.decode(z), tiny.decode(z))
    assert loaded.describe()["weights_sha256"] == weights_sha256(file)
    assert config_provenance(config("dcae_tiny", path=str(file))) == loaded.describe()

    broken = dict(state)
    removed = "decoder.project_out.op_list.0.bias"
    reshaped = "encoder.project_in.conv.weight"
    del broken[removed]
    broken["encoder.extra.weight"] = torch.zeros(3)
    broken[reshaped] = torch.zeros(9, 3, 3, 3, 3)  # 8 output channels in the model
    bad = tmp_path / "bad.safetensors"
    save_file(broken, str(bad))
    with pytest.raises(ValueError, match="does not load strictly") as err:
        VideoDCAE(**{**kwargs("dcae_tiny"), "path": str(bad)})
    for key in (removed, "encoder.extra.weight", reshaped):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        VideoDCAE(path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="vae.path is null: point it to Open-Sora's F32T4C128_AE.safetensors"):
        VideoDCAE(**{**SMALL, "random_init": False})


def test_provenance_without_building_equals_describe(tiny):
    assert config_provenance(config("dcae_tiny")) == tiny.describe()
    full = config_provenance(config("dcae"))
    assert full == {
        "name": "dcae",
        "weights_sha256": None,
        "dtype": "float32",
        "spatial_compression": 32,
        "temporal_compression": 4,
        "latent_channels": 128,
        "scaling_factor": pytest.approx(1 / 0.493),
        "shift_factor": 0.0,
        "tiling": {"tile_size": 256, "tile_frames": 32, "tile_overlap": 0.25},
        "posterior": "deterministic",
    }
    assert VideoDCAE.provenance(**SMALL, tiling=False)["tiling"] is None


@pytest.mark.numerics
def test_blending_is_a_partition_of_unity():
    """With a local `fn` (no context across tiles) tiled == untiled, whatever the tile layout: ramps sum to 1."""
    video = torch.rand(1, 3, 40, 224, 160)
    grid, tile, stride, scale = (10, 7, 5), (4, 3, 2), (3, 2, 1), (4, 32, 32)
    pool = lambda x: F.avg_pool3d(x, scale)  # noqa: E731
    assert torch.allclose(tiled_apply(pool, video, grid, tile, stride, scale, (1, 1, 1)), pool(video), atol=1e-6)
    constant = torch.full((1, 3, 40, 224, 160), 0.3)
    flat = tiled_apply(pool, constant, grid, tile, stride, scale, (1, 1, 1))
    assert torch.allclose(flat, torch.full_like(flat, 0.3))  # no seams: a constant stays constant

    z = torch.randn(2, 5, *grid)
    unpool = lambda z: z.repeat_interleave(4, 2).repeat_interleave(32, 3).repeat_interleave(32, 4) * 2 - 1  # noqa: E731
    assert torch.allclose(tiled_apply(unpool, z, grid, tile, stride, (1, 1, 1), scale), unpool(z), atol=1e-5)


def test_tiling_exact_on_one_tile_and_shaped_on_many():
    torch.manual_seed(0)
    whole = VideoDCAE(**SMALL, tiling=False)
    tiled = VideoDCAE(**SMALL, tile_size=64, tile_frames=8, tile_overlap=0.5)
    tiled.load_state_dict(whole.state_dict())
    one = torch.rand(1, 3, 8, 64, 64) * 2 - 1  # exactly one tile
    z = whole.encode(one)
    assert torch.equal(tiled.encode(one), z)
    assert torch.equal(tiled.decode(z), whole.decode(z))

    many = torch.rand(1, 3, 12, 96, 128) * 2 - 1  # latent 3 x 3 x 4 in tiles of 2 x 2 x 2: 2 x 2 x 3 tiles
    z = tiled.encode(many)
    assert z.shape == (1, 32, 3, 3, 4) and torch.isfinite(z).all()
    video = tiled.decode(z)
    assert video.shape == many.shape and torch.isfinite(video).all()


@pytest.mark.numerics
def test_linear_attention_equals_its_quadratic_form():
    torch.manual_seed(0)
    mla = LiteMLA(16, head_dim=4, scales=(3,))
    qkv = torch.randn(2, 2 * 3 * 16, 2, 3, 3)  # (B, heads*3*d, T, H, W) with 8 heads of d = 4
    q, k, v = qkv.flatten(2).unflatten(1, (8, 3, 4)).unbind(2)  # each (B, heads, d, N)
    scores = torch.einsum("bhdm,bhdn->bhmn", F.relu(k), F.relu(q))  # (B, heads, N_k, N_q)
    expected = torch.einsum("bhdm,bhmn->bhdn", v, scores) / (scores.sum(dim=2, keepdim=True) + mla.eps)
    assert torch.allclose(mla.attend(qkv), expected.flatten(1, 2).unflatten(-1, (2, 3, 3)), atol=1e-5)


def test_space_to_channels_orders_channels_like_pixel_unshuffle():
    x = torch.randn(2, 3, 4, 6, 8)
    frames = F.pixel_unshuffle(x.transpose(1, 2), 2).transpose(1, 2)  # (B, C*4, T, H/2, W/2)
    assert torch.equal(space_to_channels(x, temporal=False), frames)
    folded = space_to_channels(x, temporal=True)  # (B, C*8, T/2, H/2, W/2), order (c, rt, rh, rw)
    assert folded.shape == (2, 24, 2, 3, 4)
    for rt in range(2):
        for j in range(4):  # j = 2 rh + rw
            assert torch.equal(folded[:, 4 * rt + j :: 8], frames[:, j::4, rt::2])
