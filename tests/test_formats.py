"""Checkpoint readers chosen from what is on disk (src/parallel/formats.py): each engine's folder gets its engine's
reader, which reads back what was saved; a folder no engine wrote is refused naming it and the formats known.

The local folder is written by `LocalEngine.save`, the FSDP2 one by `src.convert`'s writer (the layout
`FSDP2Engine.save` writes, from one process), the DeepSpeed ones are DeepSpeed's file names only: reading real ZeRO-3
shards through `ZeroCheckpoint` is covered by tests/test_train.py's 2-rank run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from src.checkpoint import Moments, load_model_weights
from src.config import CONF
from src.convert import write_fsdp2
from src.integrity import save_checkpoint
from src.parallel.deepspeed import ZeroCheckpoint
from src.parallel.formats import reader_for, readers
from src.parallel.fsdp2 import Fsdp2Checkpoint
from src.parallel.local import LocalCheckpoint
from tests.test_engine import make_engine, train_steps


@pytest.fixture
def local_run(tmp_path):
    """A local engine's checkpoint after 2 steps with an EMA: (checkpoints folder, the engine)."""
    engine = make_engine()
    engine.init_ema()
    train_steps(engine, range(2))
    engine.update_ema(0.5)
    save_checkpoint(engine, tmp_path / "checkpoints", "step_00000002", {"step": 2})
    return tmp_path / "checkpoints", engine


def test_the_readers_are_those_of_the_engine_configs():
    targets = {path.stem: OmegaConf.load(path)._target_ for path in (CONF / "parallel").glob("*.yaml")}
    assert targets.keys() == {"fsdp2", "local", "zero3"}
    assert [r.name for r in readers()] == ["fsdp2", "local", "zero3"]  # one per engine class, named as its YAML
    assert {r.__module__ for r in readers()} == {t.rpartition(".")[0] for t in targets.values()}  # in its file


def test_each_engines_checkpoint_gets_its_reader(local_run, tmp_path):
    ckpt_dir, engine = local_run
    local = reader_for(ckpt_dir / "step_00000002")
    assert type(local) is LocalCheckpoint and local.world_size == 1
    weights, ema = engine.full_state_dict(), {n: e.clone() for n, e in engine.ema.items()}
    assert all(torch.equal(local.weights()[k], v) for k, v in weights.items())
    assert all(torch.equal(local.weights(ema=True)[k], ema.get(k, v)) for k, v in weights.items())
    assert set(local.moments().steps.values()) == {2}

    fsdp2_folder = tmp_path / "fsdp2" / "step_00000002"
    fsdp2_folder.mkdir(parents=True)
    write_fsdp2(local.training_state(), fsdp2_folder, sp_size=1)
    fsdp2 = reader_for(fsdp2_folder)
    assert type(fsdp2) is Fsdp2Checkpoint and fsdp2.world_size == 1
    assert all(torch.equal(fsdp2.weights(ema=True)[k], ema.get(k, v)) for k, v in weights.items())
    state, saved = fsdp2.training_state(), local.training_state()
    assert (state.engine, state.groups, state.lrs, state.loops) == ("fsdp2", saved.groups, saved.lrs, saved.loops)
    for name, exp_avg, exp_avg_sq in fsdp2.moments().select(local.moments().steps):
        assert torch.equal(exp_avg, saved.moments[name][0]) and torch.equal(exp_avg_sq, saved.moments[name][1])

    for files, world in (
        ([f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(2) for kind in ("model", "optim")], 2),
        (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 1),  # ZeRO-1/2's names
    ):
        folder = tmp_path / f"zero{world}" / "step_00000002"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).touch()
        zero = reader_for(folder)
        assert type(zero) is ZeroCheckpoint and zero.world_size == world


def test_a_folder_no_engine_wrote_is_refused_naming_it_and_the_formats_known(local_run):
    ckpt_dir, _ = local_run
    folder = ckpt_dir / "step_00000002"
    (folder / "local_engine.pt").rename(folder / "weights.bin")
    known = "formats known: fsdp2, local, zero3"
    with pytest.raises(ValueError, match=rf"{folder} is no checkpoint of a Kiln engine \({known}\): .*'weights.bin'"):
        reader_for(folder)
    (folder / "manifest.json").unlink()  # sealed with the old name: no manifest, read with a warning
    for read in (load_model_weights, Moments):
        with pytest.raises(ValueError, match=rf"{folder} is no checkpoint of a Kiln engine \({known}\)"):
            read(ckpt_dir.parent)
    with pytest.raises(ValueError, match=rf"{ckpt_dir / 'step_00000009'} is no checkpoint .*no folder"):
        reader_for(ckpt_dir / "step_00000009")
