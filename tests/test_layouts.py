"""The arithmetic of `python -m src.parallel.layouts` (the 11B at 8, 64 and 256 GPUs per engine and sp_size): model
state divided by the ranks that shard it, HSDP's by one node's, activations by sp_size, and the construction peak
of each way the model is built."""

import pytest

from src.parallel.activations import _model, rank_activations
from src.parallel.layouts import (
    CONSTRUCTIONS,
    GPUS,
    SP_SIZES,
    Build,
    Stage,
    build_sizes,
    construction_peak,
    model_state_bytes,
    parallel_config,
    tables,
)
from src.parallel.plan import GIB, engine_bytes


@pytest.fixture(scope="module")
def model_11b():
    return _model("mmdit_11b")  # on the meta device


def test_model_state_halves_with_twice_the_ranks():
    n = 11_890_000_000
    for engine in ("zero3", "fsdp2"):
        assert model_state_bytes(n, engine, 16) == model_state_bytes(n, engine, 8) / 2
        assert model_state_bytes(n, engine, 8) == n * 20 / 8  # bf16 param + grad, fp32 master + 2 moments + EMA
    assert model_state_bytes(n, "zero3", 64) == model_state_bytes(n, "fsdp2", 64)


def test_the_tables_model_state_is_what_the_plan_counts(model_11b):
    n = sum(p.numel() for p in model_11b.parameters())
    for engine in ("zero3", "fsdp2", "hsdp"):
        for gpus in GPUS:
            states, _, _ = engine_bytes(parallel_config(engine, gpus, 1), model_11b, gpus)
            assert states == pytest.approx(model_state_bytes(n, engine, gpus), rel=1e-12), (engine, gpus)


def test_hsdp_holds_the_state_of_one_node_whatever_the_nodes():
    n = 11_890_000_000
    for gpus in (8, 64, 256):
        assert model_state_bytes(n, "hsdp", gpus) == model_state_bytes(n, "fsdp2", 8)
    with pytest.raises(ValueError, match="engine 'ddp' is not one of"):
        model_state_bytes(n, "ddp", 8)


def test_sequence_parallelism_divides_the_activations(model_11b):
    # stage 1's worst bucket, 33 frames at 256x256: 9 x 16 x 16 video tokens of the Hunyuan latent, 512 text tokens
    for checkpointing in ((0, 0), (-1, -1)):
        one = rank_activations(model_11b, 2304, 512, 1, batch=2).gb(*checkpointing)
        for sp in SP_SIZES[1:]:
            split = rank_activations(model_11b, 2304, 512, sp, batch=2).gb(*checkpointing)
            assert split * sp == pytest.approx(one, rel=1e-3), (sp, checkpointing)


def test_construction_peaks(model_11b):
    build = build_sizes(model_11b)
    p = build.params
    assert 11.8e9 < p < 12e9 and build.largest_tensor <= build.largest_module < p / 100
    for gpus in GPUS:
        assert construction_peak(build, "zero3 host build", gpus) == (4 * p, 4 * p)  # a full fp32 copy per rank
        rank0, others = construction_peak(build, "fsdp2", gpus)
        assert rank0 == 4 * p + 4 * p / gpus and others == 4 * p / gpus + 4 * build.largest_tensor
    init = [construction_peak(build, "zero3 zero.Init", gpus)[0] for gpus in GPUS]
    assert init[0] > init[1] > init[2] and init[0] < 4 * p / 8  # bf16 partitions and one module: under a shard
    assert construction_peak(build, "hsdp", 256) == construction_peak(build, "fsdp2", 8)  # one node's shards


def test_the_tables_hold_every_layout():
    build = Build(params=1 << 30, largest_module=1 << 20, largest_tensor=1 << 20)
    stages = [Stage("stage1", 80.0, {sp: ("b", 8.0 / sp) for sp in SP_SIZES})]
    from src.models.mmdit import MMDiT
    from tests.conftest import tiny_model_kwargs

    text = tables(build, MMDiT(**tiny_model_kwargs()), stages).splitlines()
    state_rows = [line for line in text if " | " not in line and any(f" {c} " in line for c in CONSTRUCTIONS)]
    assert len(state_rows) == len(GPUS) * len(CONSTRUCTIONS)
    layout_rows = [line.split() for line in text if " | " in line and line.split()[0].isdigit()]
    assert len(layout_rows) == len(GPUS) * 3 * len(SP_SIZES)
    # 2^30 parameters at 20 bytes over 8 ranks: 2.5 GiB; the activations of sp 4 are 8 / 4
    assert f"{build.params * 20 / 8 / GIB:.1f}" in state_rows[0]
    assert layout_rows[2][:6] == ["8", "zero3", "4", "2", "|", "2.0"]
