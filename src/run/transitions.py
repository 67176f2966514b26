"""Declared stage transitions: initialise a stage's model from the previous stage's final checkpoint.

A stage config names `transition.init_from` (the previous stage's run directory) and `transition.rules`: each
rule matches parameter names by regex and says what happens to them, with a reason:

    load    copy the previous stage's tensor (the default for a name present in both with the same shape)
    reinit  keep the new model's own (seeded) initialisation
    zero    set to zero
    drop    a tensor of the previous stage that the new model does not have

Anything not covered (a shape mismatch, a tensor only one side has) is an error listing the keys: no layer is
silently re-initialised or dropped. The transition writes `RUN_DIR/transition.json` (every key, its action and
why) and logs a summary. It runs once, when the run directory holds no checkpoint; a resumed run continues from
its own checkpoint.

The optimizer starts fresh (`transition_optimizer: reset`, the default) or, with `carry`, takes the previous
stage's AdamW moments and step count for every loaded parameter (`carry_moments`); an optimizer group must then
be wholly loaded or wholly new, so re-initialised layers need their own `optim.groups` rule (where they can
also get their own warmup).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from src.parallel.construction import Construction

log = logging.getLogger("kiln.curriculum")
ACTIONS = ("load", "reinit", "zero", "drop")


def _rule_for(name: str, rules: Sequence[Mapping]) -> Mapping | None:
    return next((r for r in rules if re.search(r["pattern"], name)), None)


def plan_transition(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], rules: Sequence[Mapping]
) -> list[dict]:
    """One entry per key of either side: {key, action, reason, source_shape, target_shape}. Raises ValueError
    listing every key whose fate no rule declares."""
    for rule in rules:
        if rule.get("action") not in ACTIONS or not rule.get("pattern") or not rule.get("reason"):
            raise ValueError(f"transition rule {dict(rule)!r}: needs pattern, action (one of {ACTIONS}) and reason")
    plan, undeclared = [], []
    for key in sorted(set(source) | set(target)):
        src, dst = source.get(key), target.get(key)
        entry = {
            "key": key,
            "source_shape": list(src.shape) if src is not None else None,
            "target_shape": list(dst.shape) if dst is not None else None,
        }
        rule = _rule_for(key, rules)
        if rule is not None:
            action, reason = rule["action"], rule["reason"]
            if (action == "drop") != (dst is None) or (action == "load" and (src is None or src.shape != dst.shape)):
                undeclared.append(f"{key} (rule {rule['pattern']!r} says {action}: {entry})")
                continue
        elif src is not None and dst is not None and src.shape == dst.shape:
            action, reason = "load", "same name and shape"
        else:
            undeclared.append(f"{key} (previous stage {entry['source_shape']}, this stage {entry['target_shape']})")
            continue
        plan.append({**entry, "action": action, "reason": reason})
    if undeclared:
        raise ValueError(
            "the stage transition does not say what to do with: "
            + "; ".join(undeclared)
            + ". Add a rule (pattern, action: reinit|zero|drop|load, reason) to transition.rules."
        )
    return plan


def _meta(shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


@torch.no_grad()
def apply_transition(
    model: nn.Module,
    init_from: str | Path,
    rules: Sequence[Mapping],
    report: Path | None = None,
    construction: Construction | None = None,
) -> list[dict]:
    """Initialise `model` from the latest checkpoint of the run `init_from` by the declared `rules`.

    `construction` is how the engine built `model` (`src.parallel.construction`; default: whole on this rank): the
    source is read one tensor at a time, by the ranks that write it, into the model however it is held.
    Returns the plan: one entry per key with its action and reason (as in `plan_transition`)."""
    from src.checkpoint import open_model_weights

    construction = construction or Construction()
    target = construction.shapes(model)
    # a diffusers folder (e.g. FLUX.1-dev, as Open-Sora 2.0 started) is renamed to these keys first
    source = open_model_weights(init_from, names=list(target))
    tag = source.tag
    plan = plan_transition(_meta(source.shapes), _meta(target), rules)
    values = {}
    for entry in plan:
        key = entry["key"]
        if entry["action"] == "load":
            values[key] = functools.partial(source.read, key)
        elif entry["action"] == "zero":
            values[key] = functools.partial(torch.zeros, target[key])
    construction.write(model, values)
    counts = Counter(e["action"] for e in plan)
    if report is not None:
        record = {"init_from": str(init_from), "tag": tag, "counts": dict(counts), "keys": plan}
        report.write_text(json.dumps(record, indent=1))
    changed = sorted({e["key"].rsplit(".", 1)[0] for e in plan if e["action"] != "load"})
    log.info(
        "stage transition from %s (%s): %s; not loaded: %s",
        init_from,
        tag,
        ", ".join(f"{n} {a}" for a, n in sorted(counts.items())),
        ", ".join(changed) or "nothing",
    )
    return plan


def carry_moments(engine, param_plan, init_from: str | Path, transition: list[dict]) -> None:
    """Give the loaded parameters the previous stage's AdamW moments and step count (transition_optimizer=carry).

    Raises ValueError naming the group when an optimizer group mixes loaded parameters that have moments with
    parameters that do not (re-initialised, or frozen in the previous stage).
    """
    from src.checkpoint import Moments, is_released

    if is_released(init_from):
        raise ValueError(f"transition_optimizer=carry needs a Kiln run as init_from; {init_from} holds weights only")
    moments = Moments(init_from)
    loaded = {e["key"] for e in transition if e["action"] == "load"} & set(moments.steps)
    steps = {}
    for group, members in enumerate(param_plan.members):
        fresh = [n for n in members if n not in loaded]
        if len(fresh) == len(members) or not param_plan.settings[group][0].trainable:
            continue  # nothing to carry, or frozen at first: its moments restart when it unfreezes
        if fresh:
            pattern = param_plan.settings[group][0].pattern
            rule = f"rule {pattern!r}" if pattern else "no optim.groups rule"
            raise ValueError(
                f"transition_optimizer=carry: optimizer group {group} ({rule}) mixes parameters with carried moments "
                f"and parameters without ({', '.join(fresh[:6])}): give the latter their own optim.groups rule"
            )
        steps[group] = max(moments.steps[n] for n in members)
    carried = [n for g in steps for n in param_plan.members[g]]
    engine.load_moments(moments.select(carried), steps)
    log.info("carried over the AdamW moments of %d tensors from %s (%s)", len(carried), init_from, moments.tag)
