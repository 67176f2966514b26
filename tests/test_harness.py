"""The suite's own guards: a process that outlives the test that started it, such as a rank of a torchrun killed by
a timeout, is found, named and killed, and fails that test instead of slowing every later one (tests/conftest.py);
a spawned rank that hangs is killed at its deadline, its stacks dumped, and the test fails naming it
(tests/ranks.py); no test leaves the pytest process at real-time priority for the processes it starts later."""

import contextlib
import os
import signal
import subprocess
import time

import pytest

import tests.media
from tests.conftest import clean_env, keep_scheduling, left_running, scheduling
from tests.media import can_encode, make_video
from tests.ranks import spawn_ranks


def test_an_orphaned_process_is_found_and_a_running_child_is_not():
    # sh starts sleep in the background and exits: the sleep is orphaned, as the ranks of a killed torchrun are
    shell = subprocess.run(["sh", "-c", "sleep 61 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                           env=clean_env(), check=True)  # fmt: skip
    orphan = int(shell.stdout)
    child = subprocess.Popen(["sleep", "62"], env=clean_env())
    try:
        left = left_running()
        assert "sleep 61" in left[orphan]
        assert child.pid not in left  # still this process's child: its test is responsible for it
        assert os.getpid() not in left
    finally:
        os.kill(orphan, signal.SIGKILL)
        child.kill()
        child.wait()


def _hang_on_rank_one(rank: int, marker: str) -> None:
    print(marker, rank, flush=True)
    if rank == 1:
        time.sleep(600)  # a rank that never returns, as one spinning in gloo does


def test_a_hung_rank_is_killed_at_its_deadline_and_named(capfd):
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"_hang_on_rank_one: ranks \[1\] of 2 still running after 5 s"):
        spawn_ranks(_hang_on_rank_one, 2, ("started",), timeout_s=5)
    assert time.monotonic() - start < 60
    err = capfd.readouterr()
    assert "started 0" in err.out and "started 1" in err.out
    assert "in _hang_on_rank_one" in err.err  # the hung rank's Python stack, dumped before it was killed


def test_encoding_av1_leaves_the_scheduling_policy_as_it_was(tmp_path, monkeypatch):
    """SVT-AV1 run as root moves the encoding thread to SCHED_FIFO 99; every process started after would inherit it
    (docs/design.md, "Real-time priority"). `make_video` puts the policy back."""
    if not can_encode("av1") or os.geteuid() != 0:
        pytest.skip("needs PyAV's libsvtav1 and root (only root may raise a thread to real-time priority)")
    before = scheduling()
    with keep_scheduling():  # the encoder alone, to show what make_video guards against
        with monkeypatch.context() as patch:
            patch.setattr(tests.media, "keep_scheduling", contextlib.nullcontext)
            make_video(tmp_path / "raw.webm", "av1", frames=4, width=48, height=32)
        raised = scheduling()
    if raised == before:
        pytest.skip(f"this SVT-AV1 build leaves the scheduling policy alone ({raised})")
    assert raised == (os.SCHED_FIFO, 99), raised
    assert scheduling() == before
    make_video(tmp_path / "kept.webm", "av1", frames=4, width=48, height=32)
    assert scheduling() == before
