"""Shared fixtures: a tiny MMDiT matching conf/model/mmdit_tiny.yaml, the repository root, and the smoke runs that
several test modules compare against (launched once per session)."""

import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch

from src.config import model_config

ROOT = Path(__file__).resolve().parents[1]

# Every process a test starts inherits this pytest process's id, so that what outlives its test can be found:
# when subprocess.run(timeout=...) kills a hung torchrun, its ranks (each a session leader) keep running.
OWNER = "KILN_TEST_OWNER"
os.environ[OWNER] = str(os.getpid())


def left_running() -> dict[int, str]:
    """{pid: command} of the processes this pytest process started (its id in their environment) that are no
    longer its descendants: orphans, such as the ranks of a killed torchrun."""
    parents, marked = {}, {}
    mine = f"{OWNER}={os.getpid()}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if mine in (proc / "environ").read_bytes().split(b"\0"):
                marked[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue

    def descends_from_me(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {pid: cmd for pid, cmd in marked.items() if not descends_from_me(pid)}


@pytest.fixture(autouse=True)
def no_process_left_running():
    """Fail the test that leaves a process running (a hung rank would slow every later test), and end it."""
    yield
    left = left_running()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        pytest.fail("processes left running, now killed: " + "; ".join(f"{p}: {c[:200]}" for p, c in left.items()))


def scheduling() -> tuple[int, int]:
    """This thread's scheduling policy and real-time priority: (os.SCHED_OTHER, 0) unless something changed them."""
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


@contextlib.contextmanager
def keep_scheduling():
    """Put this thread's scheduling policy back after the block. SVT-AV1 (PyAV's libsvtav1 encoder) run as root
    moves the thread that encodes to SCHED_FIFO priority 99, and every process it starts later inherits that: a
    rank whose gloo thread busy-polls then holds a core at real-time priority, and on 2 cores the ranks it waits
    for, the test's timeouts and pytest-timeout's thread never run again (docs/design.md, "Real-time priority")."""
    saved = scheduling()
    try:
        yield
    finally:
        if scheduling() != saved:
            os.sched_setscheduler(0, saved[0], os.sched_param(saved[1]))


@pytest.fixture(autouse=True)
def scheduling_unchanged():
    """Fail the test that leaves this pytest process at another scheduling policy (see `keep_scheduling`), and put
    the policy back, so that no later test's processes inherit it."""
    before = scheduling()
    with keep_scheduling():
        yield
        after = scheduling()
    if after != before:
        pytest.fail(
            f"the test left this process at scheduling policy {after[0]}, priority {after[1]} (it was {before}; "
            f"SCHED_FIFO is {os.SCHED_FIFO}): every process started after would inherit it; now put back"
        )


def clean_env() -> dict[str, str]:
    """The environment for a child process, without what an in-process test's process group left behind (RANK,
    MASTER_PORT...: a child would wait for peers that never come); one OpenMP thread per process."""
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in dist_vars} | {"OMP_NUM_THREADS": "1"}


def tiny_model_kwargs(**overrides) -> dict:
    cfg = model_config("mmdit_tiny", vae="patch")
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_model():
    from src.models.mmdit import MMDiT

    torch.manual_seed(0)
    return MMDiT(**tiny_model_kwargs())


# -- the smoke runs that several modules compare against (tests/test_train.py, test_convert.py, test_fsdp2.py) ----
# Session-scoped: each is launched once per test session, however many modules read it (none writes into it).


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory):
    """4 steps of the smoke experiment on 2 ZeRO-3 ranks, batch 2 per rank, a checkpoint after every step."""
    from tests.test_train import EVERY_STEP, PARITY_EPS, train

    run_dir = tmp_path_factory.mktemp("zero3")
    return run_dir, train(run_dir, PARITY_EPS, EVERY_STEP)


@pytest.fixture(scope="session")
def single_run(tmp_path_factory):
    """The same 4 steps in one plain-PyTorch process on the same global batch (batch 4)."""
    from tests.test_train import EVERY_STEP, PARITY_EPS, train

    run_dir = tmp_path_factory.mktemp("single")
    return run_dir, train(run_dir, "parallel=local", "data.buckets.batch_scale=2", PARITY_EPS, EVERY_STEP, nproc=1)


@pytest.fixture(scope="session")
def smoke_n() -> dict[str, int]:
    """n of tests/numerics.py for one step of the smoke experiment on its global batch: 4 clips of 8 frames at
    32x32 (bucket 32px/8f/32x32), patch-VAE latents 48 x 8 x 8 x 8 (128 video tokens), 16 MiniLM text tokens of 384
    features, the tiny MMDiT. "loss": the forward pass plus the loss's mean over the 4 x 48 x 512 predicted values;
    "grad": the forward and backward passes (a weight's gradient sums over all 4 x 144 tokens of the global batch)."""
    from src.models.mmdit import MMDiT
    from tests.numerics import accumulation_length

    torch.manual_seed(0)
    model = MMDiT(**tiny_model_kwargs())
    x, txt, vec, t = torch.randn(4, 48, 8, 8, 8), torch.randn(4, 16, 384), torch.randn(4, 384), torch.rand(4)
    forward = accumulation_length(lambda: model(x, txt, vec, t))
    return {"loss": forward + x.numel(), "grad": accumulation_length(lambda: model(x, txt, vec, t), backward=True)}


@pytest.fixture(scope="session")
def zero3_two_steps(tmp_path_factory):
    """2 steps of the smoke experiment on 2 ZeRO-3 ranks with its own checkpoint cadence (ckpt_every=2): the run
    tests/test_export.py exports, and the first half of test_train.py's resume test (which continues a copy)."""
    from tests.test_train import PARITY_EPS, train

    run_dir = tmp_path_factory.mktemp("zero3_2steps")
    train(run_dir, "steps=2", PARITY_EPS)
    return run_dir
