"""Every shipped GPU experiment fits the GPUs it states, by Kiln's own planner (src/parallel/plan.py), and the
planner's parts: bytes of model state per parameter, the activation count at a bucket's batch."""

import pytest
import torch

from src.models.mmdit import MMDiT
from src.parallel.activations import rank_activations, saved_bytes
from src.parallel.plan import GIB, memory_plan, meta_model, state_bytes_per_param
from tests.conftest import ROOT, tiny_model_kwargs
from tests.test_config import compose_experiment

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))
CPU_SIZE = 1e8  # parameters: a larger model is a GPU experiment and must state sized_for


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_gpu_experiment_fits_the_gpus_it_states(name):
    cfg = compose_experiment(name)
    if not cfg.sized_for.gpus:
        with torch.device("meta"):
            n_params = sum(
                p.numel() for p in MMDiT(**{k: v for k, v in cfg.model.items() if k != "_target_"}).parameters()
            )
        assert n_params < CPU_SIZE, f"{name}: {n_params / 1e9:.1f}B parameters but no sized_for (gpus, gpu_memory_gib)"
        return
    plan = memory_plan(cfg)
    assert plan.fits(), f"{name} does not fit {plan.gpus} GPUs of {plan.gpu_memory_gib} GiB:\n{plan.table()}"


def test_the_11b_stage_without_activation_checkpointing_does_not_fit():
    # what the shipped stage1 did before: the plan must catch it
    cfg = compose_experiment("stage1", ("parallel.checkpoint_double=0", "parallel.checkpoint_single=0"))
    plan = memory_plan(cfg)
    assert not plan.fits() and plan.worst.activations_gib > cfg.sized_for.gpu_memory_gib
    assert memory_plan(cfg, gpus=8, gpu_memory_gib=1000.0).fits()  # given the memory, the same plan fits


def test_model_state_bytes_per_parameter():
    assert state_bytes_per_param("bf16", zero_stage=3, ranks=8) == 16 / 8  # bf16 param + grad, fp32 master + AdamW
    assert state_bytes_per_param("fp32", zero_stage=0, ranks=8) == 16  # the local engine shards nothing
    assert state_bytes_per_param("bf16", zero_stage=1, ranks=4) == 2 + 2 + 12 / 4
    assert state_bytes_per_param("bf16", zero_stage=2, ranks=4) == 2 + (2 + 12) / 4
    with pytest.raises(ValueError, match="parallel.precision='fp16' is not one of"):
        state_bytes_per_param("fp16", 3, 8)


def test_activation_count_of_one_block_of_each_kind_equals_the_whole_models():
    model = MMDiT(**tiny_model_kwargs(depth_double=3, depth_single=2)).to(torch.bfloat16)
    counts = rank_activations(model, 64, 6, sp=1, batch=3)
    whole = saved_bytes(model, (1, 2, 2 * 64), 6, batch=3)  # the 1 x 1 x 64 token grid rank_activations counts
    assert counts.blocks == whole["blocks"] and counts.other == whole["other"]
    assert len(model.double_blocks) == 3 and len(model.single_blocks) == 2  # restored after counting
    assert counts.block_input == 3 * rank_activations(model, 64, 6, sp=1).block_input


def test_the_plan_follows_the_engine():
    zero3 = memory_plan(compose_experiment("dcae"))
    fsdp2 = memory_plan(compose_experiment("dcae", ("parallel=fsdp2",)))
    local = memory_plan(compose_experiment("dcae", ("parallel=local", "parallel.precision=bf16")))
    assert fsdp2.fits() and fsdp2.model_states_gib == pytest.approx(zero3.model_states_gib)  # 20 B/param over 8
    assert local.model_states_gib == pytest.approx(8 * zero3.model_states_gib) and not local.fits()  # 11B unsharded
    assert local.gathered_gib == local.buffers_gib == 0 < fsdp2.gathered_gib < zero3.gathered_gib


def test_the_plan_counts_the_ema_sharded_like_the_weights():
    with_ema, without = (memory_plan(compose_experiment("dcae", extra)) for extra in ((), ("ema=null",)))
    n_params = sum(p.numel() for p in meta_model(compose_experiment("dcae")).parameters())
    assert with_ema.model_states_gib - without.model_states_gib == pytest.approx(4 * n_params / 8 / GIB)
    assert without.model_states_gib == pytest.approx(n_params * state_bytes_per_param("bf16", 3, 8) / GIB)
