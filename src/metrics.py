"""Run metrics: `metrics.jsonl` in the run directory (always), wandb when `logger=wandb`. Rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All logged rows of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop rows logged after `step`: a resumed run re-logs the steps after its checkpoint exactly once."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        rows = [r for r in read_metrics(run_dir) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
