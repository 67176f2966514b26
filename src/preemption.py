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
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        self.signalled = signum

    def requested(self) -> bool:
        flag = torch.tensor([float(self.signalled is not None or self.file.exists())])  # on the host
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # gloo: a CPU tensor
        return bool(flag.item())

    def reason(self) -> str:
        return signal.Signals(self.signalled).name if self.signalled is not None else f"{self.file} exists"

    def close(self, is_main: bool) -> None:
        """Restore the previous signal handlers; rank 0 removes the STOP file so that the next start runs on."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if is_main:
            self.file.unlink(missing_ok=True)
