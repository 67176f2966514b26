"""The NaN and spike sentinel: a bad step never updates the weights, and a diverging run goes back to its last
good checkpoint instead of writing NaN checkpoints (docs/design.md, "What is checked, refused, rolled back").

Each step the loop tells the sentinel the step's loss (the mean over ranks) and the gradient norm (global; the
engine has already refused to apply a non-finite one). The sentinel answers:

- `ok`: a good step; its loss joins the running window;
- `skipped`: a non-finite loss or gradient norm; the engine applied nothing (no weight, moment or EMA update), the
  step is counted and its samples are recorded in `RUN_DIR/skipped/nonfinite.jsonl`;
- `rollback`: `skips_in_row` skipped steps in a row, or a loss above `spike_factor` times the median of the last
  `window` good losses (once `min_history` are known): the loop reloads the last checkpoint, quarantines the
  samples of the offending steps (`Quarantine`: never trained on again) and goes on. After `max_rollbacks`
  rollbacks the run stops with `Diverged`, naming the steps and samples.

Pure bookkeeping: no tensors, no collectives (the loop reduces the loss and gathers the keys).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

DIVERGED_EXIT = 6  # exit status of a run stopped by the sentinel


class Diverged(RuntimeError):
    """The run kept diverging after `max_rollbacks` rollbacks."""


@dataclass(frozen=True)
class Verdict:
    action: str  # ok | skipped | rollback
    reason: str = ""


@dataclass
class Sentinel:
    """Decides, step by step, whether to keep, skip or roll back (see the module docstring).

    spike_factor: a loss above this many times the running median is a spike (None: no spike check).
    window: how many recent good losses the median is taken over; min_history: no spike check before that many.
    skips_in_row: this many skipped steps in a row roll back. max_rollbacks: more rollbacks stop the run.
    """

    spike_factor: float | None = 10.0
    window: int = 50
    min_history: int = 20
    skips_in_row: int = 3
    max_rollbacks: int = 3
    skipped: int = 0  # steps skipped in total (non-finite loss or gradient norm)
    rollbacks: list[dict] = field(default_factory=list)  # {"at": step, "to": step, "reason": ..., "samples": [...]}
    _losses: deque = field(default_factory=deque, repr=False)
    _in_row: int = 0

    def __post_init__(self) -> None:
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise ValueError(f"sentinel.spike_factor must be > 1 (or null: no spike check), got {self.spike_factor}")
        for name in ("window", "min_history", "skips_in_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"sentinel.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rollbacks < 0:
            raise ValueError(f"sentinel.max_rollbacks must be >= 0, got {self.max_rollbacks}")
        self._losses = deque(self._losses, maxlen=self.window)

    def median(self) -> float | None:
        """The running median of recent good losses; None until `min_history` are known."""
        return statistics.median(self._losses) if len(self._losses) >= self.min_history else None

    def spike_level(self) -> float:
        """Per-sample losses above this are suspects of a spike (inf before the history is long enough)."""
        median = self.median()
        return math.inf if median is None or self.spike_factor is None else self.spike_factor * median

    def observe(self, loss: float | None, grad_norm: float) -> Verdict:
        """The verdict on one step, from its loss (mean over ranks; None when no sample of the step was valid) and
        its global gradient norm."""
        if loss is None:  # every sample failed or is quarantined: nothing was learnt, nothing to judge
            return Verdict("ok") if math.isfinite(grad_norm) else self._skip(f"non-finite gradient norm {grad_norm}")
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._skip(f"non-finite loss {loss} / gradient norm {grad_norm}")
        self._in_row = 0
        if loss > self.spike_level():
            return Verdict("rollback", f"loss spike {loss:.4g} > {self.spike_factor} x median {self.median():.4g}")
        self._losses.append(loss)
        return Verdict("ok")

    def _skip(self, reason: str) -> Verdict:
        self.skipped += 1
        self._in_row += 1
        if self._in_row >= self.skips_in_row:
            return Verdict("rollback", f"{self._in_row} skipped steps in a row ({reason})")
        return Verdict("skipped", reason)

    def rolled_back(self, at: int, to: int, reason: str, samples: Sequence[str]) -> None:
        """Record a rollback from step `at` to the checkpoint of step `to`; raise `Diverged` past the limit."""
        self.rollbacks.append({"at": at, "to": to, "reason": reason, "samples": sorted(samples)})
        self._in_row = 0
        if len(self.rollbacks) > self.max_rollbacks:
            lines = [f"step {r['at']} -> {r['to']}: {r['reason']}; samples {r['samples'][:8]}" for r in self.rollbacks]
            raise Diverged(
                f"the run diverged {len(self.rollbacks)} times (sentinel.max_rollbacks={self.max_rollbacks}): "
                + " | ".join(lines)
                + ". Lower the learning rate or inspect the listed samples, then rerun; the quarantined samples "
                "(RUN_DIR/skipped/quarantine.jsonl) stay out of this run unless that file is edited."
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks, "losses": list(self._losses)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.rollbacks = state["skipped"], list(state["rollbacks"])
        self._losses = deque(state["losses"], maxlen=self.window)
        self._in_row = 0


def standouts(keys: Sequence[str], per_sample: torch.Tensor, level: float) -> list[str]:
    """The samples of a bad step whose own loss is non-finite or above `level` (may be none)."""
    loss = per_sample.detach().float().cpu()
    bad = ~torch.isfinite(loss) | (loss > level)
    return [k for k, b in zip(keys, bad.tolist(), strict=True) if b]


def blame(steps: Sequence[tuple[Sequence[str], Sequence[str]]]) -> list[str]:
    """The samples to quarantine for a run of bad steps, from every rank's (standouts, all keys) of each step:
    the samples whose own loss stood out, or every sample of those steps when none did (a bad gradient of a
    normal-looking batch)."""
    marked = {k for out, _ in steps for k in out}
    return sorted(marked or {k for _, keys in steps for k in keys})


class Quarantine:
    """Samples never to train on again, in `RUN_DIR/skipped/quarantine.jsonl` (one JSON object per sample: key,
    step, reason). Read at start, so a resumed run keeps them out too; every rank holds the whole set."""

    def __init__(self, run_dir: Path, writer: bool):
        self.path = Path(run_dir) / "skipped" / "quarantine.jsonl"
        self.writer = writer
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        self.keys = {json.loads(line)["key"] for line in lines if line.strip()}

    def add(self, keys: Sequence[str], step: int, reason: str) -> None:
        new = sorted(set(keys) - self.keys)
        self.keys |= set(new)
        if self.writer and new:
            append_jsonl(self.path, [{"key": k, "step": step, "reason": reason} for k in new])

    def mask(self, keys: Sequence[str]) -> torch.Tensor:
        """(B,) bool: True where a sample is quarantined."""
        return torch.tensor([k in self.keys for k in keys], dtype=torch.bool)


def append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
