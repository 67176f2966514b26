"""Flow-matching maths and the Euler sampler: pure functions, checked against hand-computed numbers."""

import math

import pytest
import torch

from src.diffusion.flow import (
    FlowMatching,
    add_noise,
    drop_text,
    resolution_shift,
    sample_logit_normal,
    shift_time,
    training_inputs,
    velocity_target,
)
from src.diffusion.sampler import euler_sample, guided_velocity, time_grid


def test_resolution_shift_matches_the_recipe_endpoints():
    # 256 tokens per frame (32x32 latent) -> 1, 4096 tokens per frame (128x128 latent) -> 3, times sqrt(T).
    assert resolution_shift(1, 32, 32) == pytest.approx(1.0)
    assert resolution_shift(1, 128, 128) == pytest.approx(3.0)
    assert resolution_shift(9, 32, 32) == pytest.approx(3.0)
    # midway, 2176 tokens per frame (latent 64 x 136) -> 2, times sqrt(4 latent frames) -> 4.
    assert resolution_shift(4, 64, 136) == pytest.approx(4.0)


def test_shift_time_warps_towards_noise_and_keeps_endpoints():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert shifted[2].item() == pytest.approx(1.5 / 2.0)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert torch.all(shifted[1:-1] > t[1:-1])
    with pytest.raises(ValueError, match="alpha"):
        shift_time(t, 0.0)


def test_logit_normal_is_sigmoid_of_a_normal():
    t = sample_logit_normal(200_000, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    u = torch.logit(t.double())
    assert u.mean().item() == pytest.approx(0.0, abs=0.01)
    assert u.std().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.numerics
def test_noising_endpoints_and_velocity():
    x0, x1 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(add_noise(x0, x1, torch.zeros(2)), x0)
    assert torch.allclose(add_noise(x0, x1, torch.ones(2)), x1)
    t = torch.tensor([0.3, 0.7])
    xt = add_noise(x0, x1, t)
    assert torch.allclose(xt[1], 0.3 * x0[1] + 0.7 * x1[1])
    # the target is the time derivative of x_t, with and without sigma_min
    for sigma in (0.0, 1e-5):
        dt = 1e-3
        numeric = (add_noise(x0, x1, t + dt, sigma) - add_noise(x0, x1, t, sigma)) / dt
        assert torch.allclose(numeric, velocity_target(x0, x1, sigma), atol=1e-3)


def test_drop_text_replaces_exactly_the_dropped_samples():
    txt, vec = torch.randn(3, 5, 8), torch.randn(3, 4)
    null_txt, null_vec = torch.zeros(5, 8), torch.full((4,), 7.0)
    out_txt, out_vec = drop_text(txt, vec, null_txt, null_vec, torch.tensor([False, True, False]))
    assert torch.equal(out_txt[0], txt[0]) and torch.equal(out_txt[2], txt[2])
    assert torch.equal(out_txt[1], null_txt) and torch.equal(out_vec[1], null_vec)


def test_training_inputs_depend_only_on_seed_and_sample_index():
    x0 = torch.randn(4, 2, 3, 4, 4)
    idx = torch.tensor([10, 11, 12, 13])
    xt, t, target, drop = training_inputs(x0, idx, seed=5, drop_prob=0.5)
    # the same samples split over two "ranks" draw the same numbers
    xt_a, t_a, _, drop_a = training_inputs(x0[::2], idx[::2], seed=5, drop_prob=0.5)
    assert torch.equal(xt_a, xt[::2]) and torch.equal(t_a, t[::2]) and torch.equal(drop_a, drop[::2])
    # another seed draws other numbers
    assert not torch.equal(training_inputs(x0, idx, seed=6)[1], t)
    assert xt.shape == target.shape == x0.shape and t.shape == (4,)


def test_text_dropout_rate():
    x0 = torch.zeros(2000, 1, 1, 1, 1)
    _, _, _, drop = FlowMatching(text_dropout=0.316).training_inputs(x0, torch.arange(2000), seed=0)
    assert drop.float().mean().item() == pytest.approx(0.316, abs=0.03)
    with pytest.raises(ValueError, match="text_dropout"):
        FlowMatching(text_dropout=1.5)


@pytest.mark.numerics
def test_time_grid_and_guidance():
    grid = time_grid(4, alpha=1.0)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.all(time_grid(10, alpha=3.0)[1:-1] > time_grid(10)[1:-1])
    v_c, v_u = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_velocity(v_c, v_u, 1.0) == v_c
    assert guided_velocity(v_c, v_u, 4.0).item() == 5.0
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.numerics
def test_euler_sampler_recovers_data_under_the_exact_velocity():
    # With v = x1 - x0 known exactly, Euler integration from x1 at t=1 lands on x0 at t=0.
    x0 = torch.randn(2, 3, 1, 2, 2)
    noise = torch.randn_like(x0)

    def exact(x, txt, vec, t):
        return torch.cat([noise, noise]) - torch.cat([x0, x0])

    txt, vec = torch.zeros(2, 1, 1), torch.zeros(2, 1)
    out = euler_sample(exact, noise, txt, vec, torch.zeros(1, 1), torch.zeros(1), steps=7, guidance=3.0)
    assert torch.allclose(out, x0, atol=1e-5)
    assert math.isfinite(out.sum().item())
