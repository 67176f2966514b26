"""Ulysses sequence parallelism on 2 and 4 gloo ranks against the unsharded model, and its run-time guard.
(Training through the entry point with sp_size 2: tests/test_train.py.)

Every rank builds the same model; a copy without hooks is the sp_size=1 reference, fed the same inputs. The
sharded forward must give the same output and loss, and its gradients (summed over the group, divided by its
size: what ZeRO's averaging does) the same gradients. Shapes include text and video lengths that do not divide
by the group (padding) and a one-token text (ranks whose text is all padding).
"""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from src.models.mmdit import MMDiT
from tests.conftest import tiny_model_kwargs
from tests.ranks import spawn_ranks

pytestmark = pytest.mark.dist

# fp32 on CPU. Attention sees the unsharded sequence in its order, so the forward is bitwise equal here (1e-6
# allows for kernels that block a shorter sequence differently); gradients are sums over the group in another
# order (measured: 5e-7 of each parameter's largest gradient).
FWD_TOL = 1e-6
GRAD_TOL = 1e-5
# (T, H, W) latent and text length: even split; video 3x3x1 = 9 tokens and 5 text tokens (padded); 1 text token
SHAPES = [((2, 8, 8), 8), ((3, 6, 2), 5), ((2, 4, 4), 1)]


def _model(cond: bool) -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(**tiny_model_kwargs(heads=4, axes_dim=[4, 6, 6], cond_channels=49 if cond else None))
    for layer in (model.final_layer.linear, model.cond_in):  # no zero-initialised layer: no zero gradient
        if layer is not None:
            torch.nn.init.normal_(layer.weight, std=0.05)
            torch.nn.init.normal_(layer.bias, std=0.05)
    return model


def _inputs(model: MMDiT, latent: tuple[int, int, int], text: int, seed: int, cond: bool) -> tuple:
    g = torch.Generator().manual_seed(seed)
    B = 2
    x = torch.randn(B, model.in_channels, *latent, generator=g)
    txt = torch.randn(B, text, model.txt_in.in_features, generator=g)
    vec, t = torch.randn(B, model.vector_in.in_layer.in_features, generator=g), torch.rand(B, generator=g)
    c = torch.randn(B, 49, *latent, generator=g) if cond else None
    weights = torch.randn(B, model.in_channels, *latent, generator=g)  # loss = sum(pred * weights)
    return (x, txt, vec, t, c), weights


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)


def _parity_worker(rank: int, world: int, sp: int, port: int, results) -> None:
    _setup(rank, world, port)
    import torch.distributed as dist

    from src.parallel.dist import init_distributed, shutdown
    from src.parallel.transforms import apply_activation_checkpointing
    from src.parallel.ulysses import SequenceParallel

    info = init_distributed("gloo", sp_size=sp)
    out = []
    for cond in (False, True):  # T2V; I2V with activation checkpointing (recomputation repeats the all-to-alls)
        model = _model(cond)
        reference = copy.deepcopy(model)
        SequenceParallel(model, info.sp_group)
        if cond:
            apply_activation_checkpointing(model, double=-1, single=-1)
        for latent, text in SHAPES:
            # different data-parallel groups see different inputs; the ranks of one group the same
            args, weights = _inputs(model, latent, text, seed=100 + info.dp_rank, cond=cond)
            ref = reference(*args)
            (ref * weights).sum().backward()
            pred = model(*args)
            loss = (pred * weights).sum()
            loss.backward()
            grads, ref_grads = _grads(model), _grads(reference)
            for g in grads.values():
                dist.all_reduce(g, group=info.sp_group)
                g /= sp
            grad_err = max(((grads[n] - r).abs().max() / r.abs().max()).item() for n, r in ref_grads.items())
            out.append(
                {
                    "shape": (latent, text, cond),
                    "pred_shape": tuple(pred.shape) == tuple(ref.shape),
                    "pred_err": ((pred - ref).abs().max() / ref.abs().max()).item(),
                    # against the sum of the terms' magnitudes: the signed sum cancels down to a small number
                    "loss_err": abs(loss.item() - (ref * weights).sum().item()) / (ref * weights).abs().sum().item(),
                    "grad_err": grad_err,
                    "grad_max": min(r.abs().max().item() for r in ref_grads.values()),
                }
            )
            model.zero_grad()
            reference.zero_grad()
    results[rank] = out
    shutdown()


# sp 2 x dp 2 on 4 ranks: tests/test_train.py
@pytest.mark.parametrize("world, sp", [pytest.param(2, 2, marks=pytest.mark.numerics), (4, 4)])
def test_sequence_parallel_matches_the_unsharded_model(world, sp):
    from src.parallel.dist import _free_port

    results = mp.Manager().dict()
    spawn_ranks(_parity_worker, world, (world, sp, _free_port(), results))
    for rank in range(world):
        assert len(results[rank]) == 2 * len(SHAPES)
        for row in results[rank]:
            assert row["pred_shape"], row
            assert row["pred_err"] < FWD_TOL and row["loss_err"] < FWD_TOL, (rank, row)
            assert row["grad_err"] < GRAD_TOL and row["grad_max"] > 0, (rank, row)


def test_the_split_covers_every_token_once():
    from src.parallel.ulysses import Split

    for size, txt, img in [(2, 5, 9), (4, 1, 32), (4, 8, 8), (3, 7, 10)]:
        split = Split(size, txt, img)
        positions = split.gathered_positions(torch.device("cpu"))
        local = split.txt_chunk + split.img_chunk
        assert len(positions) == txt + img and len(set(positions.tolist())) == txt + img
        assert positions.max() < size * local
        # concatenating the ranks' [text chunk, video chunk] and reading `positions` gives the unsharded order
        seq = torch.arange(txt + img)[None, :, None].float()  # token i carries the value i
        chunks = [
            torch.cat([split.chunk(seq[:, :txt], r, True), split.chunk(seq[:, txt:], r, False)], 1) for r in range(size)
        ]
        assert torch.equal(torch.cat(chunks, 1)[0, positions, 0], torch.arange(txt + img).float())


def _refusal_worker(rank: int, port: int, results) -> None:
    _setup(rank, 2, port)
    from src.parallel.dist import init_distributed, shutdown
    from src.parallel.ulysses import SequenceParallel

    info = init_distributed("gloo", sp_size=2)
    try:
        SequenceParallel(MMDiT(**tiny_model_kwargs(heads=1, axes_dim=[8, 28, 28])), info.sp_group)
    except ValueError as err:
        results[rank] = str(err)
    shutdown()


def test_impossible_settings_are_refused_by_name():
    from src.parallel.dist import _free_port, check_sp_size

    with pytest.raises(ValueError, match=r"parallel.sp_size=3 does not divide the world size 4.*\[1, 2, 4\]"):
        check_sp_size(3, 4)
    with pytest.raises(ValueError, match="sp_size=0"):
        check_sp_size(0, 2)
    results = mp.Manager().dict()
    spawn_ranks(_refusal_worker, 2, (_free_port(), results))
    assert "sp_size=2 does not divide the model's 1 attention heads" in results[0]
    assert "valid sp_size for this model: [1]" in results[0]


def _guard_worker(rank: int, port: int, run_dir: str, results) -> None:
    _setup(rank, 2, port)
    from hydra import compose, initialize_config_dir

    from src.parallel.dist import DistInfo, init_distributed, shutdown
    from src.parallel.sp_guard import check_sequence_batches
    from src.train import train
    from tests.conftest import ROOT

    out = {}
    info = init_distributed("gloo", sp_size=2)
    # the guard compares each rank's batch, timesteps and noise seeds: t differing in one sample is caught
    batch = {"index": torch.tensor([4, 5]), "key": ["a", "b"], "bucket": "32px"}
    check_sequence_batches(batch, torch.tensor([0.25, 0.5]), 0, info, step=7)  # identical: passes
    try:
        check_sequence_batches(batch, torch.tensor([0.25, 0.5 + rank]), 0, info, step=7)
    except RuntimeError as err:
        out["direct"] = str(err)
    # end to end: the classic bug, a loader split by global rank, so the ranks of one group read different clips
    DistInfo.dp_rank = property(lambda self: self.rank)
    DistInfo.dp_world = property(lambda self: self.world_size)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=smoke", "parallel.sp_size=2"])
    try:
        train(cfg, run_dir)
    except RuntimeError as err:
        out["train"] = str(err)
    results[rank] = out
    shutdown()


def test_the_guard_stops_a_group_whose_ranks_read_different_batches(tmp_path):
    from src.parallel.dist import _free_port

    results = mp.Manager().dict()
    spawn_ranks(_guard_worker, 2, (_free_port(), str(tmp_path), results))
    for rank in (0, 1):
        direct, trained = results[rank]["direct"], results[rank]["train"]
        assert "out of step at step 7: ranks 0, 1 (data-parallel rank 0) hold different batches" in direct
        assert (
            "rank 0: bucket 32px, samples [4, 5], t [0.25, 0.5]; rank 1: bucket 32px, samples [4, 5], t [0.25, 1.5]"
            in direct
        )
        # stopped at the first step, before any update, on both ranks
        assert "out of step at step 0: ranks 0, 1" in trained
        assert (
            "rank 0: bucket 32px/8f/32x32, samples [0, 1]" in trained
            and "rank 1: bucket 32px/8f/32x32, samples [2, 3]" in trained
        )
    assert not (tmp_path / "checkpoints").exists()
