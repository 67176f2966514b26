"""Stop cleanly before a time limit or a preemption: checkpoint at the end of the step, exit, resume later.

A stop is requested by SIGUSR1 or SIGTERM to any rank, or by the file `RUN_DIR/STOP` (what `slurm/*.sh` touch
when SLURM signals the batch script; torchrun does not forward SIGUSR1 to its workers, a shared file reaches every
rank). The ranks agree on it after every step with one tiny all-reduce, so they all save the same step. The flag
is a CPU tensor, so that all-reduce runs over the default group's gloo backend even when training runs on NCCL
(`src.parallel.dist`): reading a GPU flag would make the host wait for the step's kernels every step.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("kiln.train")
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def clear_stale_stop(run_dir: Path) -> None:
    """Remove a STOP file left by a run that died before honouring it (call on rank 0 before ranks sync)."""
    stale = Path(run_dir) / "STOP"
    if stale.exists():
        log.warning("removing a stale %s left by an earlier run", stale)
        stale.unlink(missing_ok=True)


class StopRequest:
    """`requested()` says, identically on every rank, whether to checkpoint and exit now."""

    def __init__(self, run_dir: Path):
        self.file = Path(run_dir) / "STOP"
        self.signalled: int | None = None
        self.agreed = (0, 0, False)  # what the ranks agreed on at the last check: (signal, signalled rank, file)
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        self.signalled = signum

    def requested(self) -> bool:
        rank = dist.get_rank() if dist.is_initialized() else 0
        signum = self.signalled or 0
        # on the host: the highest signal number, the highest rank that received one, whether the file exists
        flag = torch.tensor([float(signum), float(rank if signum else -1), float(self.file.exists())])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # gloo: a CPU tensor
        self.agreed = (int(flag[0]), int(flag[1]), bool(flag[2]))
        return bool(self.agreed[0] or self.agreed[2])

    def reason(self) -> str:
        """Why the ranks stopped, the same on every rank: the signal and the rank that received it, or the file."""
        signum, rank, file = self.agreed
        if signum:
            return f"{signal.Signals(signum).name} to rank {rank}"
        return f"{self.file} exists" if file else "not requested"

    def close(self, is_main: bool) -> None:
        """Restore the previous signal handlers; rank 0 removes the STOP file so that the next start runs on."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if is_main:
            self.file.unlink(missing_ok=True)
