"""The EMA of the weights: the decay schedule, and the plain engine's average against one computed by hand."""

import functools

import pytest
import torch

from src.checkpoint import load_model_weights
from src.integrity import save_checkpoint
from src.models.mmdit import MMDiT
from src.parallel.local import LocalEngine
from src.parallel.state import ema_decay
from src.run.param_groups import warmup_schedule
from tests.conftest import tiny_model_kwargs
from tests.test_engine import batch


def test_decay_warms_up_then_holds():
    assert [ema_decay(s, 0.9) for s in (1, 2, 8, 80, 1000)] == [2 / 11, 3 / 12, 9 / 18, 0.9, 0.9]
    assert ema_decay(1, 0.9999, warmup=False) == 0.9999
    with pytest.raises(ValueError, match=r"ema decay must be in \[0, 1\), got 1.5"):
        ema_decay(1, 1.5)


@pytest.mark.numerics
def test_plain_engine_ema_matches_a_hand_computed_average_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = MMDiT(**tiny_model_kwargs())
    model.txt_in.requires_grad_(False)  # frozen: no EMA of its own, its weights are their own
    engine = LocalEngine(model, functools.partial(torch.optim.AdamW, lr=1e-2), warmup_schedule, torch.device("cpu"))
    engine.init_ema()
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(engine.ema) == set(expected) and "txt_in.weight" not in engine.ema
    for step in range(1, 4):
        x, txt, vec, t = batch(step)
        engine.backward((engine(x, txt, vec, t) - x).pow(2).mean())
        engine.step()
        d = ema_decay(step, 0.5)
        engine.update_ema(d)
        for n, p in model.named_parameters():
            if n in expected:
                expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n, value in expected.items():
        assert torch.allclose(engine.ema[n], value, atol=1e-7, rtol=1e-6), n
    save_checkpoint(engine, tmp_path, "step_00000003", {"step": 3})
    weights, _ = load_model_weights(tmp_path, ema=True)
    assert torch.equal(weights["img_in.weight"], engine.ema["img_in.weight"])
    assert torch.equal(weights["txt_in.weight"], model.txt_in.weight)  # frozen: the weights themselves
    other = MMDiT(**tiny_model_kwargs())
    other.txt_in.requires_grad_(False)
    fresh = LocalEngine(other, torch.optim.AdamW, warmup_schedule, torch.device("cpu"))
    fresh.init_ema()
    fresh.load(tmp_path)
    assert all(torch.equal(fresh.ema[n], engine.ema[n]) for n in engine.ema)


def test_a_checkpoint_without_ema_is_refused_where_ema_is_asked_for(tmp_path):
    engine = LocalEngine(MMDiT(**tiny_model_kwargs()), torch.optim.AdamW, warmup_schedule, torch.device("cpu"))
    save_checkpoint(engine, tmp_path, "step_00000001", {"step": 1})  # a run with ema: null
    with pytest.raises(ValueError, match="holds no EMA"):
        load_model_weights(tmp_path, ema=True)
    assert load_model_weights(tmp_path)[1] == "step_00000001"
