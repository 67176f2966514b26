"""The engine seam with the single-process engine: steps, warmup, save/load round trip, refused checkpoints."""

import copy
import functools

import pytest
import torch

from src.integrity import save_checkpoint
from src.models.mmdit import MMDiT
from src.parallel.local import LocalEngine
from src.run.param_groups import warmup_schedule
from tests.conftest import tiny_model_kwargs
from tests.numerics import accumulation_length, adam_moments_atol, adam_update_atol, rounding_atol
from tests.ranks import spawn_ranks


def make_engine(seed: int = 0) -> LocalEngine:
    torch.manual_seed(seed)
    return LocalEngine(
        MMDiT(**tiny_model_kwargs()),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-8),
        scheduler=functools.partial(warmup_schedule, warmup_steps=3),
        device=torch.device("cpu"),
    )


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(2, 48, 1, 4, 4, generator=g)
    return x, torch.randn(2, 3, 384, generator=g), torch.randn(2, 384, generator=g), torch.rand(2, generator=g)


def train_steps(engine: LocalEngine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, txt, vec, t = batch(step)
        loss = (engine(x, txt, vec, t) - x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_warmup_is_linear_then_constant():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_schedule(opt, -1)


def test_save_load_continues_exactly(tmp_path):
    straight = make_engine()
    expected = train_steps(straight, range(5))
    first = make_engine()
    train_steps(first, range(3))
    save_checkpoint(first, tmp_path, "step_00000003", {"step": 3})
    resumed = make_engine(seed=123)  # different init: everything must come from the checkpoint
    assert resumed.load(tmp_path) == {"step": 3}
    assert train_steps(resumed, range(3, 5)) == expected[3:]
    assert resumed.lr() == straight.lr()
    for (name, a), b in zip(straight.full_state_dict().items(), resumed.full_state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert make_engine().load(tmp_path) is None


def test_broken_checkpoints_are_refused(tmp_path):
    engine = make_engine()
    save_checkpoint(engine, tmp_path, "step_00000001", {"step": 1})
    (tmp_path / "latest").write_text("step_00000009")
    with pytest.raises(ValueError, match=r"names 'step_00000009', which does not exist.*step_00000001"):
        engine.load(tmp_path)
    (tmp_path / "latest").write_text("step_00000001")
    blob = tmp_path / "step_00000001/local_engine.pt"
    blob.write_bytes(blob.read_bytes()[:1000])  # truncated by a crash mid-write
    with pytest.raises(ValueError, match="cannot be loaded.*it is not used"):
        engine.load(tmp_path)


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        LocalEngine(MMDiT(**tiny_model_kwargs()), torch.optim.AdamW, warmup_schedule, torch.device("cpu"), "fp16")


@pytest.mark.numerics
def test_compiled_blocks_train_like_eager_ones():
    # parallel.compile=true: torch.compile per block (inductor), names and state dict unchanged; with activation
    # checkpointing on one block of each kind, so the recomputation runs inside the compiled graphs
    eager = make_engine()
    torch.manual_seed(0)
    compiled = LocalEngine(
        MMDiT(**tiny_model_kwargs()),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, eps=1e-8),
        scheduler=functools.partial(warmup_schedule, warmup_steps=3),
        device=torch.device("cpu"),
        checkpoint_double=1,
        checkpoint_single=1,
        compile=True,
    )
    assert all(block._compiled_call_impl is not None for block in compiled.module.double_blocks)
    assert compiled.module.state_dict().keys() == eager.module.state_dict().keys()
    # Each step starts both engines from the same weights and moments (the compiled one takes the eager one's), so
    # that they differ only by the rounding of that step (tests/numerics.py): the fused kernels round elementwise ops
    # and order reductions differently. Loss: k * eps * sqrt(n_loss) relative; gradients: k * eps * max|g| *
    # sqrt(n_grad) per tensor; moments and the update from there (adam_moments_atol, adam_update_atol).
    x, txt, vec, t = batch(0)
    forward = lambda: eager.module(x, txt, vec, t)  # noqa: E731
    n_loss, n_grad = accumulation_length(forward) + x.numel(), accumulation_length(forward, backward=True)
    group = eager.optimizer.param_groups[0]
    betas, adam_eps = group["betas"], group["eps"]
    for step in range(3):
        compiled.module.load_state_dict(eager.module.state_dict())
        compiled.optimizer.load_state_dict(copy.deepcopy(eager.optimizer.state_dict()))  # no shared tensors
        x, txt, vec, t = batch(step)
        losses, grads = [], []
        for engine in (eager, compiled):
            loss = (engine(x, txt, vec, t) - x).pow(2).mean()
            engine.backward(loss)
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in engine.module.named_parameters()})
        assert losses[1] == pytest.approx(losses[0], rel=rounding_atol(1.0, n_loss)), step
        lr = eager.lr()
        grad_atols = {}
        for name, g in grads[0].items():
            grad_atols[name] = rounding_atol(torch.maximum(g.abs().max(), grads[1][name].abs().max()), n_grad)
            assert (grads[1][name] - g).abs().max() <= grad_atols[name], (step, name)
        norms = [engine.step() for engine in (eager, compiled)]
        assert norms[0] < eager.grad_clip  # not clipped: the optimizer saw the gradients compared above
        state = eager.optimizer.state
        for (name, p), q in zip(eager.module.named_parameters(), compiled.module.parameters(), strict=True):
            m, v = state[p]["exp_avg"], state[p]["exp_avg_sq"]
            m_atol, v_atol = adam_moments_atol(m, v, grad_atols[name], betas)
            other = compiled.optimizer.state[q]
            assert ((other["exp_avg"] - m).abs() <= m_atol).all(), (step, name)
            assert ((other["exp_avg_sq"] - v).abs() <= v_atol).all(), (step, name)
            atol = adam_update_atol(m, v, p, step + 1, lr, betas, adam_eps, grad_atols[name])
            assert ((q.detach() - p.detach()).abs() <= atol).all(), (step, name)


def test_zero3_bf16_reduces_gradients_in_fp32():
    from src.parallel.deepspeed import ds_config

    config = ds_config(zero_stage=3, precision="bf16", grad_clip=1.0)
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"
    assert ds_config(3, "bf16", 1.0, reduce_dtype="bf16")["communication_data_type"] == "bf16"
    with pytest.raises(ValueError, match="parallel.reduce_dtype='fp16' is not one of"):
        ds_config(3, "bf16", 1.0, reduce_dtype="fp16")


def _zero3_reduce_dtype(rank: int, port: int, extensions: str, results) -> None:
    import os

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions  # holding the lock of a build that was killed
    from src.parallel.deepspeed import DeepSpeedEngine
    from src.parallel.dist import init_distributed, shutdown

    info = init_distributed("gloo")
    engine = DeepSpeedEngine(
        MMDiT(**tiny_model_kwargs()),
        functools.partial(torch.optim.AdamW, lr=1e-4),
        warmup_schedule,
        info.device,
        precision="bf16",
    )
    results["engine"] = engine.ds.communication_data_type
    results["zero3"] = engine.ds.optimizer.communication_data_type  # what the reduce-scatter buckets are made of
    x, txt, vec, t = batch(0)
    engine.backward((engine(x, txt, vec, t).float() - x).pow(2).mean())
    results["grad_norm"] = float(engine.step())
    import deepspeed

    results["shm op built"] = deepspeed.comm.comm.cdb.shm_comm_op is not None
    shutdown()


@pytest.mark.dist
def test_built_zero3_engine_reduces_in_fp32_and_builds_no_shm_op(tmp_path):
    import torch.multiprocessing as mp

    from src.parallel.dist import _free_port

    # A DeepSpeed process killed while it JIT-builds its shared-memory op leaves this lock, and every later one
    # that builds the op waits for it forever; Kiln's ZeRO-3 start does not build it (src/parallel/deepspeed.py)
    lock = tmp_path / "deepspeed_shm_comm" / "lock"  # TORCH_EXTENSIONS_DIR/NAME/lock
    lock.parent.mkdir(parents=True)
    lock.touch()
    results = mp.Manager().dict()
    spawn_ranks(_zero3_reduce_dtype, 1, (_free_port(), str(tmp_path), results), timeout_s=120)
    assert results["engine"] == torch.float32 and results["zero3"] == torch.float32
    assert results["grad_norm"] > 0  # a step with fp32 reduction runs (gloo)
    assert not results["shm op built"] and lock.exists()
