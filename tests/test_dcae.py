"""Video DC-AE (Open-Sora 2.0 dc-ae-f32t4c128): checkpoint layout, shapes, frame rules, strict loading, tiling."""

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from src.models.provenance import config_provenance
from src.models.vae.dcae import VideoDCAE
from src.models.vae.dcae_blocks import LiteMLA, space_to_channels
from src.models.vae.tiling import axis_tiles, tiled
from src.models.weights import weights_sha256
from tests.conftest import ROOT
from tests.numerics import EPS32, accumulation_length, rounding_atol

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
        "tiling": {"tile_size": 256, "tile_frames": 32, "tile_overlap": 0.25, "layout": "open-sora-2.0"},
        "posterior": "deterministic",
        "architecture": {  # the released model's: random weights of another one must not pass for it
            "widths": [128, 256, 512, 512, 1024, 1024],
            "encoder_depths": [2, 2, 2, 3, 3, 3],
            "decoder_depths": [3, 3, 3, 3, 3, 3],
            "block_types": ["ResBlock"] * 3 + ["EViTS5_GLU"] * 3,
            "temporal_stages": [3, 4],
            "head_dim": 32,
        },
    }
    assert VideoDCAE.provenance(**SMALL, tiling=False)["tiling"] is None


# a Video DC-AE small enough to tile in every direction in milliseconds: 4x spatial, 2x temporal compression
MINI = dict(
    widths=[4, 8, 8],
    encoder_depths=[1, 1, 1],
    decoder_depths=[1, 1, 1],
    block_types=["ResBlock", "ResBlock", "EViTS5_GLU"],
    temporal_stages=[1],
    latent_channels=8,
    head_dim=4,
    random_init=True,
)


def ramp_from(prev: torch.Tensor, cur: torch.Tensor, dim: int, extent: int) -> None:
    """Open-Sora's blend, index by index with Python-float weights: cur[y] = prev[-e + y] (1 - y/e) + cur[y] y/e."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    for y in range(e):
        mixed = prev.select(dim, prev.shape[dim] - e + y) * (1 - y / e) + cur.select(dim, y) * (y / e)
        cur.select(dim, y).copy_(mixed)


def open_sora_tiled(fn, x: torch.Tensor, tile: tuple[int, int], out: tuple[int, int], overlap: float) -> torch.Tensor:
    """Reference: Open-Sora 2.0's DCAE tiled encode/decode written out from its rules, independently of Kiln's code.

    tile = (frames, pixels) of an input tile, out = what a whole tile becomes, in the output's units. Time tiles
    start every int(tile * (1 - overlap)); each is tiled in space (rows, then columns) if its H or W exceeds the tile;
    every tile blends in its predecessor (above, then left; in time the previous one) after that one's own blending,
    over int(out * overlap), and keeps its first out - int(out * overlap) entries.
    """

    def numbers(n_in: int, n_out: int) -> tuple[int, int, int]:
        return int(n_in * (1 - overlap)), int(n_out * overlap), n_out - int(n_out * overlap)

    def space(piece: torch.Tensor) -> torch.Tensor:
        n = tile[1]
        if max(piece.shape[3:]) <= n:
            return fn(piece)
        stride, e, keep = numbers(n, out[1])
        rows = [
            [fn(piece[:, :, :, i : i + n, j : j + n]) for j in range(0, piece.shape[4], stride)]
            for i in range(0, piece.shape[3], stride)
        ]
        for i, row in enumerate(rows):
            for j, t in enumerate(row):
                if i:
                    ramp_from(rows[i - 1][j], t, 3, e)
                if j:
                    ramp_from(row[j - 1], t, 4, e)
        return torch.cat([torch.cat([t[:, :, :, :keep, :keep] for t in row], 4) for row in rows], 3)

    if x.shape[2] <= tile[0]:
        return space(x)
    stride, e, keep = numbers(*(tile[0], out[0]))
    row = [space(x[:, :, i : i + tile[0]]) for i in range(0, x.shape[2], stride)]
    for i in range(1, len(row)):
        ramp_from(row[i - 1], row[i], 2, e)
    return torch.cat([t[:, :, :keep] for t in row], 2)


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("tile_size", "tile_frames", "overlap", "clip"),
    [
        (16, 8, 0.5, (12, 20, 24)),  # latent 6 x 5 x 6 in 3 x 3 x 3 tiles, short tiles at every edge
        (16, 8, 0.5, (12, 20, 16)),  # W fits one tile, H does not: W is cut too (tiles of 16 and 8 px)
        (32, 16, 0.25, (36, 56, 40)),  # Open-Sora's overlap: blends over 2 latents and 4 frames or 8 pixels
    ],
)
def test_tiled_encode_and_decode_equal_open_sora_reference(tile_size, tile_frames, overlap, clip):
    """Kiln's tiled latents and decodes are Open-Sora's on a multi-tile clip. Both run the same encoder on the same
    tiles; what may differ is the blend's rounding: a value passes through at most 3 blends (time, rows, columns),
    each rounding two products and a sum of terms <= max|x| by eps/2: <= 4.5 eps max|x| in all."""
    torch.manual_seed(0)
    vae = VideoDCAE(**MINI, tile_size=tile_size, tile_frames=tile_frames, tile_overlap=overlap)
    s, t = vae.spatial_compression, vae.temporal_compression
    video = torch.rand(1, 3, *clip) * 2 - 1
    z = vae.encode(video)
    pixels, latents = (tile_frames, tile_size), (tile_frames // t, tile_size // s)
    expected = open_sora_tiled(vae.encoder, video, pixels, latents, overlap)
    assert z.shape == expected.shape == (1, 8, clip[0] // t, clip[1] // s, clip[2] // s)
    atol = 4.5 * EPS32 * expected.abs().max().item()
    torch.testing.assert_close(z, expected * vae.scaling_factor, rtol=0, atol=atol * vae.scaling_factor)

    decoded = vae.decode(z)
    raw = z / vae.scaling_factor
    expected = open_sora_tiled(vae.decoder, raw, latents, pixels, overlap)
    assert decoded.shape == expected.shape == video.shape
    torch.testing.assert_close(decoded, expected, rtol=0, atol=4.5 * EPS32 * expected.abs().max().item())


def test_tiles_that_do_not_overlap_are_each_an_untiled_pass():
    """Overlap 0: nothing is blended, and every tile of the output is exactly the untiled pass of its input tile."""
    torch.manual_seed(0)
    vae = VideoDCAE(**MINI, tile_size=16, tile_frames=8, tile_overlap=0.0)
    video = torch.rand(1, 3, 12, 20, 24) * 2 - 1
    z = vae.encode(video)  # latent 6 x 5 x 6 in tiles of 4 x 4 x 4
    raw = z / vae.scaling_factor
    decoded = vae.decode(z)
    for t0 in (0, 4):
        for h0 in (0, 4):
            for w0 in (0, 4):
                part = video[:, :, 2 * t0 : 2 * t0 + 8, 4 * h0 : 4 * h0 + 16, 4 * w0 : 4 * w0 + 16]
                latent = raw[:, :, t0 : t0 + 4, h0 : h0 + 4, w0 : w0 + 4]
                assert torch.equal(latent * vae.scaling_factor, vae.encoder(part) * vae.scaling_factor)
                pixels = decoded[:, :, 2 * t0 : 2 * t0 + 8, 4 * h0 : 4 * h0 + 16, 4 * w0 : 4 * w0 + 16]
                assert torch.equal(pixels, vae.decoder(latent))


@pytest.mark.numerics
def test_blending_is_a_partition_of_unity():
    """With a local `fn` (no context across tiles) tiled == untiled whatever the layout: the two weights of a blend,
    each rounded once to fp32, sum to 1 within eps, and a value goes through at most 3 blends."""
    video = torch.rand(1, 3, 40, 224, 160)
    time, space = axis_tiles(16, 4, 0.5), axis_tiles(128, 4, 0.5)  # short tiles at the ends of H and W
    pool = lambda x: F.avg_pool3d(x, (4, 32, 32))  # noqa: E731
    atol = 3 * 2 * EPS32
    torch.testing.assert_close(tiled(pool, video, time, space), pool(video), rtol=0, atol=atol)
    flat = tiled(pool, torch.full_like(video, 0.3), time, space)
    assert (flat - pool(torch.full_like(video, 0.3))).abs().max() <= atol  # no seams: a constant stays constant

    z = torch.randn(2, 5, 10, 7, 5)
    unpool = lambda z: z.repeat_interleave(4, 2).repeat_interleave(32, 3).repeat_interleave(32, 4) * 2 - 1  # noqa: E731
    time, space = axis_tiles(4, 16, 0.5), axis_tiles(4, 128, 0.5)
    scale = 2 * z.abs().max().item() + 1
    torch.testing.assert_close(tiled(unpool, z, time, space), unpool(z), rtol=0, atol=3 * 2 * EPS32 * scale)


def test_tiling_rules_are_checked():
    torch.manual_seed(0)
    whole = VideoDCAE(**SMALL, tiling=False)
    tiled_vae = VideoDCAE(**SMALL, tile_size=64, tile_frames=8, tile_overlap=0.5)
    tiled_vae.load_state_dict(whole.state_dict())
    one = torch.rand(1, 3, 8, 64, 64) * 2 - 1  # exactly one tile: no tiling at all
    z = whole.encode(one)
    assert torch.equal(tiled_vae.encode(one), z)
    assert torch.equal(tiled_vae.decode(z), whole.decode(z))
    # decode tiles of 2 latent frames every 1: the last tile holds 1 latent frame, which would decode to 1 frame
    with pytest.raises(ValueError, match="latent of 3 frames cannot be decoded with temporal tiling"):
        tiled_vae.decode(torch.zeros(1, 32, 3, 2, 2))
    # 256 px * 0.7 = 179.2 px: tiles every 179 px keeping 5 of 8 latents (160 px) would leave seams
    with pytest.raises(ValueError, match="tile_overlap=0.3 does not tile"):
        VideoDCAE(**SMALL, tile_overlap=0.3)
    with pytest.raises(ValueError, match="tile_overlap=1"):
        VideoDCAE(**SMALL, tile_overlap=1)


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
