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
its own checkpoint. The optimizer starts fresh (the previous stage's moments are not carried over).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

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


@torch.no_grad()
def apply_transition(
    model: nn.Module, init_from: str | Path, rules: Sequence[Mapping], report: Path | None = None
) -> dict[str, int]:
    """Initialise `model` from the latest checkpoint of the run `init_from` by the declared `rules`."""
    from src.checkpoint import load_model_weights

    source, tag = load_model_weights(init_from)
    target = model.state_dict()
    plan = plan_transition(source, target, rules)
    for entry in plan:
        if entry["action"] == "load":
            target[entry["key"]].copy_(source[entry["key"]])
        elif entry["action"] == "zero":
            target[entry["key"]].zero_()
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
    return dict(counts)
