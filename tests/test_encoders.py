"""The default encoders: the lossless patch VAE and the real all-MiniLM-L6-v2 text encoder."""

import pytest
import torch

from src.models.text import HFTextEncoder
from src.models.vae.patch import PatchVAE


@pytest.mark.numerics
def test_patch_vae_is_an_exact_inverse():
    vae = PatchVAE(spatial=4, temporal=2, scaling_factor=0.5, shift_factor=0.1)
    video = torch.rand(2, 3, 6, 16, 12) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 3 * 2 * 4 * 4, 3, 4, 3) == (2, *vae.latent_shape(6, 16, 12))
    assert torch.allclose(vae.decode(z), video, atol=1e-6)
    # scaling and shift are applied: latent = (pixels - shift) * scale
    assert torch.allclose(z[0, 0, 0, 0, 0], (video[0, 0, 0, 0, 0] - 0.1) * 0.5)


def test_patch_vae_frame_and_size_rules():
    vae = PatchVAE(spatial=4, temporal=2)
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.latent_shape(5, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        vae.latent_shape(4, 18, 16)
    with pytest.raises(ValueError, match=">= 1"):
        PatchVAE(spatial=0)


@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder(max_length=16)


def test_minilm_loads_real_weights_and_gives_meaningful_features(minilm):
    tokens, pooled = minilm(["a red square moves left", "a red box slides to the left", "stock market report"])
    assert tokens.shape == (3, 16, 384) and pooled.shape == (3, 384)
    assert torch.isfinite(tokens).all()
    cos = torch.nn.functional.cosine_similarity
    # real weights: a paraphrase is nearer than an unrelated sentence (random weights would not order them)
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0) + 0.2
    assert not any(p.requires_grad for p in minilm.parameters())
    assert minilm.describe()["mask_convention"] == "attend_padding"


@pytest.mark.numerics
def test_text_features_do_not_depend_on_the_batch(minilm):
    alone = minilm(["a blue circle moves up"])[1]
    batched = minilm(["a blue circle moves up", "something much longer than the first caption, to pad"])[1][:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_missing_text_encoder_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        HFTextEncoder(path=str(tmp_path / "nope"))
