"""No hangs: a rank whose training loop makes no progress for `watchdog_s` seconds ends the job, naming who is stuck.

Each rank writes a heartbeat, `RUN_DIR/heartbeat/rank_<r>.json`: the last step it finished (written by the loop,
`beat(step)`) and when it was last alive (written by the watchdog's own thread every few seconds, so a frozen or
dead process stops updating it while a rank blocked in a collective keeps it fresh). When this rank's loop has not
finished a step for `timeout_s`, the thread reads every heartbeat, logs which ranks stopped responding (and at
which step) or, if all are alive, that every rank waits in the same step, and exits the process with HANG_EXIT;
torchrun then ends the other ranks. Engine-independent: it watches the loop, not the collectives. A collective
that hangs outside the loop is bounded by the process-group timeout (`dist_timeout_s`, src/parallel/dist.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("kiln.train")
HANG_EXIT = 7  # exit status of a rank the watchdog ended
POLL_S = 2.0  # how often the watchdog looks, at most (and refreshes this rank's liveness)


def read_heartbeats(folder: Path, world: int) -> dict[int, dict]:
    """The last heartbeat of ranks 0 .. world - 1 in `folder` (files of a larger earlier world, unreadable or
    half-written ones are left out)."""
    beats = {}
    for path in folder.glob("rank_*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if int(beat["rank"]) < world:
            beats[int(beat["rank"])] = beat
    return beats


def stall_message(rank: int, step: int, idle_s: float, beats: dict[int, dict], now: float, stale_s: float) -> str:
    """Why this rank gives up: which ranks stopped responding (no liveness for `stale_s`), or that all wait."""
    head = f"watchdog: rank {rank} made no progress for {idle_s:.0f} s after finishing step {step}"
    silent = {r: b for r, b in sorted(beats.items()) if r != rank and now - b["alive"] > stale_s}
    if silent:
        who = "; ".join(
            f"rank {r} (pid {b['pid']} on {b['host']}) last finished step {b['step']} and has not responded for "
            f"{now - b['alive']:.0f} s"
            for r, b in silent.items()
        )
        return f"{head}. Not responding (stopped, hung in native code or dead): {who}. Ending the job."
    steps = ", ".join(f"rank {r}: step {b['step']}" for r, b in sorted(beats.items()))
    return (
        f"{head}. Every rank is alive ({steps}): they wait on each other in the next step (a collective that "
        "never completes, or a rank stuck in data loading). Ending the job."
    )


def _exit_hung(message: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(HANG_EXIT)


class Watchdog:
    """Watches the loop of the function that creates it; `beat(step)` after each step, `close()` at the end.

    It disarms itself when that function has returned or raised (an exception caught by a caller, as in tests,
    never leaves a watchdog behind). timeout_s <= 0: no watchdog. `on_stall` receives the message (default: log
    it and exit the process with HANG_EXIT)."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world: int,
        timeout_s: float,
        step: int,
        on_stall: Callable[[str], None] = _exit_hung,
    ):
        self.path = Path(run_dir) / "heartbeat" / f"rank_{rank}.json"
        self.rank, self.world, self.timeout_s, self.on_stall = rank, world, timeout_s, on_stall
        self.step, self.last = step, time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.owner = sys._getframe(1).f_code  # the function whose loop is watched
        self.owner_thread = threading.get_ident()
        self.thread: threading.Thread | None = None
        if timeout_s > 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()
            self.thread = threading.Thread(target=self._watch, name=f"kiln-watchdog-{rank}", daemon=True)
            self.thread.start()

    def beat(self, step: int) -> None:
        """This rank finished `step` (called once per loop iteration)."""
        self.step, self.last = step, time.monotonic()
        if self.thread is not None:
            self._write()

    def close(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def _write(self) -> None:
        beat = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "step": self.step}
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(beat | {"alive": time.time()}))
            os.replace(tmp, self.path)

    def _owner_running(self) -> bool:
        frame = sys._current_frames().get(self.owner_thread)
        while frame is not None and frame.f_code is not self.owner:
            frame = frame.f_back
        return frame is not None

    def _watch(self) -> None:
        poll = min(POLL_S, self.timeout_s / 4)
        while not self.done.wait(poll):
            if not self._owner_running():
                return  # the watched function has ended (returned, or raised into a caller)
            self._write()  # alive
            idle = time.monotonic() - self.last
            if idle >= self.timeout_s:
                beats = read_heartbeats(self.path.parent, self.world)
                message = stall_message(self.rank, self.step, idle, beats, time.time(), stale_s=max(4 * poll, 5.0))
                log.error("%s", message)
                self.on_stall(message)
                return
