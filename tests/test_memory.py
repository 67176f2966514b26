"""ZeRO-3 shards model state: per-rank bytes of parameters, gradients, master weights and AdamW states halve."""

import json

import pytest

from src.parallel.memory import FIELDS, run, table
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
