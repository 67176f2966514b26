"""Run metrics: `metrics.jsonl` in the run directory (always), wandb when `logger=wandb`. Rank 0 only.

The step window (throughput, MFU, data wait), the loss breakdown by timestep bin and bucket, and the readers of
metrics.jsonl; `python -m src.metrics RUN` (src/metrics.py) draws and summarises them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from src.flops import peak_memory_gb
from src.parallel.dist import all_mean


def flat_numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """A row's numbers as wandb panels: nested dicts and lists become `name/key` and `name/i`; text is left out
    (alarms are in train.log and metrics.jsonl)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_numbers(value, f"{name}/")
        elif isinstance(value, list | tuple):
            out |= flat_numbers({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


class MetricsLogger:
    """Append one JSON object per logged step to RUN_DIR/metrics.jsonl, and mirror to wandb if asked.

    wandb is imported only when enabled; its mode (online/offline/disabled) follows WANDB_MODE.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        wandb: bool = False,
        project: str = "kiln",
        name: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        if enabled and wandb:
            import wandb as wandb_lib

            self.run = wandb_lib.init(
                project=project,
                name=name or Path(run_dir).name,
                dir=str(run_dir),
                config=config,
                mode=os.environ.get("WANDB_MODE"),
                resume="allow",
            )

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log(flat_numbers({k: v for k, v in metrics.items() if k != "step"}), step=metrics["step"])

    def log_videos(self, step: int, paths: list[Path]) -> None:
        """Fixed-prompt evaluation videos: to wandb when it is on (they are in RUN_DIR/eval/ either way)."""
        if self.run is not None and paths:
            import wandb as wandb_lib

            self.run.log({f"eval/{p.stem}": wandb_lib.Video(str(p), format="mp4") for p in paths}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class StepWindow:
    """Accumulates the steps between two log lines; `row()` turns them into one metrics.jsonl row.

    The loss is summed on its own device (no host sync per step) and averaged over ranks only when logging.
    """

    def __init__(self, device: torch.device, world_size: int = 1, peak_flops: float | None = None):
        self.device = device
        self.world_size = world_size
        self.peak_flops = peak_flops  # per device; None: MFU is not reported (an unknown device, or not bf16)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.data_wait = 0.0
        self.steps = self.loss_steps = self.samples = self.tokens = self.flops = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor | None, data_wait: float, samples: int, tokens: int, flops: float) -> None:
        """One step: its loss on this rank (None for a step the sentinel skipped: its time counts, its loss does
        not), its wait for data, and its global samples, tokens (text + video) and model FLOPs (see src/flops.py)."""
        if loss is not None:
            self.loss_sum += loss.detach().float()
            self.loss_steps += 1
        self.data_wait += data_wait
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def row(self, step: int, lr: float, grad_norm, samples_seen: int) -> dict:
        # Reading the loss (and the gradient norm) to the host waits for every kernel queued before it: the window's
        # only synchronisation. The clock is read after it, so the window's time includes all of its device work.
        loss, grad_norm = all_mean(self.loss_sum / max(self.loss_steps, 1)).item(), float(grad_norm)
        elapsed = time.perf_counter() - self.start
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": self.samples / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "step_time_s": elapsed / self.steps,
            "data_wait_s": self.data_wait / self.steps,
            "data_wait_frac": self.data_wait / elapsed,
            "samples_seen": samples_seen,
            "tflops_per_device": self.flops / elapsed / self.world_size / 1e12,
            "peak_mem_gb": peak_memory_gb(self.device),
            # null where the device's peak is unknown (not in src/flops.py's table, no `peak_tflops` given)
            "mfu": self.flops / elapsed / self.world_size / self.peak_flops if self.peak_flops else None,
        }
        self.reset()
        return row


class LossBreakdown:
    """The training loss since the last log row by timestep bin (`bins` equal bins over t in [0, 1]) and by bucket.

    Sums stay on the device (no host sync per step); `fields()` reduces them over ranks when logging.
    """

    def __init__(self, device: torch.device, bins: int = 8):
        self.device, self.bins = device, bins
        self.reset()

    def reset(self) -> None:
        self.by_t = torch.zeros(2, self.bins, dtype=torch.float64, device=self.device)  # (sum, count) per bin
        self.by_bucket: dict[str, torch.Tensor] = {}

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, bucket: str) -> None:
        """per_sample: (B,) losses, t: (B,) times, valid: (B,) bool; one bucket per batch."""
        w = valid.to(torch.float64)
        loss = per_sample.detach().to(torch.float64) * w
        index = (t.detach() * self.bins).long().clamp(0, self.bins - 1)
        self.by_t[0].index_add_(0, index, loss)
        self.by_t[1].index_add_(0, index, w)
        sums = self.by_bucket.setdefault(bucket, torch.zeros(2, dtype=torch.float64, device=self.device))
        sums += torch.stack([loss.sum(), w.sum()])

    def fields(self) -> dict:
        """`loss_by_t` (a list, null for an empty bin) and `loss_by_bucket` (name -> mean) over all ranks."""
        by_t = all_mean(self.by_t).tolist()
        buckets = sorted(self.by_bucket)
        sums = all_mean(torch.stack([self.by_bucket[b] for b in buckets])).tolist() if buckets else []
        self.reset()
        return {
            "loss_by_t": [s / c if c else None for s, c in zip(*by_t, strict=True)],
            "loss_by_bucket": {b: s / c for b, (s, c) in zip(buckets, sums, strict=True) if c},
        }


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict]:
    """The logged rows of a run, in order: `train` rows (those with a training loss), `eval` rows (validation,
    probes, fixed prompts and health: src/evaluation/) or `all`."""
    if kind not in ("train", "eval", "all"):
        raise ValueError(f"kind must be train, eval or all, got {kind!r}")
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if kind == "all" else [r for r in rows if ("loss" in r) == (kind == "train")]


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop rows logged after `step`: a resumed run re-logs the steps after its checkpoint exactly once."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        rows = [r for r in read_metrics(run_dir, "all") if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
