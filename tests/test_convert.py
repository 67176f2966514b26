"""Moving a run between engines (src/convert.py), through the real entry point on the smoke experiment.

- a 2-rank ZeRO-3 run's refusal to resume on 1 rank names the converter command; run as named, it writes an FSDP2
  checkpoint holding bitwise the ZeRO-3 weights, EMA, AdamW moments and step counts, LR schedule and every rank's
  loop state, sealed (`python -m src.integrity verify` passes);
- resumed on 1 rank with the same global batch, it trains like one uninterrupted local process (the parity bounds
  of tests/numerics.py through tests/test_train.assert_same_training) and stands at the same data position after
  step 4: no sample lost or repeated; the same for ZeRO-3 -> local;
- FSDP2 -> local keeps the state bitwise; converting to the engine that wrote it, or over a sealed checkpoint, is
  refused by name;
- ZeRO-3 on another number of ranks (`--to zero3 --world N`, the command check_zero_world's refusal names): steps
  1-2 of the 2-rank run laid out for 1 rank and resumed there, then its step 3 (written by the engine on 1 rank)
  laid out for 2 and resumed on 2, train like one local process at the same data position; a ZeRO-3 checkpoint
  that went through FSDP2 and back to 2 ranks holds every tensor and value DeepSpeed wrote, and so does one whose
  groups are cut into several sub-groups, with a group at half the LR and a parameter frozen in every phase.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.checkpoint import Moments, load_model_weights
from src.parallel.deepspeed import DEEPSPEED_KEYS, check_zero_world
from src.rundir import step_tag
from src.safe_load import load_tensors
from tests.conftest import ROOT, clean_env
from tests.test_fsdp2 import _assert_resumed_like_one_process
from tests.test_train import EVERY_STEP, PARITY_EPS, run, train


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m src.convert ARGS` in its own process: the command a refusal names, run as a user would."""
    return run([sys.executable, "-m", "src.convert", *map(str, args)])


def convert(*args: str) -> str:
    """The same command's main() in this process (the converter starts no process group; a process costs seconds
    of imports per call): its output, or an AssertionError with what it printed when it refuses."""
    from src.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if code != 0:
        raise AssertionError(f"python -m src.convert {' '.join(map(str, args))} failed ({code}):\n{err.getvalue()}")
    return out.getvalue()


def named_command(run_dir: Path, tag: str, world: int, target: str) -> tuple[list[str], str]:
    """The `python -m src.convert ... --to target` arguments that check_zero_world's refusal to resume `tag` of a
    ZeRO-3 run on `world` ranks names, and the refusal."""
    with pytest.raises(ValueError) as refusal:
        check_zero_world(run_dir / "checkpoints" / tag, world)
    commands = [shlex.split(c) for c in re.findall(r"`(python -m src\.convert [^`]+)`", str(refusal.value))]
    return next(c[3:] for c in commands if c[c.index("--to") + 1] == target), str(refusal.value)


@pytest.fixture(scope="module")
def zero3_as_fsdp2(zero3_run) -> Path:
    """Steps 1-2 of the ZeRO-3 run converted to FSDP2 by the command its refusal on 1 rank names (step 1 as well:
    the parity check starts there), then resumed on 1 rank for steps 3-4 with the same global batch."""
    run_dir = zero3_run[0]
    command, refusal = named_command(run_dir, step_tag(2), 1, "fsdp2")
    assert command == [str(run_dir), f"{run_dir}-fsdp2", "--to", "fsdp2", "--tag", step_tag(2)]
    convert_cli(*command)
    out = Path(f"{run_dir}-fsdp2")
    assert f"parallel=fsdp2 hydra.run.dir={out}" in refusal
    convert(run_dir, out, "--to", "fsdp2", "--tag", step_tag(1))
    assert (out / "checkpoints/latest").read_text() == step_tag(2)  # the newest converted one
    train(out, "parallel=fsdp2", "data.buckets.batch_scale=2", PARITY_EPS, EVERY_STEP, nproc=1)
    return out


def same(a, b) -> bool:
    """Equal to the bit, through dicts, lists and tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_state(run_dir: Path, out_dir: Path, tag: str) -> None:
    """Weights, EMA, every AdamW moment and step count of checkpoint `tag` bitwise equal in both runs."""
    for ema in (False, True):
        a, b = (load_model_weights(d, tag, ema=ema)[0] for d in (run_dir, out_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ema
    before, after = Moments(run_dir, tag), Moments(out_dir, tag)
    assert before.steps == after.steps and len(before.steps) == len(a)
    for (name, m, v), (name1, m1, v1) in zip(before, after.select(before.steps), strict=True):
        assert name == name1 and torch.equal(m, m1) and torch.equal(v, v1), name


def verify(folder: Path) -> str:
    """`python -m src.integrity verify FOLDER` (its main(), in this process): what it prints; fails unless intact."""
    from src.integrity import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["verify", str(folder)])
    assert code == 0, out.getvalue()
    return out.getvalue()


@pytest.mark.dist
def test_zero3_converted_to_fsdp2_holds_the_same_state_sealed(zero3_run, zero3_as_fsdp2):
    run_dir = zero3_run[0]
    for step in (1, 2):
        tag = step_tag(step)
        folder = zero3_as_fsdp2 / "checkpoints" / tag
        assert verify(folder).strip() == f"{folder}: intact"
        assert_same_state(run_dir, zero3_as_fsdp2, tag)
        ranks = sorted((run_dir / "checkpoints" / tag).glob("zero_pp_rank_*_model_states.pt"))
        saved = [load_tensors(f) for f in ranks]
        loops = [load_tensors(folder / f"loop_rank_{r:05d}.pt") for r in range(2)]
        assert all(
            same({k: v for k, v in s.items() if k not in DEEPSPEED_KEYS}, loop)
            for s, loop in zip(saved, loops, strict=True)
        )
        assert (
            loops[0]["step"] == step and loops[0]["samples_seen"] == 4 * step and loops[0]["data"]["next"] == 4 * step
        )
        record = json.loads((folder / "fsdp2.json").read_text())
        assert record["scheduler"] == saved[0]["lr_scheduler"] and record["lrs"] == [1e-4]
        assert (record["world_size"], record["converted_from"]) == (2, "zero3")


@pytest.mark.dist
@pytest.mark.numerics
def test_zero3_converted_to_fsdp2_resumes_on_one_rank_like_one_process(zero3_as_fsdp2, single_run, smoke_n):
    # steps 1-2 on 2 ZeRO-3 ranks (batch 2 each), 3-4 on 1 FSDP2 rank (batch 4): every loss, step 1's gradients,
    # moments and update, the final weights within the bounds of tests/numerics.py; after step 4 the same 16
    # samples consumed and the same plan state as the uninterrupted run
    _assert_resumed_like_one_process(zero3_as_fsdp2, single_run[0], smoke_n)
    assert "resumed from" in (zero3_as_fsdp2 / "train.log").read_text()


@pytest.mark.dist
@pytest.mark.numerics
def test_zero3_converted_to_local_resumes_like_one_process(zero3_run, single_run, smoke_n, tmp_path):
    for step in (1, 2):
        convert(zero3_run[0], tmp_path, "--to", "local", "--tag", step_tag(step))
    train(tmp_path, "parallel=local", "data.buckets.batch_scale=2", PARITY_EPS, EVERY_STEP, nproc=1)
    _assert_resumed_like_one_process(tmp_path, single_run[0], smoke_n)


@pytest.mark.dist
def test_fsdp2_converted_to_local_holds_the_same_state(zero3_as_fsdp2, tmp_path):
    convert(zero3_as_fsdp2, tmp_path, "--to", "local")  # latest: step 4, written by the FSDP2 engine on 1 rank
    tag = step_tag(4)
    assert verify(tmp_path / "checkpoints" / tag) and (tmp_path / "checkpoints/latest").read_text() == tag
    assert_same_state(zero3_as_fsdp2, tmp_path, tag)
    blob = load_tensors(tmp_path / "checkpoints" / tag / "local_engine.pt")
    assert same(blob["state"], load_tensors(zero3_as_fsdp2 / "checkpoints" / tag / "loop_rank_00000.pt"))
    config = (tmp_path / "config.yaml").read_text()
    assert "_target_: src.parallel.local.LocalEngine" in config and "precision: fp32" in config
    assert (tmp_path / "metrics.jsonl").read_text() == (zero3_as_fsdp2 / "metrics.jsonl").read_text()


@pytest.mark.dist
def test_converting_to_the_same_engine_or_over_a_sealed_checkpoint_is_refused(zero3_as_fsdp2, zero3_run):
    same_engine = subprocess.run(
        [sys.executable, "-m", "src.convert", str(zero3_as_fsdp2), str(zero3_as_fsdp2) + "-again", "--to", "fsdp2"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert same_engine.returncode == 2 and "is already a fsdp2 checkpoint: it resumes on any number of ranks" in (
        same_engine.stderr
    )
    with pytest.raises(AssertionError, match=r"already holds a sealed checkpoint: choose another OUT_RUN_DIR"):
        convert(zero3_run[0], zero3_as_fsdp2, "--to", "fsdp2", "--tag", step_tag(1))


# -- ZeRO-3 on another number of ranks: --to zero3 --world N ------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_two_then_one(zero3_run) -> Path:
    """Steps 1-2 of the 2-rank ZeRO-3 run laid out for 1 rank by the command the refusal names (step 1 too: the
    parity check starts there), resumed on 1 ZeRO-3 rank for steps 3-4 with the same global batch."""
    run_dir = zero3_run[0]
    command, refusal = named_command(run_dir, step_tag(2), 1, "zero3")
    out = Path(f"{run_dir}-1ranks")
    assert command == [str(run_dir), str(out), "--to", "zero3", "--world", "1", "--tag", step_tag(2)]
    assert f"then run this command with hydra.run.dir={out}" in refusal
    convert_cli(*command)
    convert(run_dir, out, "--to", "zero3", "--world", 1, "--tag", step_tag(1))
    train(out, "data.buckets.batch_scale=2", PARITY_EPS, EVERY_STEP, nproc=1)
    return out


@pytest.mark.dist
@pytest.mark.numerics
def test_zero3_laid_out_for_one_rank_resumes_there_like_one_process(zero3_two_then_one, single_run, smoke_n):
    # steps 1-2 on 2 ZeRO-3 ranks (batch 2 each), 3-4 on 1 ZeRO-3 rank (batch 4): every loss, step 1's gradients,
    # moments and update, the final weights within tests/numerics.py's bounds; the same 16 samples after step 4
    _assert_resumed_like_one_process(zero3_two_then_one, single_run[0], smoke_n)
    assert "resumed from" in (zero3_two_then_one / "train.log").read_text()
    for step in (1, 2):
        folder = zero3_two_then_one / "checkpoints" / step_tag(step)
        assert verify(folder).strip() == f"{folder}: intact"
        assert sorted(p.name for p in folder.glob("*_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        ]


@pytest.mark.dist
@pytest.mark.numerics
def test_zero3_from_one_rank_laid_out_for_two_resumes_like_one_process(
    zero3_two_then_one, single_run, smoke_n, tmp_path
):
    # step 3 was written by the ZeRO-3 engine on 1 rank (steps 1-2 by the converter for 1 rank): all three laid out
    # for 2 ranks, where step 4 trains with batch 2 per rank
    for step in (1, 2, 3):
        convert(zero3_two_then_one, tmp_path, "--to", "zero3", "--world", 2, "--tag", step_tag(step))
        assert_same_state(zero3_two_then_one, tmp_path, step_tag(step))
    train(tmp_path, PARITY_EPS, EVERY_STEP)
    _assert_resumed_like_one_process(tmp_path, single_run[0], smoke_n)
    assert len(list((tmp_path / "checkpoints" / step_tag(4)).glob("zero_pp_rank_*_optim_states.pt"))) == 2


def assert_same_files(written: Path, converted: Path, loops: bool = True) -> None:
    """Every file DeepSpeed and Kiln wrote into a ZeRO-3 checkpoint folder holds the same tensors and values (with
    `loops` False, but each rank's loop state: a checkpoint that went through fewer ranks lost the others')."""
    names = sorted(p.name for p in written.glob("*.pt"))
    assert names == sorted(p.name for p in converted.glob("*.pt")) and len(names) == 6, names
    for name in names:
        a, b = (torch.load(d / name, weights_only=False) for d in (written, converted))
        if not loops and name.endswith("_model_states.pt"):
            a, b = ({k: v for k, v in x.items() if k in DEEPSPEED_KEYS} for x in (a, b))
        loss_scalers = [
            x["optimizer_state_dict"].pop("loss_scaler", None) for x in (a, b) if "optimizer_state_dict" in x
        ]
        assert same(a, b), name
        assert all(vars(s) == {"cur_scale": 1.0, "dynamic": False} for s in loss_scalers)


@pytest.mark.dist
def test_zero3_through_fsdp2_and_back_holds_what_deepspeed_wrote(zero3_run, zero3_as_fsdp2, tmp_path):
    convert(zero3_as_fsdp2, tmp_path, "--to", "zero3", "--world", 2, "--tag", step_tag(2))
    assert_same_files(zero3_run[0] / "checkpoints" / step_tag(2), tmp_path / "checkpoints" / step_tag(2))


@pytest.mark.dist
def test_zero3_sub_groups_and_frozen_parameters_are_laid_out_as_deepspeed_does(tmp_path):
    # sub_group_size 100000 cuts the tiny model's param groups into sub-groups where the running per-rank sum
    # reaches it (the converter keeps a ZeRO-3 run's zero_options; from FSDP2 or local it lays out for DeepSpeed's
    # default); img_in, frozen in every phase, is in no group: each rank keeps its slice as a frozen fragment;
    # final_layer trains in a group of its own at half the LR
    run_dir, one, back = tmp_path / "run", tmp_path / "one", tmp_path / "back"
    groups = "optim.groups=[{pattern:'^img_in',trainable:false},{pattern:'^final_layer',lr_scale:0.5}]"
    train(run_dir, "steps=1", "+parallel.zero_options.sub_group_size=100000", groups, PARITY_EPS)
    convert(run_dir, one, "--to", "zero3", "--world", 1)
    convert(one, back, "--to", "zero3", "--world", 2)
    written, on_one = (d / "checkpoints" / step_tag(1) for d in (run_dir, one))
    for folder, cut in ((written, 4), (on_one, 6)):  # 1 rank holds twice the elements: more sub-groups
        model_states = load_tensors(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        assert len(model_states["param_shapes"]) == cut
        assert list(model_states["frozen_param_fragments"]) == ["img_in.weight", "img_in.bias"]
    optim = load_tensors(written / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    assert [g["lr"] for g in optim["optimizer_state_dict"]["param_groups"]] == [1e-4, 5e-5]
    assert_same_files(written, back / "checkpoints" / step_tag(1), loops=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--to", "zero3"), "a ZeRO-3 checkpoint needs the ranks it will resume on"),
        (("--to", "fsdp2", "--world", "2"), "and only a ZeRO-3 one"),
        (("--to", "zero3", "--world", "0"), "--world N >= 1"),
    ],
)
def test_world_is_asked_for_zero3_alone(args, message, tmp_path, capsys):
    from src.convert import main

    (tmp_path / "config.yaml").write_text("{}")
    assert main([str(tmp_path), str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.dist
def test_zero3_on_the_ranks_that_wrote_it_is_refused(zero3_run, tmp_path):
    with pytest.raises(AssertionError, match=r"is already a zero3 checkpoint of 2 ranks: it resumes on 2 as it is"):
        convert(zero3_run[0], tmp_path, "--to", "zero3", "--world", 2)
