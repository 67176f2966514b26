"""Checkpoints that prove their integrity, messages that say what to do, and loads that run no code.

The plain engine in one process writes the checkpoints here; tests/test_train.py runs the same checks on the
2-rank ZeRO-3 checkpoints (optimizer, model-state and EMA shards) and through torchrun.
"""

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.checkpoint import load_model_weights
from src.integrity import MANIFEST, file_sha256, prune, resume_tag, save_checkpoint, seal, verify, write_latest
from src.models.mmdit import MMDiT
from src.parallel.deepspeed import check_zero_world
from src.parallel.local import LocalEngine
from src.run.metrics import read_metrics
from src.run.param_groups import warmup_schedule
from src.run.resume import GlobalBatches, check_writable
from src.rundir import rng_state, set_rng_state
from src.safe_load import load_tensors, refuse_unsafe_pickles
from tests.conftest import ROOT, clean_env, tiny_model_kwargs
from tests.test_engine import make_engine, train_steps


def flip_bytes(path: Path, offset: int = 64, count: int = 64) -> None:
    """Invert `count` bytes in the middle of a file (its size unchanged), as a bad disk or a bad copy does."""
    data = bytearray(path.read_bytes())
    start = min(len(data) // 2, len(data) - count) if len(data) > offset + count else 0
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path) -> Path:
    """Checkpoints of steps 1, 2 and 3 of the plain engine, sealed; `latest` names step 3."""
    engine = make_engine()
    for step in (1, 2, 3):
        train_steps(engine, range(step - 1, step))
        save_checkpoint(engine, tmp_path, f"step_{step:08d}", {"step": step, "rng": rng_state()})
    return tmp_path


def test_a_save_is_sealed_by_a_manifest_before_latest_moves(saved):
    folder = saved / "step_00000003"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["world_size"] == 1 and list(manifest["files"]) == ["local_engine.pt"]
    assert manifest["files"]["local_engine.pt"]["sha256"] == file_sha256(folder / "local_engine.pt")
    assert (saved / "latest").read_text() == "step_00000003" and not (saved / "latest.tmp").exists()
    assert verify(folder) == [] and resume_tag(saved) == "step_00000003"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: flip_bytes(f / "local_engine.pt"), "local_engine.pt does not match its SHA-256"),
        (lambda f: (f / "local_engine.pt").unlink(), r"local_engine.pt is missing \(listed in manifest.json\)"),
        (lambda f: (f / "stray.pt").write_bytes(b"x"), "stray.pt is not listed in manifest.json"),
        (lambda f: (f / MANIFEST).unlink(), "manifest.json is missing: the save of step_00000003 did not finish"),
        (lambda f: (f / MANIFEST).write_text("{"), "manifest.json is unreadable"),
    ],
    ids=["flipped", "deleted", "unlisted", "no manifest", "bad manifest"],
)
def test_a_damaged_checkpoint_is_refused_by_name_and_latest_intact_falls_back(saved, damage, message):
    damage(saved / "step_00000003")
    with pytest.raises(ValueError, match=message) as refused:
        resume_tag(saved, "latest")
    assert "resume=latest_intact" in str(refused.value)
    assert (saved / "latest").read_text() == "step_00000003"  # nothing changed by a refusal
    assert resume_tag(saved, "latest_intact") == "step_00000002"
    assert (saved / "latest").read_text() == "step_00000002"  # the engine then loads the intact one
    assert make_engine().load(saved)["step"] == 2


def test_latest_intact_says_why_when_no_checkpoint_is_intact(saved):
    for step in (1, 2, 3):
        flip_bytes(saved / f"step_{step:08d}/local_engine.pt")
    with pytest.raises(ValueError, match=r"(?s)no intact checkpoint in .*step_00000003: .*step_00000001: .*SHA-256"):
        resume_tag(saved, "latest_intact")
    with pytest.raises(ValueError, match="resume='newest' is not one of"):
        resume_tag(saved, "newest")


def test_an_empty_latest_says_what_to_do(saved):
    (saved / "latest").write_text("")
    with pytest.raises(ValueError, match=r"latest is empty, so it names no checkpoint.*resume=latest_intact"):
        resume_tag(saved, "latest")
    assert resume_tag(saved, "latest_intact") == "step_00000003"


def test_no_latest_is_a_fresh_start_and_a_rewritten_tag_is_resealed(saved, tmp_path):
    assert resume_tag(tmp_path / "nothing") is None
    engine = make_engine()
    (saved / "step_00000004").mkdir()
    (saved / "step_00000004/leftover.pt").write_bytes(b"from a save that died")  # an interrupted save's folder
    save_checkpoint(engine, saved, "step_00000004", {"step": 4})
    assert sorted(p.name for p in (saved / "step_00000004").iterdir()) == ["local_engine.pt", MANIFEST]
    assert resume_tag(saved) == "step_00000004"


def test_ckpt_keep_deletes_all_but_the_newest_sealed_checkpoints(saved):
    (saved / "step_00000002" / MANIFEST).unlink()  # unsealed: not counted among the kept, older ones go
    assert prune(saved, None) == []
    shutil.copytree(saved / "step_00000003", saved / "step_00000005")  # past `latest`: a run resumed from before it
    assert prune(saved, 1) == ["step_00000002", "step_00000001"]
    assert sorted(p.name for p in saved.glob("step_*")) == ["step_00000003", "step_00000005"]


def test_the_manifest_covers_any_engine_layout(tmp_path):
    # what torch.distributed.checkpoint writes: nested names and a metadata file; hashed as bytes, like any other
    folder = tmp_path / "step_00000001"
    (folder / "sub").mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"meta")
    (folder / "__0_0.distcp").write_bytes(os.urandom(1000))
    (folder / "sub/__1_0.distcp").write_bytes(os.urandom(1000))
    assert sorted(seal(folder)["files"]) == [".metadata", "__0_0.distcp", "sub/__1_0.distcp"]
    flip_bytes(folder / "sub/__1_0.distcp")
    assert verify(folder) == [
        f"{folder}/sub/__1_0.distcp does not match its SHA-256 in manifest.json (the file changed after the save)"
    ]


def test_a_full_disk_says_no_space_and_which_checkpoint_still_resumes(saved, monkeypatch):
    class FullDisk:
        def save(self, ckpt_dir, tag, state):
            (Path(ckpt_dir) / tag).mkdir()
            (Path(ckpt_dir) / tag / "local_engine.pt").write_bytes(b"\0" * 128)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(
        OSError,
        match=r"no space left on .* writing checkpoint step_00000004 \(0 bytes free.*"
        r"ckpt_keep=N.*`latest` still names step_00000003, which resumes",
    ):
        save_checkpoint(FullDisk(), saved, "step_00000004", {})
    assert resume_tag(saved) == "step_00000003"


def test_a_world_size_mismatch_says_how_to_resume_without_touching_latest(tmp_path):
    folder = tmp_path / "run/checkpoints/step_00000004"
    folder.mkdir(parents=True)
    for rank in (0, 1):
        (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    check_zero_world(folder, 2)
    with pytest.raises(ValueError, match=r"shards of 2 ranks, and this run has 1.*--nproc_per_node=2") as e:
        check_zero_world(folder, 1)
    run = tmp_path / "run"  # and the command that converts it to FSDP2, which resumes on any number of ranks
    assert f"`python -m src.convert {run} {run}-fsdp2 --to fsdp2 --tag step_00000004`" in str(e.value)
    assert f"parallel=fsdp2 hydra.run.dir={run}-fsdp2" in str(e.value) and "latest" not in str(e.value)
    # first, the one that lays it out for this run's number of ranks, staying on ZeRO-3
    assert f"`python -m src.convert {run} {run}-1ranks --to zero3 --world 1 --tag step_00000004`" in str(e.value)


def test_unwritable_run_folders_are_refused_at_start(tmp_path):
    check_writable([tmp_path / "run", tmp_path / "run/checkpoints"])  # not created yet: their parent is writable
    assert not (tmp_path / "run/checkpoints").exists() and not list(tmp_path.rglob(".write_probe*"))
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run/checkpoints").write_text("a file where the checkpoints go")
    with pytest.raises(ValueError, match=r"run/checkpoints is a file, where the run needs a folder.*hydra.run.dir"):
        check_writable([tmp_path / "run", tmp_path / "run/checkpoints"])
    with pytest.raises(ValueError, match=r"rank 0 cannot write to \S*run/checkpoints \(FileExistsError"):
        check_writable([tmp_path / "run/checkpoints/sub"])


def test_a_changed_global_batch_is_refused_unless_declared(caplog):
    batches = GlobalBatches({"32px/8f/32x32": 4}, declared=False)
    batches.check("64px/8f/64x64", 2, step=3)  # a bucket not trained before: nothing to compare
    with pytest.raises(
        ValueError,
        match=r"step 3, bucket 32px/8f/32x32: the global batch was 4 .* is 2 now.*"
        r"resume_batch_change=true",
    ):
        batches.check("32px/8f/32x32", 2, step=3)
    declared = GlobalBatches({"32px/8f/32x32": 4}, declared=True)
    declared.check("32px/8f/32x32", 2, step=3)
    assert "global batch was 4" in caplog.text and declared.state() == {"global_batches": {"32px/8f/32x32": 2}}


class Payload:
    """An object whose unpickling runs code: here it only makes a folder, to show that it ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused_unrun(saved, tmp_path):
    marker = tmp_path / "code_ran"
    blob = saved / "step_00000003/local_engine.pt"
    torch.save({"module": {}, "state": {"step": 3}, "payload": Payload(marker)}, blob)
    seal(blob.parent)  # a manifest does not make a file trustworthy: it only proves it is the one written
    with pytest.raises(
        ValueError, match=r"local_engine.pt would run code when loaded: its pickle names \['posix.mkdir'\]"
    ):
        load_model_weights(saved)
    with pytest.raises(ValueError, match="would run code"):
        make_engine().load(saved)
    with pytest.raises(ValueError, match="would run code"):
        refuse_unsafe_pickles([blob])  # what runs before DeepSpeed's own loads
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_distributed_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path):
    # torch.distributed.checkpoint (the FSDP2 engine's format) unpickles `.metadata` with pickle.load
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_00000001"
    state = {"model.w": torch.randn(3, 4), "ema.w": torch.zeros(3, 4, dtype=torch.bfloat16), "step": torch.tensor(2.0)}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    seal(folder)
    write_latest(tmp_path, folder.name)
    assert resume_tag(tmp_path) == folder.name  # its own dataclasses, sizes and dtypes only
    marker = tmp_path / "code_ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    seal(folder)
    with pytest.raises(ValueError, match=r"\.metadata would run code when loaded: its pickle names \['posix.mkdir'\]"):
        resume_tag(tmp_path)
    with pytest.raises(ValueError, match="would run code"):
        load_model_weights(tmp_path)
    assert not marker.exists()


def test_rng_states_of_older_checkpoints_load_without_running_code(tmp_path):
    np.random.seed(3)
    legacy = {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}  # numpy arrays, as before
    torch.save(legacy, tmp_path / "legacy.pt")
    loaded = load_tensors(tmp_path / "legacy.pt")
    assert np.array_equal(loaded["numpy"][1], legacy["numpy"][1])
    state = rng_state()
    expected = np.random.rand(3)
    set_rng_state(load_tensors(_saved(state, tmp_path / "new.pt")))  # tensors and plain values only
    assert np.array_equal(np.random.rand(3), expected)


def _saved(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_a_local_checkpoint_resumes_onto_another_device_with_cpu_rng_states(saved):
    # issue 20: mapped to the training device, the RNG ByteTensors would leave the host and set_rng_state refuse
    # them. Loaded into an engine on the meta device (no data), the loop state must still come back on the host.
    torch.manual_seed(0)
    engine = LocalEngine(
        MMDiT(**tiny_model_kwargs()),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=warmup_schedule,
        device=torch.device("meta"),
    )
    engine.init_ema()
    state = engine.load(saved)
    assert state["rng"]["torch"].device.type == "cpu" and state["rng"]["torch"].dtype == torch.uint8
    assert next(engine.module.parameters()).device.type == "meta"
    set_rng_state(state["rng"])


RANDOM_RUN = ["data=random_features", "parallel=local", "ckpt_every=1", "log_every=1"]  # no encoders: seconds


def run_train(run_dir: Path, *overrides: str, python: tuple[str, ...] = ("-m", "src.train")):
    """`python -m src.train` on random features in one process; the completed process."""
    cmd = [sys.executable, *python, *RANDOM_RUN, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)


def test_a_save_killed_before_its_manifest_leaves_latest_on_the_previous_checkpoint(tmp_path):
    # SIGKILL inside the save of step 2, once the engine's files are written but before they are sealed
    drill = (
        "import os, signal, runpy\n"
        "import src.integrity as integrity\n"
        "real_seal = integrity.seal\n"
        "def dying_seal(folder):\n"
        "    if folder.name == 'step_00000002':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_seal(folder)\n"
        "integrity.seal = dying_seal\n"
        "runpy.run_module('src.train', run_name='__main__', alter_sys=True)\n"
    )
    killed = run_train(tmp_path, "steps=3", python=("-c", drill))
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert (ckpt / "step_00000002/local_engine.pt").is_file() and not (ckpt / "step_00000002" / MANIFEST).exists()
    resumed = run_train(tmp_path, "steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (tmp_path / "train.log").read_text()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # step 2 trained again, logged once
    assert (ckpt / "latest").read_text() == "step_00000003" and verify(ckpt / "step_00000002") == []


def test_a_resume_with_another_global_batch_is_refused_unless_declared(tmp_path):
    assert run_train(tmp_path, "steps=1", "data.batch_size=2").returncode == 0
    refused = run_train(tmp_path, "steps=2", "data.batch_size=1")
    assert refused.returncode != 0
    assert "the global batch was 2 samples before the resume and is 1 now" in refused.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # refused before the step trained
    declared = run_train(tmp_path, "steps=2", "data.batch_size=1", "resume_batch_change=true")
    assert declared.returncode == 0, declared.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
