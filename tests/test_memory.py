"""ZeRO-3 shards model state: per-rank bytes of parameters, gradients, master weights and AdamW states halve."""

import json

import pytest

from src.bench.memory import FIELDS, run, table
from tests.conftest import tiny_model_kwargs

pytestmark = pytest.mark.dist


def test_two_ranks_hold_half_the_model_state_of_one():
    model = tiny_model_kwargs()
    model.pop("attn_backend")
    one, two = run([1, 2], json.loads(json.dumps(model)), "bf16")
    n = one["parameters"]
    full = one["per_rank"][0]
    # bf16 parameters and gradients, fp32 master weights, two fp32 AdamW moments: 16 bytes per parameter
    assert (full["params"], full["grads"], full["master"]) == (2 * n, 2 * n, 4 * n)
    assert full["optimizer"] == pytest.approx(8 * n, abs=64)  # + AdamW's step counters
    for rank in two["per_rank"]:
        for field in FIELDS:
            assert rank[field] == pytest.approx(full[field] / 2, rel=0.01), field
    assert "| 2 |" in table([one, two])


def test_activation_count_is_per_token_and_splits_with_sequence_parallelism():
    import torch

    from src.models.mmdit import MMDiT
    from src.parallel.activations import rank_activation_gb, saved_bytes

    model = MMDiT(**tiny_model_kwargs()).to(torch.bfloat16)
    counts = [saved_bytes(model, (2, 4, 4 * n), 6 * n)["blocks"] for n in (1, 2, 3)]  # 8n video + 6n text tokens
    assert len(counts[0]) == 4 and min(counts[0]) > 0
    # affine in the tokens: attention saves O(L) (as flash does); weights are model state and not counted, so the
    # only constant is what a block saves per sample (its adaLN shift, scale and gate)
    for one, two, three in zip(*counts, strict=True):
        assert three - two == two - one and 0 <= 2 * one - two < 0.05 * one
    full = rank_activation_gb(model, 4096, 512, sp=1, checkpointing=False)
    assert rank_activation_gb(model, 4096, 512, sp=4, checkpointing=False) == pytest.approx(full / 4, rel=1e-3)
    recomputed = rank_activation_gb(model, 4096, 512, sp=1, checkpointing=True)
    assert 0 < recomputed < full
    assert rank_activation_gb(model, 4096, 512, sp=2, checkpointing=True) == pytest.approx(recomputed / 2, rel=1e-3)


def test_the_smallest_selective_checkpointing_that_fits():
    import torch

    from src.models.mmdit import MMDiT
    from src.parallel.activations import rank_activations, smallest_checkpointing

    model = MMDiT(**tiny_model_kwargs(depth_double=3, depth_single=4)).to(torch.bfloat16)
    counts = rank_activations(model, 4096, 512, sp=1)
    plain, full = counts.gb(0, 0), counts.gb(-1, -1)
    assert counts.gb(2, 1) < counts.gb(1, 1) < plain  # each checkpointed block keeps only its input
    assert smallest_checkpointing(counts, plain) == (0, 0)
    assert smallest_checkpointing(counts, 0.99 * full) is None  # nothing fits: said, not guessed
    budget = (plain + full) / 2
    double, single = smallest_checkpointing(counts, budget)
    assert counts.gb(double, single) <= budget
    # no choice of fewer checkpointed blocks fits
    fewer = [(d, s) for d in range(4) for s in range(5) if d + s < double + single]
    assert fewer and all(counts.gb(d, s) > budget for d, s in fewer)
