"""Everything a training run builds once, before its first step: `setup(cfg, run_dir) -> Run`.

The order matters and is the one a reader would check: the process group, the run directory (checked writable
on every rank before anything is spent), the checkpoint to resume from (verified, or refused, before anything is
built), the model (on the meta device where the engine materialises it from rank 0's weights), a declared stage
transition, the engine, the resume from that checkpoint, the data, the
encoders (only where the data source or the fixed-prompt evaluation needs them), the checks that the model fits
its features, and the guards of the loop (sentinel, quarantine, stop requests, profiler). The watchdog is
started by `train()` itself: it watches the function that starts it.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src.diffusion.condition import check_condition_input
from src.diffusion.flow import FlowMatching
from src.evaluation import Evaluator, validation_set
from src.flops import peak_flops
from src.integrity import resume_tag
from src.parallel.construction import construction_for
from src.parallel.dist import DistInfo, agree, init_distributed
from src.run.faults import Faults
from src.run.metrics import LossBreakdown, StepWindow, truncate_after
from src.run.param_groups import ParamPlan
from src.run.preemption import StopRequest, clear_stale_stop
from src.run.profiler import StepProfiler
from src.run.resume import GlobalBatches, check_writable
from src.run.sentinel import Quarantine, Sentinel
from src.run.transitions import apply_transition, carry_moments
from src.rundir import checkpoint_dir, latest_tag, set_rng_state

log = logging.getLogger("kiln.train")


@dataclass
class Position:
    """Where the loop is: what a checkpoint records beside the weights (with the RNG and the data plan)."""

    step: int
    samples_seen: int
    skipped: Counter  # samples the data plan left out, by reason
    failed: Counter  # this rank's decode/read failures, by reason

    @classmethod
    def from_state(cls, state: dict, scan_skips: Counter) -> Position:
        """A checkpoint's position; a fresh run counts the samples its data scan left out."""
        step = state["step"]
        skipped = Counter(state["skipped"]) if step else scan_skips
        return cls(step, state["samples_seen"], skipped, Counter(state["failed"]))


@dataclass
class Run:
    """The built run: what the loop in `src.train.train` reads and calls."""

    cfg: DictConfig
    run_dir: Path
    ckpt_dir: Path
    dist: DistInfo
    model: torch.nn.Module
    engine: Any  # the engine seam (src/parallel/engine.py: Engine)
    flow: FlowMatching
    plan: ParamPlan
    default_weight_decay: float  # the optimizer's own, before any resume (freeze phases restore it)
    open_loader: Callable[..., Any]  # (state=data position) -> loader: after a rollback
    loader: Any  # opened at the resumed data position
    position: Position
    global_batches: GlobalBatches
    text: torch.nn.Module | None  # None where the data source hands features and no fixed prompt needs them
    vae: torch.nn.Module | None
    null_txt: torch.Tensor  # (1, L, D): the empty prompt, for text dropout and guidance
    null_vec: torch.Tensor  # (1, Dv)
    evaluator: Evaluator
    sentinel: Sentinel
    quarantine: Quarantine
    faults: Faults
    logger: Any
    stop: StopRequest
    progress: tqdm
    window: StepWindow
    breakdown: LossBreakdown
    profiler: StepProfiler

    @property
    def main_dir(self) -> Path | None:
        """The run directory on rank 0, None elsewhere: where only the main rank writes."""
        return self.run_dir if self.dist.is_main else None

    def close(self) -> None:
        self.stop.close(self.dist.is_main)
        self.progress.close()
        self.logger.close()


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


def start_directory(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> None:
    """The same run directory on every rank, writable now (not at the first checkpoint), with its config."""
    if dist.is_main:
        clear_stale_stop(run_dir)
    agree(str(run_dir), "run directory")
    check_writable([run_dir, checkpoint_dir(run_dir)])
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Build the run of `cfg` in `run_dir`, resumed from its latest checkpoint when there is one."""
    dist = init_distributed(cfg.dist_backend, sp_size=cfg.parallel.get("sp_size", 1), timeout_s=cfg.dist_timeout_s)
    run_dir = run_dir.resolve()
    start_directory(cfg, run_dir, dist)
    ckpt_dir = checkpoint_dir(run_dir)
    # `latest` checked against its manifest (or the newest intact one taken), or refused: before anything is built
    resume_tag(ckpt_dir, cfg.resume)
    build_engine = instantiate(cfg.parallel)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and engine, whatever the encoders
    # the engine's way to build the model: whole, on meta on ranks > 0 (FSDP2), partitioned as built (ZeRO-3)
    construction = construction_for(build_engine)
    with construction.build():
        model = instantiate(cfg.model)
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
        device=dist.device,
        param_groups=plan.optimizer_groups(model),
    )
    default_weight_decay = engine.param_groups[0]["weight_decay"]
    if new_stage and cfg.transition_optimizer == "carry":
        carry_moments(engine, plan, cfg.init_from, transition)
    if cfg.ema is not None:
        engine.init_ema()  # from the starting weights; a resumed run loads its own below

    state = engine.load(ckpt_dir) or {"step": 0, "samples_seen": 0, "data": None, "skipped": {}, "failed": {}}
    global_batches = GlobalBatches(state.get("global_batches"), cfg.resume_batch_change)  # refused if changed
    if state["step"]:
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (%d samples seen)", ckpt_dir, state["step"], state["samples_seen"])

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
        text, vae = instantiate(cfg.text).to(dist.device), instantiate(cfg.vae).to(dist.device)
    spec = data.feature_spec(text, vae)  # the empty prompt's features, latent shapes per bucket, text widths
    first_latent = next(iter(spec.latent_shapes.values()))  # (C, T', H', W') of the first configured bucket
    check_compatible(model, first_latent[0], spec.txt_dim, spec.vec_dim)
    check_patches(spec.latent_shapes, model)
    check_condition_input(model, flow.cond, first_latent[0])  # I2V: 1 + C
    null_txt, null_vec = spec.null_txt.to(dist.device), spec.null_vec.to(dist.device)
    evaluator = Evaluator(
        cfg.eval,
        validation_set(data.validation(), text, vae, dist.device),
        (null_txt, null_vec),
        text,
        vae,
        first_latent,  # fixed prompts are drawn at the first bucket's shape
        run_dir,
        dist.is_main,
        cfg.steps,
        flow.sigma_min,
        model=model,  # eval.images need its cond_in
    )
    sentinel = Sentinel(**cfg.sentinel)  # non-finite steps are skipped, divergence is rolled back (src/run/sentinel.py)
    if "sentinel" in state:
        sentinel.load_state_dict(state["sentinel"])
    faults = Faults(**cfg.faults)  # deliberate failures for drills (src/run/faults.py); none by default
    faults.install(model)
    logger = instantiate(cfg.logger)(
        run_dir=run_dir, enabled=dist.is_main, config=OmegaConf.to_container(cfg, resolve=True)
    )
    if dist.is_main:
        truncate_after(run_dir, state["step"])
        log.info(
            "model: %.2fM parameters on %d ranks (%d data-parallel x %d sequence-parallel)",
            n_params / 1e6,
            dist.world_size,
            dist.dp_world,
            dist.sp_size,
        )
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        ckpt_dir=ckpt_dir,
        dist=dist,
        model=model,
        engine=engine,
        flow=flow,
        plan=plan,
        default_weight_decay=default_weight_decay,
        open_loader=open_loader,
        loader=loader,
        position=Position.from_state(state, Counter(s.reason for s in data.scan_skips)),
        global_batches=global_batches,
        text=text,
        vae=vae,
        null_txt=null_txt,
        null_vec=null_vec,
        evaluator=evaluator,
        sentinel=sentinel,
        quarantine=Quarantine(run_dir, dist.is_main),  # samples of rolled-back steps: never trained on again
        faults=faults,
        logger=logger,
        stop=StopRequest(run_dir),
        progress=tqdm(
            total=cfg.steps, initial=state["step"], disable=not dist.is_main, desc="train", dynamic_ncols=True
        ),
        window=StepWindow(
            dist.device,
            dist.world_size,
            peak_flops(dist.device, cfg.parallel.get("precision", "fp32"), cfg.peak_tflops),
        ),
        breakdown=LossBreakdown(dist.device, cfg.eval.val_bins),  # training loss by timestep bin and bucket
        profiler=StepProfiler(run_dir, dist.rank, dist.device, **cfg.profile),  # where the time goes, if asked
    )
