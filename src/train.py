"""Training entry point: `torchrun --nproc_per_node=N -m src.train +experiment=NAME hydra.run.dir=DIR`.

`train(cfg, run_dir)` holds the whole loop and is what tests call; `main()` is the Hydra wrapper.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src.data.cached import READ_FAILURES
from src.data.shards import DECODE_FAILURES
from src.data.source import batch_features, training_condition
from src.evaluation import LearningAlarm, write_stage_report
from src.flops import step_flops
from src.integrity import POLICIES, save_checkpoint
from src.parallel.dist import all_gather_objects, all_mean, all_sum_counts, barrier, leave
from src.parallel.sp_guard import check_sequence_batches
from src.parallel.state import ema_decay
from src.run.metrics import truncate_after
from src.run.param_groups import enter_phase
from src.run.sentinel import DIVERGED_EXIT, Diverged, Quarantine, Sentinel, Verdict, append_jsonl, blame, standouts
from src.run.setup import Position, Run, setup
from src.run.watchdog import Watchdog
from src.rundir import latest_tag, rng_state, set_rng_state, step_tag

log = logging.getLogger("kiln.train")
ALARM_EXIT = 3  # exit status of a run stopped by a learning alarm
FAILURES = tuple(dict.fromkeys(DECODE_FAILURES + READ_FAILURES))  # per-rank counters, summed over ranks when logged
# DeepSpeed calls the collectives torch renamed; the warning would repeat on every step.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def loop_state(pos: Position, batch: dict, sentinel: Sentinel) -> dict:
    """What a checkpoint of `pos.step` records beside the weights: position, RNG, data plan, skip counters, and
    the sentinel's history (its skipped steps, rollbacks and running losses)."""
    return {
        "step": pos.step,
        "samples_seen": pos.samples_seen,
        "rng": rng_state(),
        "data": batch["state"],
        "skipped": dict(pos.skipped),
        "failed": dict(pos.failed),
        "sentinel": sentinel.state_dict(),
    }


def zero_where_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, ...) with the samples where `valid` (B,) is False set to zero: a failed or quarantined sample adds
    nothing to the step, not even a NaN through a zero-weighted loss."""
    return torch.where(valid.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))


def roll_back(
    engine, ckpt_dir: Path, sentinel: Sentinel, quarantine: Quarantine, step: int, reason: str, samples: list[str]
) -> dict:
    """Quarantine `samples` and reload the last checkpoint (weights, moments, EMA, schedule); its loop state.

    Raises `Diverged` without a checkpoint to go back to, or past `sentinel.max_rollbacks`."""
    quarantine.add(samples, step, reason)
    if latest_tag(ckpt_dir) is None:
        raise Diverged(
            f"step {step}: {reason}; there is no checkpoint to roll back to yet (lower ckpt_every, or the learning "
            f"rate). Samples {samples[:8]} are quarantined in {quarantine.path}."
        )
    state = engine.load(ckpt_dir)
    sentinel.rolled_back(step, state["step"], reason, samples)
    log.warning(
        "step %d: %s: rolled back to step %d (rollback %d of at most %d); quarantined %d samples: %s",
        step,
        reason,
        state["step"],
        len(sentinel.rollbacks),
        sentinel.max_rollbacks,
        len(samples),
        samples[:8],
    )
    return state


def progress_fields(row: dict) -> dict[str, str]:
    """The progress bar's view of a metrics row: loss, LR, throughput, MFU (where known), data wait, memory."""
    return {
        "loss": f"{row['loss']:.4f}",
        "lr": f"{row['lr']:.2e}",
        "tok/s": f"{row['tokens_per_s']:.0f}",
        "mfu": "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}",
        "step": f"{row['step_time_s']:.3g}s",
        "wait": f"{row['data_wait_frac']:.0%}",
        "mem": f"{row['peak_mem_gb']:.1f}G",
    }


def check_knobs(cfg: DictConfig) -> None:
    """Refuse top-level settings the loop cannot honour, naming the value."""
    for key in ("log_every", "sp_guard_every"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg.ckpt_every < 0:
        raise ValueError(f"ckpt_every must be >= 1, or 0 for no checkpoint (benchmarks), got {cfg.ckpt_every}")
    if cfg.ckpt_every == 0:
        log.warning("ckpt_every=0: no checkpoint is written (only on a stop request); this run cannot be resumed")
    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    if cfg.ema is not None:
        ema_decay(1, cfg.ema.decay, cfg.ema.warmup)  # raises on a decay outside [0, 1)
    if cfg.transition_optimizer not in ("reset", "carry"):
        raise ValueError(f"transition_optimizer must be reset or carry, got {cfg.transition_optimizer!r}")
    if cfg.resume not in POLICIES:
        raise ValueError(f"resume must be one of {POLICIES}, got {cfg.resume!r}")
    if cfg.ckpt_keep is not None and cfg.ckpt_keep < 1:
        raise ValueError(f"ckpt_keep must be >= 1 (the newest N checkpoints), or null to keep all, got {cfg.ckpt_keep}")


@dataclass
class StepOutcome:
    """One optimizer step as the loop sees it."""

    loss: torch.Tensor  # this rank's mean loss over its valid samples
    per_sample: torch.Tensor  # (B,) each sample's loss
    t: torch.Tensor  # (B,) each sample's timestep
    valid: torch.Tensor  # (B,) False where a clip failed to decode or is quarantined
    grad_norm: torch.Tensor | float  # non-finite: the engine applied nothing
    verdict: Verdict  # the sentinel's, the same on every rank
    video_tokens: int  # per sample
    text_tokens: int


def train_step(run: Run, batch: dict, step: int, guard_sp: bool) -> StepOutcome:
    """Forward, backward and optimizer step of `batch` (one bucket), and the sentinel's verdict on it."""
    engine, cfg = run.engine, run.cfg
    valid = (batch["valid"] & ~run.quarantine.mask(batch["key"])).to(run.dist.device, non_blocking=True)  # (B,)
    x0, txt, vec = batch_features(batch, run.text, run.vae, run.dist.device)  # (B, C, T', H', W'), (B, L, D), (B, Dv)
    x0 = run.faults.corrupt(x0, batch["key"])
    x0, txt, vec = (zero_where_invalid(x, valid) for x in (x0, txt, vec))
    run.faults.arm(step + 1)
    cond = training_condition(run.flow, batch, x0, run.vae, cfg.seed)  # (B, 1 + C, T', H', W') for I2V, or None
    losses = run.flow.training_losses(
        engine, x0, txt, vec, batch["index"], cfg.seed, run.null_txt[0], run.null_vec[0], cond
    )
    if guard_sp:
        check_sequence_batches(batch, losses["t"], cfg.seed, run.dist, step)  # no-op without sequence parallelism
    loss = torch.where(valid, losses["loss"], 0.0).sum() / valid.sum().clamp(min=1)
    engine.backward(loss)
    grad_norm = engine.step()
    # the same verdict on every rank: from the loss over all ranks' valid samples and the global gradient norm
    loss_sum, n_valid = all_mean(torch.stack([loss * valid.sum(), valid.sum().float()])).tolist()
    verdict = run.sentinel.observe(loss_sum / n_valid if n_valid else None, float(grad_norm))
    video_tokens = math.prod(run.model.token_grid(x0.shape))
    return StepOutcome(loss, losses["loss"], losses["t"], valid, grad_norm, verdict, video_tokens, txt.shape[1])


def blame_step(run: Run, batch: dict, out: StepOutcome, step: int) -> tuple[list[str], list[str]]:
    """A bad step's samples: those whose own loss stands out (or all of them), recorded in RUN_DIR/skipped."""
    standout = standouts(batch["key"], torch.where(out.valid, out.per_sample, 0.0), run.sentinel.spike_level())
    bad = standout or list(batch["key"])
    append_jsonl(
        run.run_dir / "skipped" / f"nonfinite_rank{run.dist.rank}.jsonl",
        [{"key": k, "step": step, "action": out.verdict.action, "reason": out.verdict.reason} for k in bad],
    )
    log.warning("step %d %s: %s (samples %s)", step, out.verdict.action, out.verdict.reason, bad[:8])
    return standout, list(batch["key"])


def rewind(run: Run, step: int, reason: str, blamed: list) -> Position:
    """Back to the last checkpoint without the samples of the bad steps (every rank's); the position there."""
    everyone = [s for part in all_gather_objects(blamed) for s in part]
    state = roll_back(run.engine, run.ckpt_dir, run.sentinel, run.quarantine, step, reason, blame(everyone))
    set_rng_state(state["rng"])
    run.loader = run.open_loader(state=state["data"])
    run.window.reset()
    run.breakdown.reset()
    run.progress.n = state["step"]
    if run.dist.is_main:
        truncate_after(run.run_dir, state["step"])
    return Position.from_state(state, scan_skips=Counter())  # a checkpoint is never of step 0


def account(run: Run, pos: Position, batch: dict, out: StepOutcome, data_wait: float) -> None:
    """Count a finished step: samples, skips, failures, throughput, the loss breakdown, the progress bar."""
    global_samples = len(batch["index"]) * run.dist.dp_world
    pos.samples_seen += global_samples
    pos.skipped.update(batch["plan_skipped"])
    if run.dist.sp_rank == 0:  # the group's ranks decode the same clips: count their failures once
        pos.failed.update(batch["failed"])
    flops = step_flops(run.model, out.video_tokens, out.text_tokens, global_samples)
    good = out.verdict.action == "ok"  # a skipped step's time counts, its loss does not
    tokens = global_samples * (out.video_tokens + out.text_tokens)
    run.window.add(out.loss if good else None, data_wait, global_samples, tokens, flops)
    if good:
        run.breakdown.add(out.per_sample, out.t, out.valid, batch["bucket"])
    run.progress.update(1)


def log_row(run: Run, pos: Position, batch: dict, out: StepOutcome) -> None:
    """One training row of metrics.jsonl (and wandb): the window's means, the breakdown, the skip counters."""
    row = run.window.row(pos.step, run.engine.lr(), out.grad_norm, pos.samples_seen)
    row["bucket"] = batch["bucket"]
    row |= run.breakdown.fields()  # loss_by_t, loss_by_bucket
    row["skipped"] = {**pos.skipped, **all_sum_counts({r: pos.failed[r] for r in FAILURES})}
    row["skipped_steps"], row["rollbacks"] = run.sentinel.skipped, len(run.sentinel.rollbacks)
    run.logger.log(row)
    run.progress.set_postfix(progress_fields(row), refresh=False)


def checkpoint(run: Run, pos: Position, batch: dict) -> None:
    """Write, seal and point `latest` at this step's checkpoint (weights, moments, EMA and the loop state)."""
    state = loop_state(pos, batch, run.sentinel) | run.global_batches.state()
    save_checkpoint(run.engine, run.ckpt_dir, step_tag(pos.step), state, run.cfg.ckpt_keep)


def evaluate(run: Run, pos: Position, batch: dict, checkpointed: bool) -> None:
    """The evaluation due at this step (validation loss, probes, fixed prompts, health), logged; an alarm with
    `eval.alarms=stop` checkpoints the step, writes the stage report and raises `LearningAlarm`."""
    evaluation = run.evaluator(run.engine, pos.step)
    if evaluation is None:
        return
    run.logger.log(evaluation)
    run.logger.log_videos(pos.step, [Path(p) for p in evaluation.get("eval_videos", [])])
    if run.evaluator.stop_requested(evaluation):
        if not checkpointed:
            checkpoint(run, pos, batch)
        write_stage_report(run.run_dir, run.dist.is_main, run.evaluator, pos.step)
        raise LearningAlarm(f"step {pos.step}: " + "; ".join(evaluation["alarms"] or ["an alarm on another rank"]))


def train(cfg: DictConfig, run_dir: str | Path) -> None:
    """Train `cfg.steps` optimizer steps, resuming from RUN_DIR/checkpoints when it holds a checkpoint."""
    check_knobs(cfg)
    run = setup(cfg, Path(run_dir))  # process group, model, engine, resume, data, encoders, evaluator, guards
    pos, engine = run.position, run.engine
    # a rank that finishes no step for watchdog_s ends the job; it watches this function (disarmed when it ends)
    watchdog = Watchdog(run.run_dir, run.dist.rank, run.dist.world_size, cfg.watchdog_s, pos.step)
    batches, blamed, phase, first_step = iter(run.loader), [], None, pos.step  # blamed: bad steps' samples
    while pos.step < cfg.steps:
        watchdog.beat(pos.step)
        run.profiler.at(pos.step)
        if run.plan.phase(pos.step) != phase:  # freeze schedule: at start, and where a phase begins
            phase = enter_phase(run.plan, engine, pos.step, run.default_weight_decay, run.main_dir)
        t0 = time.perf_counter()
        batch = next(batches)  # one bucket: every clip of the batch has the same shape
        run.global_batches.check(batch["bucket"], len(batch["index"]) * run.dist.dp_world, pos.step + 1)
        data_wait = time.perf_counter() - t0
        out = train_step(run, batch, pos.step, guard_sp=pos.step == first_step or pos.step % cfg.sp_guard_every == 0)
        pos.step += 1
        if out.verdict.action != "ok":
            blamed.append(blame_step(run, batch, out, pos.step))
        stopping = run.stop.requested()  # SIGUSR1/SIGTERM or RUN_DIR/STOP: checkpoint now, exit, resume later
        due = cfg.ckpt_every and (pos.step % cfg.ckpt_every == 0 or pos.step == cfg.steps)
        # a checkpoint is written after a good step (a rollback's target), at the end and when asked to stop
        checkpointing = stopping or (due and (out.verdict.action == "ok" or pos.step == cfg.steps))
        if checkpointing and out.verdict.action != "rollback":  # never write non-finite weights
            nonfinite = all_sum_counts({"weights": engine.count_nonfinite()})["weights"]
            if nonfinite:
                out.verdict = Verdict(
                    "rollback", f"{nonfinite} non-finite weights at step {pos.step}, not checkpointed"
                )
        if out.verdict.action == "rollback":
            pos = rewind(run, pos.step, out.verdict.reason, blamed)
            batches, blamed, phase = iter(run.loader), [], None
            continue
        if out.verdict.action == "ok":
            blamed = []
            if cfg.ema is not None:
                engine.update_ema(ema_decay(pos.step, cfg.ema.decay, cfg.ema.warmup))
        account(run, pos, batch, out, data_wait)
        if pos.step % cfg.log_every == 0 or pos.step == cfg.steps:
            log_row(run, pos, batch, out)
        if checkpointing:
            checkpoint(run, pos, batch)
        evaluate(run, pos, batch, checkpointed=checkpointing)
        if stopping and pos.step < cfg.steps:
            log.info("stop requested (%s): checkpointed step %d of %d; the same command resumes",
                     run.stop.reason(), pos.step, cfg.steps)  # fmt: skip
            break
    run.profiler.at(pos.step, final=True)
    write_stage_report(run.run_dir, run.dist.is_main, run.evaluator, pos.step)
    watchdog.close()
    run.close()
    barrier()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except LearningAlarm as alarm:  # eval.alarms=stop: the step is checkpointed; say why and exit non-zero
        log.error("stopped by a learning alarm (eval.alarms=stop): %s", alarm)
        sys.exit(ALARM_EXIT)
    except Diverged as err:  # the sentinel ran out of rollbacks: the last good checkpoint stays `latest`
        log.error("stopped by the NaN/spike sentinel: %s", err)
        sys.exit(DIVERGED_EXIT)


def main() -> None:
    # Every rank runs Hydra, but only rank 0 may write the .hydra/ folder and the log file.
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    _hydra_main()


if __name__ == "__main__":
    main()
    leave()  # once every rank has finished; no interpreter finalization (src.parallel.dist.leave)
