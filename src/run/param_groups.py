"""Freeze rules and per-group learning rates, and schedules that change them at given steps.

Config (`conf/optim/*.yaml`):

    groups:                 # rules for step 0; the first rule whose regex matches a parameter name decides
      - {pattern: '^(img_in|final_layer\\.linear)\\.', lr_scale: 1.0, warmup_steps: 500}
      - {pattern: '.', trainable: false}
    schedule:               # from step N on, these rules replace the ones before
      - {step: 2000, groups: [{pattern: '.', trainable: true}]}

A rule sets `trainable` (default true), `lr_scale` (default 1), `weight_decay` (default: the optimizer's) and
`warmup_steps` (a linear warmup counted from the step the rule takes effect; default 0). A parameter no rule
matches is trainable with the optimizer's settings. A rule that matches no parameter is an error (a typo would
otherwise freeze nothing).

How it is applied, identically by every engine:
- parameters that are frozen in every phase get `requires_grad=False` and never enter the optimizer;
- parameters with the same settings in every phase form one optimizer param group, so the groups never change;
- a frozen phase of a group: `requires_grad=False` (no gradient, a zero gradient under ZeRO-3) and LR factor 0,
  so its weights stay bit-identical; when it becomes trainable again its optimizer moments start from zero;
- the LR of group g at step s is base_schedule(s) x `lr_factor(g, s)` (a `LambdaLR` per group).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger("kiln.param_groups")
RULE_KEYS = ("pattern", "trainable", "lr_scale", "weight_decay", "warmup_steps")


@dataclass(frozen=True)
class Setting:
    """What one phase's rule says for a parameter."""

    trainable: bool = True
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's own
    warmup_steps: int = 0
    pattern: str | None = None  # the rule that matched; None: no rule (the defaults)


def _check_rule(rule: Mapping, where: str) -> Setting:
    unknown = sorted(set(rule) - set(RULE_KEYS))
    if unknown or "pattern" not in rule:
        raise ValueError(f"{where}: rule {dict(rule)!r} needs a pattern and only the keys {RULE_KEYS}; got {unknown}")
    try:
        re.compile(rule["pattern"])
    except re.error as err:
        raise ValueError(f"{where}: pattern {rule['pattern']!r} is not a regular expression: {err}") from err
    setting = Setting(
        trainable=bool(rule.get("trainable", True)),
        lr_scale=float(rule.get("lr_scale", 1.0)),
        weight_decay=None if rule.get("weight_decay") is None else float(rule["weight_decay"]),
        warmup_steps=int(rule.get("warmup_steps", 0)),
        pattern=rule["pattern"],
    )
    if setting.lr_scale < 0 or setting.warmup_steps < 0 or (setting.weight_decay or 0) < 0:
        raise ValueError(f"{where}: rule {dict(rule)!r}: lr_scale, weight_decay and warmup_steps must be >= 0")
    return setting


class ParamPlan:
    """The per-parameter settings of every phase, grouped into fixed optimizer param groups.

    Args:
        names: parameter names in model order.
        groups: the rules from step 0.
        schedule: [{step, groups}], steps strictly increasing and > 0.
    """

    def __init__(self, names: Sequence[str], groups: Sequence[Mapping] = (), schedule: Sequence[Mapping] = ()):
        self.starts = [0]
        phases = [list(groups)]
        for entry in schedule:
            if set(entry) != {"step", "groups"} or int(entry["step"]) <= self.starts[-1]:
                raise ValueError(
                    f"schedule entry {dict(entry)!r}: needs exactly `step` and `groups`, with steps > 0 and "
                    f"increasing (previous: {self.starts[-1]})"
                )
            self.starts.append(int(entry["step"]))
            phases.append(list(entry["groups"]))
        rules = [
            [_check_rule(r, f"optim.{'groups' if p == 0 else f'schedule[{p - 1}]'}") for r in phase]
            for p, phase in enumerate(phases)
        ]
        self.names = list(names)
        per_name = {}  # name -> (Setting of phase 0, phase 1, ...)
        used = set()
        for name in self.names:
            settings = []
            for p, phase in enumerate(rules):
                match = next((s for s in phase if re.search(s.pattern, name)), Setting())
                used.add((p, match.pattern))
                settings.append(match)
            per_name[name] = tuple(settings)
        unused = [
            f"{s.pattern!r} (phase from step {self.starts[p]})"
            for p, phase in enumerate(rules)
            for s in phase
            if (p, s.pattern) not in used
        ]
        if unused:
            raise ValueError(
                f"param-group rules that match no parameter: {', '.join(unused)}; names look like {self.names[:3]}"
            )
        keys = list(dict.fromkeys(per_name.values()))  # distinct per-phase settings, in model order
        self.settings = [k for k in keys if any(s.trainable for s in k)]  # optimizer groups: ever trainable
        self.members = [[n for n in self.names if per_name[n] == k] for k in self.settings]
        self.never_trainable = [n for n in self.names if not any(s.trainable for s in per_name[n])]
        if not self.settings:
            raise ValueError("the optim.groups / optim.schedule rules freeze every parameter in every phase")

    def phase(self, step: int) -> int:
        """The phase in force for the optimizer step taken after `step` completed steps."""
        return sum(1 for start in self.starts if start <= step) - 1

    def lr_factor(self, group: int, step: int) -> float:
        """LR multiplier of optimizer group `group` at `step` (0 while frozen; ramps over the rule's warmup)."""
        phase = self.phase(step)
        setting = self.settings[group][phase]
        if not setting.trainable:
            return 0.0
        warm = setting.warmup_steps
        ramp = min(1.0, (step - self.starts[phase] + 1) / warm) if warm else 1.0
        return setting.lr_scale * ramp

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        """Param-group dicts for the optimizer; sets `requires_grad` for building it (every ever-trainable
        parameter on, the never-trainable ones off). Call `apply(model, phase)` after the engine is built."""
        params = dict(model.named_parameters())
        for name in self.never_trainable:
            params[name].requires_grad_(False)
        groups = []
        for members in self.members:
            for name in members:
                params[name].requires_grad_(True)
            groups.append({"params": [params[n] for n in members]})
        return groups

    def apply(self, model: nn.Module, param_groups: list[dict], default_weight_decay: float, phase: int) -> None:
        """Set `requires_grad` and each group's weight decay for `phase`."""
        params = dict(model.named_parameters())
        for settings, members, group in zip(self.settings, self.members, param_groups, strict=True):
            setting = settings[phase]
            for name in members:
                params[name].requires_grad_(setting.trainable)
            wd = setting.weight_decay
            group["weight_decay"] = default_weight_decay if wd is None or not setting.trainable else wd

    def unfrozen_at(self, phase: int) -> list[int]:
        """Groups frozen in the phase before `phase` and trainable in it: their optimizer moments restart."""
        if phase == 0:
            return []
        return [g for g, s in enumerate(self.settings) if s[phase].trainable and not s[phase - 1].trainable]

    def report(self, model: nn.Module, phase: int) -> dict:
        """Trainable-parameter report of `phase`: per group the rule, the counts and the settings."""
        numel = {n: getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()}  # ZeRO-3: full size
        rows = []
        for g, (settings, members) in enumerate(zip(self.settings, self.members, strict=True)):
            s = settings[phase]
            rows.append(
                {
                    "group": g,
                    "pattern": s.pattern,
                    "trainable": s.trainable,
                    "lr_scale": s.lr_scale,
                    "weight_decay": s.weight_decay,
                    "warmup_steps": s.warmup_steps,
                    "tensors": len(members),
                    "params": sum(numel[n] for n in members),
                    "keys": members,
                }
            )
        trainable = sum(r["params"] for r in rows if r["trainable"])
        frozen_keys = self.never_trainable + [k for r in rows if not r["trainable"] for k in r["keys"]]
        return {
            "phase": phase,
            "from_step": self.starts[phase],
            "trainable_params": trainable,
            "total_params": sum(numel.values()),
            "frozen_keys": sorted(frozen_keys),
            "groups": rows,
        }


def enter_phase(plan: ParamPlan, engine, step: int, default_weight_decay: float, run_dir: Path | None) -> int:
    """Put the phase in force at `step` into effect on a built engine; log and record the trainable report.

    Crossing into a phase (also when a resumed run starts exactly there) restarts the optimizer moments of
    the groups it unfreezes. Returns the phase.
    """
    phase = plan.phase(step)
    plan.apply(engine.module, engine.param_groups, default_weight_decay, phase)
    if step > 0 and plan.phase(step - 1) != phase:
        engine.reset_optimizer_state(plan.unfrozen_at(phase))
    report = plan.report(engine.module, phase)
    log_report(report)
    if run_dir is not None:
        with open(run_dir / "trainable.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **report}) + "\n")
    return phase


def log_report(report: dict) -> None:
    log.info(
        "phase %d (from step %d): %d of %d parameters trainable (%.1f%%)",
        report["phase"],
        report["from_step"],
        report["trainable_params"],
        report["total_params"],
        100 * report["trainable_params"] / max(report["total_params"], 1),
    )
    for row in report["groups"]:
        log.info(
            "  group %d %-40s %s lr x%g wd %s warmup %d: %d tensors, %d params",
            row["group"],
            repr(row["pattern"]) if row["pattern"] else "(no rule)",
            "trainable" if row["trainable"] else "FROZEN   ",
            row["lr_scale"],
            "optimizer's" if row["weight_decay"] is None else row["weight_decay"],
            row["warmup_steps"],
            row["tensors"],
            row["params"],
        )
    never = len(report["frozen_keys"]) - sum(r["tensors"] for r in report["groups"] if not r["trainable"])
    if never:
        log.info("  %d tensors frozen in every phase: not in the optimizer", never)


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 0, group_factors: Callable[[int, int], float] | None = None
) -> LambdaLR:
    """Linear warmup from lr / warmup_steps to lr over `warmup_steps` steps, then constant (Open-Sora).

    `group_factors(group, step)` multiplies each param group's LR (freeze rules, lr_scale and per-group warmup
    from `src.run.param_groups.ParamPlan.lr_factor`).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(group: int, step: int) -> float:
        base = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return base * (group_factors(group, step) if group_factors else 1.0)

    return LambdaLR(optimizer, [functools.partial(factor, g) for g in range(len(optimizer.param_groups))])
