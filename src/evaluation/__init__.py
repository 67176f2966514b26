"""Learning you can see: held-out validation, probes of what the model uses, sample health, the stage report.

validation.py   held-out loss at fixed noise and timesteps, per timestep bin; time and text probes (pure)
health.py       statistics of generated videos as ratios to the data's; bounds -> alarms (pure)
images.py       `eval.images`: fixed-prompt image-to-video entries, checked and encoded once at setup
evaluator.py    the object the training loop calls once per step: `evaluator(engine, step)`
sampling.py     a run's model loaded for sampling; prompts (and I2V frames) to videos: evaluation, judge, src.sample
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from src.data.source import batch_features
from src.evaluation.evaluator import Evaluator, LearningAlarm
from src.evaluation.validation import ValidationSet

__all__ = ["Evaluator", "LearningAlarm", "ValidationSet", "validation_set", "write_stage_report", "REPORT"]
REPORT = "stage_report.json"


def validation_set(batch: dict | None, text, vae, device: torch.device) -> ValidationSet | None:
    """Encode a data source's held-out batch (`video` + `caption`, or cached `latent`, `txt`, `vec`) once."""
    if batch is None:
        return None
    with torch.no_grad():
        x0, txt, vec = batch_features(batch, text, vae, device)  # (N, C, T', H', W'), (N, L, D), (N, Dv)
    return ValidationSet(x0.float(), txt.float(), vec.float(), list(batch["key"]), list(batch["caption"]))


def write_stage_report(run_dir: Path, is_main: bool, evaluator: Evaluator, step: int) -> dict | None:
    """RUN_DIR/stage_report.json: the last evaluation's validation loss, probe gaps, health ratios and alarms."""
    if not is_main:
        return None
    last = evaluator.last
    report = {
        "run_dir": str(run_dir),
        "step": step,
        "evaluated_step": last.get("step"),
        "val_loss": last.get("val_loss"),
        "val_loss_by_t": last.get("val_loss_by_t"),
        "probes": {k[len("probe_") :]: v for k, v in last.items() if k.startswith("probe_")},
        "health": last.get("health"),
        "alarms": last.get("alarms", []),
        "healthy": not last.get("alarms") and bool(last),
    }
    (run_dir / REPORT).write_text(json.dumps(report, indent=1))
    return report
