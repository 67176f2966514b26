"""The suite's own guard (tests/conftest.py): a process that outlives the test that started it, such as a rank of a
torchrun killed by a timeout, is found, named and killed, and fails that test instead of slowing every later one."""

import os
import signal
import subprocess

from tests.conftest import clean_env, left_running


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
