"""The MMDiT: Open-Sora 2.0 names and shapes, RoPE, patches, zero output at init, attention backends."""

import json

import pytest
import torch

from src.config import model_config
from src.models.attention import attention, resolve_backend
from src.models.layers import apply_rope, rope_angles, video_position_ids
from src.models.mmdit import MMDiT
from src.parallel.transforms import apply_activation_checkpointing
from tests.conftest import ROOT, tiny_model_kwargs


def inputs(B=2, T=2, H=8, W=8, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, 48, T, H, W, generator=g),
        torch.randn(B, L, 384, generator=g),
        torch.randn(B, 384, generator=g),
        torch.rand(B, generator=g),
    )


def test_11b_state_dict_equals_the_released_manifest():
    cfg = model_config("mmdit_11b", vae="hunyuan")
    with torch.device("meta"):
        model = MMDiT(**cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # a copy of shared/reference/mmdit_v2_11b_state_dict.json (the released checkpoint's names and shapes)
    manifest = json.loads((ROOT / "tests/fixtures/mmdit_v2_11b_state_dict.json").read_text())
    shared = ROOT.parent / "shared/reference/mmdit_v2_11b_state_dict.json"
    if shared.is_file():
        assert json.loads(shared.read_text()) == manifest, "the fixture copy is stale: copy the shared manifest again"
    assert ours == manifest
    assert sum(v.numel() for v in model.state_dict().values()) == 11_891_390_528


def test_1b_flavor_size():
    cfg = model_config("mmdit_1b", vae="hunyuan")
    with torch.device("meta"):
        n = MMDiT(**cfg).num_params()
    assert 1.0e9 <= n <= 1.5e9


def test_fresh_model_predicts_zero(tiny_model):
    x, txt, vec, t = inputs()
    out = tiny_model(x, txt, vec, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    # ... but gradients reach the zero-initialised output layer, so it learns
    out.add(x).pow(2).mean().backward()
    assert tiny_model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.numerics
def test_cond_in_is_zero_initialised_and_optional():
    model = MMDiT(**tiny_model_kwargs(cond_channels=49))
    assert model.cond_in.weight.shape == (64, 49 * 4)
    assert torch.count_nonzero(model.cond_in.weight) == 0
    x, txt, vec, t = inputs()
    model.final_layer.linear.weight.data.normal_()
    cond = torch.randn(2, 49, 2, 8, 8)
    assert torch.allclose(model(x, txt, vec, t), model(x, txt, vec, t, cond))
    with pytest.raises(ValueError, match="cond_channels=None"):
        MMDiT(**tiny_model_kwargs())(x, txt, vec, t, cond)


def test_patchify_round_trip_and_bad_shapes(tiny_model):
    x = torch.randn(2, 48, 3, 8, 6)
    tokens = tiny_model.patchify(x)
    assert tokens.shape == (2, 3 * 4 * 3, 48 * 4)
    assert torch.equal(tiny_model.unpatchify(tokens, tiny_model.token_grid(x.shape)), x)
    # one token holds one 1x2x2 block of latent voxels, channel-major
    assert torch.equal(tokens[0, 0].view(48, 2, 2), x[0, :, 0, :2, :2])
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny_model.patchify(torch.randn(1, 48, 2, 7, 8))


@pytest.mark.numerics
def test_rope_is_a_rotation_with_relative_positions():
    axes = [8, 12, 12]
    q, k = torch.randn(1, 2, 2, 32), torch.randn(1, 2, 2, 32)
    ids = torch.tensor([[[0, 0, 0], [3, 1, 2]]])
    rq = apply_rope(q, rope_angles(ids, axes))
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps norms
    assert torch.allclose(rq[:, 0], q[:, 0])  # position 0 is the identity (text tokens)

    def score(pos_q, pos_k):
        aq = rope_angles(torch.tensor([[pos_q]]), axes)
        ak = rope_angles(torch.tensor([[pos_k]]), axes)
        return (apply_rope(q[:, :1], aq) * apply_rope(k[:, :1], ak)).sum()

    # the score depends only on the offset between positions, on every axis
    assert torch.allclose(score([1, 2, 3], [4, 4, 4]), score([5, 7, 2], [8, 9, 3]), atol=1e-4)
    assert not torch.allclose(score([1, 2, 3], [4, 4, 4]), score([1, 2, 3], [4, 4, 5]), atol=1e-4)


def test_video_position_ids_are_row_major_t_h_w():
    ids = video_position_ids(2, 2, 3, 4)
    assert ids.shape == (2, 24, 3)
    assert ids[0, 0].tolist() == [0, 0, 0] and ids[0, 5].tolist() == [0, 1, 1] and ids[0, 23].tolist() == [1, 2, 3]


@pytest.mark.numerics
def test_model_is_permutation_sensitive_through_rope(tiny_model):
    # swapping two frames changes the prediction for them: positions are really used
    torch.manual_seed(1)
    for p in tiny_model.parameters():
        p.data.normal_(0, 0.2)
    x, txt, vec, t = inputs(T=2)
    out = tiny_model(x, txt, vec, t)
    out_swapped = tiny_model(x.flip(2), txt, vec, t).flip(2)
    assert not torch.allclose(out, out_swapped, atol=1e-4)


@pytest.mark.numerics
def test_activation_checkpointing_keeps_outputs_gradients_and_names(tiny_model):
    for p in tiny_model.parameters():
        p.data.normal_(0, 0.1)
    ref = MMDiT(**tiny_model_kwargs())
    ref.load_state_dict(tiny_model.state_dict())
    apply_activation_checkpointing(tiny_model, double=-1, single=1)
    assert list(tiny_model.state_dict()) == list(ref.state_dict())
    x, txt, vec, t = inputs()
    for m in (tiny_model, ref):
        m(x, txt, vec, t).pow(2).mean().backward()
    for (name, a), b in zip(tiny_model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    with pytest.raises(ValueError, match="has 2"):
        apply_activation_checkpointing(ref, double=3)


def saved_and_recomputed(model: MMDiT) -> tuple[int, dict[str, int]]:
    """One forward and backward of `model`: the bytes autograd saved for backward, and per block how many of its
    submodules' forwards ran again during backward (activation checkpointing's recomputation)."""
    calls, saved = {}, []
    blocks = {f"double.{i}": b for i, b in enumerate(model.double_blocks)}
    blocks |= {f"single.{i}": b for i, b in enumerate(model.single_blocks)}
    hooks = [
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, block in blocks.items()
        for module in block.modules()
        if module is not block  # a block's own hooks do not run again: checkpoint calls its forward directly
    ]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*inputs()).pow(2).mean()
    forward_calls = dict(calls)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return sum(saved), {name: calls[name] - forward_calls[name] for name in blocks}


def test_activation_checkpointing_recomputes_the_chosen_blocks_and_saves_less(tiny_model):
    plain = MMDiT(**tiny_model_kwargs())
    plain.load_state_dict(tiny_model.state_dict())
    apply_activation_checkpointing(tiny_model, double=-1, single=1)
    plain_bytes, plain_recomputed = saved_and_recomputed(plain)
    checked_bytes, recomputed = saved_and_recomputed(tiny_model)
    assert set(plain_recomputed.values()) == {0}
    # every double block and the first single block run their forward again in backward, the last single one not
    assert all(recomputed[name] > 0 for name in ("double.0", "double.1", "single.0")), recomputed
    assert recomputed["single.1"] == 0, recomputed
    # what they would have saved for backward is not held: 3 of the 4 blocks keep only their inputs
    assert checked_bytes < 0.5 * plain_bytes, (checked_bytes, plain_bytes)


@pytest.mark.numerics
def test_attention_backends():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_backend("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA device of compute capability >= 9.0"):
        resolve_backend("cudnn", torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("xformers", torch.device("cpu"))
    q, k, v = (torch.randn(2, 6, 3, 8) for _ in range(3))
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / 8**0.5, dim=-1)
    expected = torch.einsum("bhlm,bmhd->blhd", weights, v)
    assert torch.allclose(attention(q, k, v, "sdpa"), expected, atol=1e-5)


def _fake_flash_attn(calls: list) -> object:
    """A stand-in `flash_attn` module whose kernel refuses fp32, as the real one does."""
    import types

    def flash_attn_func(q, k, v):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        calls.append(q.dtype)
        return torch.zeros_like(q)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


def test_auto_never_hands_fp32_to_flash_attn(monkeypatch):
    # flash-attn "installed" and the tensors treated as on CUDA: fp32 must go to SDPA, bf16 to the flash kernel
    import sys

    import src.models.attention as attn

    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    monkeypatch.setattr(attn, "flash_available", lambda device: True)
    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    assert resolve_backend("auto", q.device, torch.float32) == "sdpa"
    expected = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    assert torch.equal(attention(q, k, v, "auto"), expected.transpose(1, 2))
    assert calls == []
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "auto")
    assert calls == [torch.bfloat16]
    with pytest.raises(ValueError, match="'flash' takes fp16 or bf16 tensors, got torch.float32"):
        attention(q, k, v, "flash")


@pytest.fixture
def hopper(monkeypatch):
    """torch.cuda mocked as one compute-capability-9.0 GPU with cuDNN, no flash-attn; returns a cuDNN setter."""
    import src.models.attention as attn

    monkeypatch.setattr(attn, "HAS_FLASH_ATTN", False)
    monkeypatch.setattr(attn, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    return lambda version: monkeypatch.setattr(torch.backends.cudnn, "version", lambda: version)


def test_cudnn_attention_is_forced_only_where_its_cudnn_takes_the_length(hopper):
    cuda = torch.device("cuda", 0)
    hopper(91000)  # cuDNN 9.10, the image's: wrong for lengths not divisible by 128
    assert resolve_backend("auto", cuda, torch.bfloat16, 4096) == "cudnn"
    assert resolve_backend("auto", cuda, torch.bfloat16, 19520) == "sdpa"  # 384px x 129 frames: 19008 + 512 text
    assert resolve_backend("auto", cuda, torch.bfloat16, 8828) == "sdpa"  # 256px 16:9 x 129 frames: 8316 + 512
    with pytest.raises(ValueError, match="cuDNN 91000 computes wrong attention for 8828 tokens.*fixed in cuDNN 9.15"):
        resolve_backend("cudnn", cuda, torch.bfloat16, 8828)
    assert resolve_backend("cudnn", cuda, torch.bfloat16, 4096) == "cudnn"
    hopper(91500)  # 9.15: any length
    assert resolve_backend("auto", cuda, torch.bfloat16, 8828) == "cudnn"
    assert resolve_backend("cudnn", cuda, torch.bfloat16, 19520) == "cudnn"


def test_cudnn_attention_needs_hopper(hopper, monkeypatch):
    hopper(91500)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_backend("auto", torch.device("cuda", 0), torch.bfloat16, 4096) == "sdpa"


def test_bad_model_configs_are_refused():
    with pytest.raises(ValueError, match="divisible by heads"):
        MMDiT(**tiny_model_kwargs(heads=3))
    with pytest.raises(ValueError, match="axes_dim"):
        MMDiT(**tiny_model_kwargs(axes_dim=[8, 8, 8]))


def test_models_import_nothing_distributed():
    for path in (ROOT / "src/models").rglob("*.py"):
        text = path.read_text()
        assert "torch.distributed" not in text and "deepspeed" not in text, path


def test_bf16_weights_take_fp32_inputs_and_keep_timestep_precision(tiny_model):
    for p in tiny_model.parameters():
        p.data.normal_(0, 0.1)
    x, txt, vec, _ = inputs(B=2)
    model = tiny_model.to(torch.bfloat16)
    # t = 0.5 and t = 0.501 are one bf16 step apart; the embedding is computed from fp32 t, so they differ
    out = model(x, txt, vec, torch.tensor([0.5, 0.501]))
    assert out.dtype == torch.bfloat16
    same = model(
        x[:1].expand(2, -1, -1, -1, -1), txt[:1].expand(2, -1, -1), vec[:1].expand(2, -1), torch.tensor([0.5, 0.501])
    )
    assert not torch.equal(same[0], same[1])
