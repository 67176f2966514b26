"""No hangs: the watchdog names the rank that stopped responding and ends the job; the process-group timeout fails
a collective whose peer never comes. The drill: SIGSTOP one of two ZeRO-3 ranks of a real torchrun job."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch.multiprocessing as mp

from src.run.watchdog import HANG_EXIT, Watchdog, read_heartbeats, stall_message
from tests.conftest import ROOT, clean_env
from tests.ranks import spawn_ranks

GUARD_S = 300  # how long a test waits for what must happen before calling it a hang (not a speed requirement)


def beat(rank: int, step: int, alive: float) -> dict:
    return {"rank": rank, "pid": 100 + rank, "host": "node-a", "step": step, "alive": alive}


def test_the_stall_message_names_the_ranks_that_stopped_responding():
    beats = {0: beat(0, 7, 1000.0), 1: beat(1, 6, 930.0), 2: beat(2, 7, 999.0)}
    message = stall_message(0, 7, 61.4, beats, now=1000.0, stale_s=8)
    assert message.startswith("watchdog: rank 0 made no progress for 61 s after finishing step 7. Not responding")
    assert "rank 1 (pid 101 on node-a) last finished step 6 and has not responded for 70 s" in message
    assert "rank 2" not in message
    everyone = stall_message(2, 7, 61.0, {0: beat(0, 7, 999.0), 2: beat(2, 7, 999.5)}, now=1000.0, stale_s=8)
    assert "Every rank is alive (rank 0: step 7, rank 2: step 7): they wait on each other" in everyone


def test_heartbeats_of_ranks_outside_the_world_and_broken_files_are_left_out(tmp_path):
    for rank in (0, 1, 3):
        (tmp_path / f"rank_{rank}.json").write_text(json.dumps(beat(rank, 5, 1.0)))
    (tmp_path / "rank_2.json").write_text('{"rank": 2, "st')  # half-written
    assert sorted(read_heartbeats(tmp_path, world=3)) == [0, 1]


def test_a_loop_that_finishes_no_step_is_reported_with_its_rank_and_step(tmp_path):
    stalled = threading.Event()
    messages = []

    def on_stall(message: str) -> None:
        messages.append(message)
        stalled.set()

    def loop() -> Watchdog:  # the watched function: it finished step 3, then never another
        watchdog = Watchdog(tmp_path, rank=0, world=1, timeout_s=0.5, step=2, on_stall=on_stall)
        watchdog.beat(3)
        assert stalled.wait(GUARD_S), "the watchdog never fired"
        return watchdog

    watchdog = loop()
    watchdog.close()
    assert len(messages) == 1 and "rank 0 made no progress" in messages[0] and "after finishing step 3" in messages[0]
    assert "Every rank is alive (rank 0: step 3)" in messages[0]
    assert json.loads((tmp_path / "heartbeat/rank_0.json").read_text())["step"] == 3


def test_the_watchdog_disarms_when_its_function_ends_without_closing_it(tmp_path):
    messages = []

    def failing_train() -> None:
        Watchdog(tmp_path, rank=0, world=1, timeout_s=0.5, step=0, on_stall=messages.append)
        raise RuntimeError("an exception a caller catches, as pytest does")

    with pytest.raises(RuntimeError):
        failing_train()
    watchers = [t for t in threading.enumerate() if t.name == "kiln-watchdog-0"]
    for thread in watchers:
        thread.join(GUARD_S)
    assert not any(t.is_alive() for t in watchers) and messages == []
    assert Watchdog(tmp_path, 0, 1, timeout_s=0, step=0).thread is None  # watchdog_s=0: none


def _wait_for_a_peer_that_never_comes(rank: int, port: int, results, release) -> None:
    import torch

    from src.parallel.dist import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    init_distributed("gloo", timeout_s=3)
    if rank == 1:
        release.wait(GUARD_S)  # alive, but never joins the collective
        return
    try:
        torch.distributed.all_reduce(torch.ones(1))
        results["error"] = None
    except RuntimeError as err:
        results["error"] = str(err)
    release.set()


@pytest.mark.dist
def test_a_collective_whose_peer_never_comes_fails_after_the_process_group_timeout():
    from src.parallel.dist import _free_port

    manager = mp.Manager()
    results, release = manager.dict(), manager.Event()
    spawn_ranks(_wait_for_a_peer_that_never_comes, 2, (_free_port(), results, release))
    assert results["error"] and "timed out" in results["error"].lower(), results["error"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.dist
def test_a_stopped_rank_ends_the_job_naming_it(tmp_path):
    # two ZeRO-3 ranks through torchrun; rank 1 is frozen (SIGSTOP) once it has trained two steps
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "src.train"]
    cmd += ["+experiment=smoke", f"hydra.run.dir={run_dir}", "steps=500", "ckpt_every=0", "watchdog_s=15"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    heartbeat, pid = run_dir / "heartbeat/rank_1.json", None
    try:
        deadline = time.monotonic() + GUARD_S
        while pid is None and job.poll() is None and time.monotonic() < deadline:
            beats = read_heartbeats(heartbeat.parent, world=2)
            if beats.get(1, {}).get("step", 0) >= 2:
                pid, rank0 = beats[1]["pid"], beats[0]["pid"]
                os.kill(pid, signal.SIGSTOP)
            time.sleep(0.2)
        assert pid is not None, "rank 1 never trained two steps"
        while job.poll() is None and time.monotonic() < deadline and _alive(rank0):
            time.sleep(0.2)
        # rank 0 has ended the job; let the frozen rank take torchrun's SIGTERM now rather than after its 30-s wait
        os.kill(pid, signal.SIGCONT)
        output, _ = job.communicate(timeout=GUARD_S)
    finally:
        if job.poll() is None:
            job.kill()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # the worker this test froze, if torchrun left it
    assert job.returncode != 0
    assert "watchdog: rank 0 made no progress for" in output
    assert f"Not responding (stopped, hung in native code or dead): rank 1 (pid {pid} on " in output
    assert "last finished step" in output
    assert f"exitcode  : {HANG_EXIT}" in output  # torchrun's report of rank 0
