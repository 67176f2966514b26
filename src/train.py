"""Training entry point: `torchrun --nproc_per_node=N -m src.train +experiment=NAME hydra.run.dir=DIR`.

`train(cfg, run_dir)` holds the whole loop and is what tests call; `main()` is the Hydra wrapper.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src.checkpoint import checkpoint_dir, rng_state, set_rng_state, step_tag
from src.curriculum import apply_transition, carry_moments
from src.data.cached import READ_FAILURES
from src.data.shards import DECODE_FAILURES
from src.data.source import batch_features, training_condition
from src.diffusion.condition import check_condition_input
from src.evaluation import Evaluator, LearningAlarm, validation_set, write_stage_report
from src.faults import Faults
from src.flops import peak_flops, step_flops
from src.integrity import POLICIES, resume_tag, save_checkpoint
from src.metrics import LossBreakdown, StepWindow, truncate_after
from src.parallel.construction import construction_for
from src.parallel.dist import agree, all_gather_objects, all_mean, all_sum_counts, barrier, init_distributed
from src.parallel.engine import ema_decay, latest_tag
from src.parallel.sp_guard import check_sequence_batches
from src.param_groups import ParamPlan, enter_phase
from src.preemption import StopRequest, clear_stale_stop
from src.profiler import StepProfiler
from src.resume import GlobalBatches, check_writable
from src.sentinel import DIVERGED_EXIT, Diverged, Quarantine, Sentinel, Verdict, append_jsonl, blame, standouts
from src.watchdog import Watchdog

log = logging.getLogger("kiln.train")
ALARM_EXIT = 3  # exit status of a run stopped by a learning alarm
FAILURES = tuple(dict.fromkeys(DECODE_FAILURES + READ_FAILURES))  # per-rank counters, summed over ranks when logged
# DeepSpeed calls the collectives torch renamed; the warning would repeat on every step.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def check_compatible(model: torch.nn.Module, latent_channels: int, txt_dim: int, vec_dim: int) -> None:
    """Refuse a model whose input layers do not fit the features (from the encoders or from the cache)."""
    problems = []
    if model.in_channels != latent_channels:
        problems.append(f"model.in_channels={model.in_channels} but the VAE gives {latent_channels} channels")
    if model.txt_in.in_features != txt_dim:
        problems.append(f"model.txt_dim={model.txt_in.in_features} but the text features have {txt_dim}")
    if model.vector_in.in_layer.in_features != vec_dim:
        problems.append(f"model.vec_dim={model.vector_in.in_layer.in_features} but the pooled text has {vec_dim}")
    if problems:
        raise ValueError("model does not match its features: " + "; ".join(problems))


def check_patches(latent_shapes: dict[str, tuple[int, ...]], model: torch.nn.Module) -> None:
    """Every bucket's latent must split into whole patches."""
    for name, shape in latent_shapes.items():
        try:
            model.token_grid(shape)
        except ValueError as err:
            raise ValueError(f"bucket {name} does not fit the model: {err}") from err


def loop_state(
    step: int, samples_seen: int, batch: dict, skipped: Counter, failed: Counter, sentinel: Sentinel
) -> dict:
    """What a checkpoint of `step` records beside the weights: position, RNG, data plan, skip counters, and the
    sentinel's history (its skipped steps, rollbacks and running losses)."""
    return {
        "step": step,
        "samples_seen": samples_seen,
        "rng": rng_state(),
        "data": batch["state"],
        "skipped": dict(skipped),
        "failed": dict(failed),
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


def train(cfg: DictConfig, run_dir: str | Path) -> None:
    """Train `cfg.steps` optimizer steps, resuming from RUN_DIR/checkpoints when it holds a checkpoint."""
    check_knobs(cfg)
    dist = init_distributed(cfg.dist_backend, sp_size=cfg.parallel.get("sp_size", 1), timeout_s=cfg.dist_timeout_s)
    run_dir = Path(run_dir).resolve()
    if dist.is_main:
        clear_stale_stop(run_dir)
    agree(str(run_dir), "run directory")
    check_writable([run_dir, checkpoint_dir(run_dir)])  # now, not at the first checkpoint
    device = dist.device
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    build_engine = instantiate(cfg.parallel)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, whatever the encoders
    # the engine's way to build the model: whole, on meta on ranks > 0 (FSDP2), partitioned as built (ZeRO-3)
    construction = construction_for(build_engine)
    with construction.build():
        model = instantiate(cfg.model)
    ckpt_dir = checkpoint_dir(run_dir)
    new_stage = bool(cfg.get("init_from")) and latest_tag(ckpt_dir) is None
    if new_stage:  # declared transition from the previous stage's final checkpoint
        rules = OmegaConf.to_container(cfg.transition, resolve=True)
        transition = apply_transition(
            model, cfg.init_from, rules, run_dir / "transition.json" if dist.is_main else None, construction
        )
    shapes = construction.shapes(model)  # full shapes, however the model is held
    n_params = sum(shapes[name].numel() for name, _ in model.named_parameters())
    plan = ParamPlan(
        [name for name, _ in model.named_parameters()],
        OmegaConf.to_container(cfg.optim.groups, resolve=True),
        OmegaConf.to_container(cfg.optim.schedule, resolve=True),
    )
    flow = instantiate(cfg.diffusion)
    engine = build_engine(
        model=model,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=functools.partial(instantiate(cfg.optim.scheduler), group_factors=plan.lr_factor),
        device=device,
        param_groups=plan.optimizer_groups(model),
    )
    default_weight_decay = engine.param_groups[0]["weight_decay"]  # the optimizer's own, before any resume
    if new_stage and cfg.transition_optimizer == "carry":
        carry_moments(engine, plan, cfg.init_from, transition)
    if cfg.ema is not None:
        engine.init_ema()  # from the starting weights; a resumed run loads its own below

    resume_tag(ckpt_dir, cfg.resume)  # `latest` checked against its manifest (or the newest intact one), or refused
    state = engine.load(ckpt_dir) or {"step": 0, "samples_seen": 0, "data": None, "skipped": {}, "failed": {}}
    step, samples_seen = state["step"], state["samples_seen"]
    global_batches = GlobalBatches(state.get("global_batches"), cfg.resume_batch_change)  # refused if changed
    if step:
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (%d samples seen)", ckpt_dir, step, samples_seen)

    # every rank of a sequence-parallel group reads the same batch; one of them records the skipped samples
    open_loader = functools.partial(
        instantiate(cfg.data),
        dp_rank=dist.dp_rank,
        dp_world=dist.dp_world,
        seed=cfg.seed,
        skip_dir=run_dir / "skipped" if dist.sp_rank == 0 else None,
        holdout=cfg.eval.val,
        val_urls=cfg.eval.val_urls,
    )
    loader = open_loader(state=state["data"])
    data = loader.dataset
    text = vae = None
    if not data.encoded or cfg.eval.prompts or cfg.eval.images:  # from features: built only for fixed prompts
        text, vae = instantiate(cfg.text).to(device), instantiate(cfg.vae).to(device)
    spec = data.feature_spec(text, vae)  # the empty prompt's features, latent shapes per bucket, text widths
    null_txt, null_vec, latent_shapes = spec.null_txt.to(device), spec.null_vec.to(device), spec.latent_shapes
    check_compatible(model, next(iter(latent_shapes.values()))[0], spec.txt_dim, spec.vec_dim)
    check_patches(latent_shapes, model)
    check_condition_input(model, flow.cond, next(iter(latent_shapes.values()))[0])  # I2V: 1 + C
    evaluator = Evaluator(
        cfg.eval,
        validation_set(data.validation(), text, vae, device),
        (null_txt, null_vec),
        text,
        vae,
        next(iter(latent_shapes.values())),  # fixed prompts: the first configured bucket's latent
        run_dir,
        dist.is_main,
        cfg.steps,
        flow.sigma_min,
        model=model,  # eval.images need its cond_in
    )
    skipped = Counter(state["skipped"]) if step else Counter(s.reason for s in data.scan_skips)
    failed = Counter(state["failed"])  # this rank's decode failures
    sentinel = Sentinel(**cfg.sentinel)  # non-finite steps are skipped, divergence is rolled back (src/sentinel.py)
    if "sentinel" in state:
        sentinel.load_state_dict(state["sentinel"])
    quarantine = Quarantine(run_dir, dist.is_main)  # samples of rolled-back steps: never trained on again
    faults = Faults(**cfg.faults)  # deliberate failures for drills (src/faults.py); none by default
    faults.install(model)
    blamed: list[tuple[list, list]] = []  # this rank's (standout, all) samples of each bad step since a good one
    logger = instantiate(cfg.logger)(
        run_dir=run_dir, enabled=dist.is_main, config=OmegaConf.to_container(cfg, resolve=True)
    )
    if dist.is_main:
        truncate_after(run_dir, step)
        log.info(
            "model: %.2fM parameters on %d ranks (%d data-parallel x %d sequence-parallel)",
            n_params / 1e6,
            dist.world_size,
            dist.dp_world,
            dist.sp_size,
        )

    stop = StopRequest(run_dir)
    watchdog = Watchdog(run_dir, dist.rank, dist.world_size, cfg.watchdog_s, step)  # a stuck rank ends the job
    progress = tqdm(total=cfg.steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    window = StepWindow(
        device, dist.world_size, peak_flops(device, cfg.parallel.get("precision", "fp32"), cfg.peak_tflops)
    )
    breakdown = LossBreakdown(device, cfg.eval.val_bins)  # training loss by timestep bin and bucket, per row
    profiler = StepProfiler(run_dir, dist.rank, device, **cfg.profile)  # where the time goes, if asked
    batches = iter(loader)
    phase, first_step = None, step
    while step < cfg.steps:
        watchdog.beat(step)
        profiler.at(step)
        if plan.phase(step) != phase:  # freeze schedule: at start, and where a phase begins
            phase = enter_phase(plan, engine, step, default_weight_decay, run_dir if dist.is_main else None)
        t0 = time.perf_counter()
        batch = next(batches)  # one bucket: every clip of the batch has the same shape
        global_batches.check(batch["bucket"], len(batch["index"]) * dist.dp_world, step + 1)
        data_wait = time.perf_counter() - t0

        # (B,) False where a clip failed to decode or is quarantined
        valid = (batch["valid"] & ~quarantine.mask(batch["key"])).to(device, non_blocking=True)
        x0, txt, vec = batch_features(batch, text, vae, device)  # (B, C, T', H', W'), (B, L, D), (B, Dv)
        x0 = faults.corrupt(x0, batch["key"])
        x0, txt, vec = (zero_where_invalid(x, valid) for x in (x0, txt, vec))
        faults.arm(step + 1)
        cond = training_condition(flow, batch, x0, vae, cfg.seed)  # (B, 1 + C, T', H', W') I2V condition, or None
        losses = flow.training_losses(engine, x0, txt, vec, batch["index"], cfg.seed, null_txt[0], null_vec[0], cond)
        if step == first_step or step % cfg.sp_guard_every == 0:
            check_sequence_batches(batch, losses["t"], cfg.seed, dist, step)  # no-op without sequence parallelism
        loss = torch.where(valid, losses["loss"], 0.0).sum() / valid.sum().clamp(min=1)
        engine.backward(loss)
        grad_norm = engine.step()  # a non-finite norm: the engine applied nothing
        step += 1
        # the same verdict on every rank: from the loss over all ranks' valid samples and the global gradient norm
        loss_sum, n_valid = all_mean(torch.stack([loss * valid.sum(), valid.sum().float()])).tolist()
        verdict = sentinel.observe(loss_sum / n_valid if n_valid else None, float(grad_norm))
        if verdict.action != "ok":  # the samples whose own loss stands out (or, on every rank, all of them)
            out = standouts(batch["key"], torch.where(valid, losses["loss"], 0.0), sentinel.spike_level())
            blamed.append((out, list(batch["key"])))
            bad = out or list(batch["key"])
            append_jsonl(
                run_dir / "skipped" / f"nonfinite_rank{dist.rank}.jsonl",
                [{"key": k, "step": step, "action": verdict.action, "reason": verdict.reason} for k in bad],
            )
            log.warning("step %d %s: %s (samples %s)", step, verdict.action, verdict.reason, bad[:8])
        stopping = stop.requested()  # SIGUSR1/SIGTERM or RUN_DIR/STOP: checkpoint now, exit, resume later
        due = cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == cfg.steps)
        # a checkpoint is written after a good step (a rollback's target), at the end and when asked to stop
        checkpointing = stopping or (due and (verdict.action == "ok" or step == cfg.steps))
        if checkpointing and verdict.action != "rollback":  # never write non-finite weights
            nonfinite = all_sum_counts({"weights": engine.count_nonfinite()})["weights"]
            if nonfinite:
                verdict = Verdict("rollback", f"{nonfinite} non-finite weights at step {step}, not checkpointed")
        if verdict.action == "rollback":  # back to the last checkpoint, without the samples of the bad steps
            everyone = [s for part in all_gather_objects(blamed) for s in part]  # every rank's bad steps
            state = roll_back(engine, ckpt_dir, sentinel, quarantine, step, verdict.reason, blame(everyone))
            step, samples_seen = state["step"], state["samples_seen"]
            skipped, failed = Counter(state["skipped"]), Counter(state["failed"])
            set_rng_state(state["rng"])
            batches, blamed, phase = iter(open_loader(state=state["data"])), [], None
            window.reset()
            breakdown.reset()
            progress.n = step
            if dist.is_main:
                truncate_after(run_dir, step)
            continue
        if verdict.action == "ok":
            blamed = []
            if cfg.ema is not None:
                engine.update_ema(ema_decay(step, cfg.ema.decay, cfg.ema.warmup))
        global_samples = len(batch["index"]) * dist.dp_world
        samples_seen += global_samples
        skipped.update(batch["plan_skipped"])
        if dist.sp_rank == 0:  # the group's ranks decode the same clips: count their failures once
            failed.update(batch["failed"])
        video_tokens, text_tokens = math.prod(model.token_grid(x0.shape)), txt.shape[1]
        flops = step_flops(model, video_tokens, text_tokens, global_samples)
        good = verdict.action == "ok"  # a skipped step's time counts, its loss does not
        tokens = global_samples * (video_tokens + text_tokens)
        window.add(loss if good else None, data_wait, global_samples, tokens, flops)
        if good:
            breakdown.add(losses["loss"], losses["t"], valid, batch["bucket"])
        progress.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            row = window.row(step, engine.lr(), grad_norm, samples_seen)
            row["bucket"] = batch["bucket"]
            row |= breakdown.fields()  # loss_by_t, loss_by_bucket
            row["skipped"] = {**skipped, **all_sum_counts({r: failed[r] for r in FAILURES})}
            row["skipped_steps"], row["rollbacks"] = sentinel.skipped, len(sentinel.rollbacks)
            logger.log(row)
            progress.set_postfix(progress_fields(row), refresh=False)
        if checkpointing:
            state = loop_state(step, samples_seen, batch, skipped, failed, sentinel) | global_batches.state()
            save_checkpoint(engine, ckpt_dir, step_tag(step), state, cfg.ckpt_keep)  # sealed, then `latest` moves
        evaluation = evaluator(engine, step)  # when due: validation loss, probes, fixed prompts, health
        if evaluation is not None:
            logger.log(evaluation)
            logger.log_videos(step, [Path(p) for p in evaluation.get("eval_videos", [])])
            if evaluator.stop_requested(evaluation):
                if not checkpointing:
                    state = loop_state(step, samples_seen, batch, skipped, failed, sentinel) | global_batches.state()
                    save_checkpoint(engine, ckpt_dir, step_tag(step), state, cfg.ckpt_keep)
                write_stage_report(run_dir, dist.is_main, evaluator, step)
                raise LearningAlarm(f"step {step}: " + "; ".join(evaluation["alarms"] or ["an alarm on another rank"]))
        if stopping and step < cfg.steps:
            log.info(
                "stop requested (%s): checkpointed step %d of %d; the same command resumes",
                stop.reason(),
                step,
                cfg.steps,
            )
            break
    profiler.at(step, final=True)
    write_stage_report(run_dir, dist.is_main, evaluator, step)
    watchdog.close()
    stop.close(dist.is_main)
    progress.close()
    logger.close()
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
