"""Evaluation during training, built once at setup and called from the loop in one line: `evaluator(engine, step)`.

What it does when due (config `eval`, see conf/train.yaml):
- every `val_every` steps and at the last step: the validation loss on the held-out clips at fixed noise and
  timesteps, overall and per timestep bin, and the time / text probes (src/evaluation/validation.py);
- every `every` steps and at the last step, with `prompts`: the fixed-prompt videos (RUN_DIR/eval/step_N/), and
  their health: brightness, contrast, motion, sharpness and flicker as ratios to the held-out clips' statistics,
  measured once at setup (src/evaluation/health.py);
- at the same steps, with `images`: the fixed-prompt image-to-video samples (src/evaluation/images.py), entry i
  seeded `seed + i` like prompt i, written as RUN_DIR/eval/step_N/NN_<type>_<prompt>.mp4. They stay out of the health
  ratios: their given frames are the user's images, not samples of the data.
From step `alarm_after` on, a probe gap that is not clearly positive (under `probe_min_gap`, or under
`probe_min_z` standard errors) and a health ratio outside its bounds are alarms: logged (`alarms: warn`), or the
run checkpoints and stops (`alarms: stop`, `LearningAlarm`). Every rank makes the same forwards in the same order
(sharded engines gather weights in each); the decision to stop is agreed over all ranks.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from src.diffusion.condition import cond_channels
from src.evaluation.health import STATS, health_alarms, health_ratios, video_stats
from src.evaluation.images import EvalImage, eval_images
from src.evaluation.sampling import drop_duplicates, sample_prompts
from src.evaluation.validation import PROBES, ValidationSet, evaluate
from src.parallel.dist import all_sum_counts

log = logging.getLogger("kiln.eval")
ALARM_MODES = ("off", "warn", "stop")


class LearningAlarm(RuntimeError):
    """An evaluation alarm under `eval.alarms: stop`; the run has checkpointed the step."""


USES = {"time": "the caption's direction of time", "order": "frame order", "text": "its text", "empty": "its text"}


def probe_alarms(row: dict, min_gap: float, min_z: float, probes=("order", "text")) -> list[str]:
    """A message for each of `probes` whose gap is not clearly positive."""
    alarms = []
    for name in probes:
        g, se = row.get(f"probe_{name}_gap"), row.get(f"probe_{name}_se")
        if g is None:
            continue
        if g < min_gap or g < min_z * se:
            alarms.append(
                f"{name} probe gap {g:+.4f} (se {se:.4f}) is not above {min_gap} and {min_z} standard errors: "
                f"the model does not use {USES[name]}"
            )
    return alarms


class Evaluator:
    """Validation, probes, fixed prompts and sample health of one run (see the module docstring)."""

    def __init__(
        self,
        cfg: DictConfig,
        val: ValidationSet | None,
        null_features: tuple[torch.Tensor, torch.Tensor],
        text,
        vae,
        latent_shape: tuple[int, ...],
        run_dir: Path,
        is_main: bool,
        last_step: int,
        sigma_min: float = 0.0,
        model: torch.nn.Module | None = None,
    ):
        if cfg.alarms not in ALARM_MODES:
            raise ValueError(f"eval.alarms must be one of {ALARM_MODES}, got {cfg.alarms!r}")
        for key in ("every", "val_every", "alarm_after"):
            if cfg[key] < 0:
                raise ValueError(f"eval.{key} must be >= 0, got {cfg[key]}")
        self.cfg, self.val, self.text, self.vae = cfg, val, text, vae
        self.null_txt, self.null_vec = (f[0] for f in null_features)  # (L, D), (Dv,)
        self.latent_shape, self.run_dir, self.is_main = latent_shape, run_dir, is_main
        self.last_step, self.sigma_min = last_step, sigma_min
        self.bounds = {k: tuple(v) for k, v in OmegaConf.to_container(cfg.health, resolve=True).items()}
        health_alarms(dict.fromkeys(STATS, 1.0), self.bounds)  # raises on an unknown statistic
        if unknown := set(cfg.alarm_probes) - set(PROBES):
            raise ValueError(f"eval.alarm_probes: unknown {sorted(unknown)}; the probes are {list(PROBES)}")
        self.reference = None  # the held-out clips' statistics, for the health ratios
        if val is not None and cfg.prompts and is_main:
            with torch.no_grad():
                self.reference = video_stats(vae.decode(val.x0.float()).clamp(-1, 1))
            log.info("sample health reference (held-out clips): %s", fmt(self.reference))
        entries = OmegaConf.to_container(cfg.images, resolve=True) if cfg.get("images") else []
        channels = cond_channels(model) if model is not None else None
        self.images: list[EvalImage] = eval_images(entries, vae, latent_shape, channels, self.null_txt.device)
        self.last: dict = {}  # the latest evaluation's fields and alarms (the stage report)

    def due(self, step: int, every: int) -> bool:
        return (every > 0 and step % every == 0) or step == self.last_step

    def __call__(self, engine, step: int) -> dict | None:
        """Evaluate at `step` if due: the fields of one metrics row (with `alarms`), or None."""
        row: dict = {}
        if self.val is not None and self.due(step, self.cfg.val_every):
            row |= evaluate(
                engine, self.val, self.null_txt, self.null_vec, self.cfg.val_bins, self.cfg.seed,
                self.cfg.val_batch, self.sigma_min,
            )  # fmt: skip
        if (self.cfg.prompts or self.images) and self.due(step, self.cfg.every):
            row |= self.sample(engine, step)
        if not row:
            return None
        alarms = []
        if self.cfg.alarms != "off" and step >= self.cfg.alarm_after:
            alarms += probe_alarms(row, self.cfg.probe_min_gap, self.cfg.probe_min_z, self.cfg.alarm_probes)
            if "health" in row:
                alarms += health_alarms(row["health"], self.bounds)
        row["alarms"] = alarms
        self.last = {"step": step, **row}
        for alarm in alarms:
            log.warning("step %d: learning alarm: %s", step, alarm)
        return {"step": step, **row}

    def stop_requested(self, row: dict | None) -> bool:
        """Whether the run must stop on this row's alarms (agreed over ranks: any rank's alarm stops all)."""
        mine = int(bool(row and row["alarms"]) and self.cfg.alarms == "stop")
        return all_sum_counts({"alarm": mine})["alarm"] > 0

    def sample(self, engine, step: int) -> dict:
        """The fixed-prompt videos, then the image-to-video ones; on the main rank their paths and the text-to-video
        videos' health ratios."""
        out_dir = self.run_dir / "eval" / f"step_{step:08d}" if self.is_main else None
        paths, videos = [], None
        if self.cfg.prompts:
            paths, videos = self.draw(engine, list(self.cfg.prompts), out_dir, batch=self.cfg.val_batch)
        for i, image in enumerate(self.images):  # one at a time: each has its own condition (and kept frames)
            kept = functools.partial(drop_duplicates, self.vae, cond_type=image.cond_type)
            paths += self.draw(engine, [image.prompt], out_dir, start=i, prefix=f"{image.cond_type}_", cond=image.cond,
                               keep_frames=kept)[0]  # fmt: skip
        fields: dict = {"eval_videos": [str(p) for p in paths]}
        if self.reference is not None and videos is not None:
            stats = video_stats(videos)
            fields["health"] = health_ratios(stats, self.reference)
            fields["health_stats"] = stats
        return fields

    def draw(self, engine, prompts: list[str], out_dir: Path | None, **options) -> tuple[list, torch.Tensor | None]:
        """`sample_prompts` with the evaluation's noise seed, steps, guidance and empty prompt (every rank calls it)."""
        return sample_prompts(
            engine, self.text, self.vae, prompts, self.latent_shape, self.null_txt[None], self.null_vec[None], out_dir,
            self.null_txt.device, seed=self.cfg.seed, steps=self.cfg.steps, guidance=self.cfg.guidance, **options,
        )  # fmt: skip


def fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
