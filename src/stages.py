"""One command for a staged curriculum: each stage preprocessed (when it trains from the feature cache), trained,
and handed to the next by its run directory.

    python -m src.stages conf/curriculum/demo.yaml [--nproc 2] [--out-dir outputs] [--dry-run] [override ...]

A curriculum file lists stages in order: `{experiment: NAME, overrides: [key=value, ...]}`. Stage i runs in
`OUT_DIR/<its run_name>`; from the second stage on, `init_from` is the previous stage's run directory, whose
final checkpoint (step == its `steps`) must exist. The command is resumable: a finished stage is skipped, an
unfinished one resumes from its own checkpoint, preprocessing skips finished feature shards. Overrides after the
file apply to every stage (e.g. `parallel=local`). SIGUSR1 / SIGTERM are passed on to the running stage, which
checkpoints and exits; run the same command again to go on.

Exit status: 0 when every stage is finished; 75 (EX_TEMPFAIL) when a stage stopped cleanly before its last step
(the same command resumes); a stage's own non-zero status when it failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.cli import HelpFormatter
from src.evaluation import REPORT
from src.rundir import latest_tag

log = logging.getLogger("kiln.stages")
CONF = Path(__file__).resolve().parents[1] / "conf"
STOPPED = 75  # EX_TEMPFAIL: a stage checkpointed and exited early (signal or STOP file); run again to resume
UNHEALTHY = 4  # --require-healthy: a stage ended with a learning alarm (or no report); the next one is not started


def read_curriculum(path: str | Path) -> list[dict]:
    """The stages of a curriculum file, checked: each names an existing experiment."""
    spec = OmegaConf.to_container(OmegaConf.load(path))
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not stages:
        raise ValueError(f"{path}: needs a non-empty `stages:` list of {{experiment: NAME, overrides: [...]}}")
    known = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    for i, stage in enumerate(stages):
        extra = set(stage) - {"experiment", "overrides"}
        if stage.get("experiment") not in known or extra:
            raise ValueError(
                f"{path}: stage {i} {stage!r}: experiment must be one of {known}, keys only experiment and overrides"
            )
    return [{"experiment": s["experiment"], "overrides": list(s.get("overrides") or [])} for s in stages]


def compose(experiment: str, overrides: list[str]) -> DictConfig:
    """The training config a stage will run with (Hydra's compose, as `src.train` would build it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", [f"+experiment={experiment}", *overrides], return_hydra_config=True)


def done_step(run_dir: Path) -> int:
    """The step of a run directory's latest checkpoint (0 when it has none)."""
    tag = latest_tag(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    return int(tag.rsplit("_", 1)[1]) if tag else 0


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def plan(stages: list[dict], out_dir: Path, nproc: int, common: list[str]) -> list[dict]:
    """Per stage: name, run directory, steps, and the preprocess and train commands."""
    planned, previous = [], None
    for stage in stages:
        overrides = [f"out_dir={out_dir}", *stage["overrides"], *common]
        if previous is not None:
            overrides.append(f"init_from={previous['run_dir']}")
        cfg = compose(stage["experiment"], overrides)
        run_dir = Path(cfg.hydra.run.dir)
        args = [f"+experiment={stage['experiment']}", *overrides]
        cached = cfg.data.get("_target_", "").endswith("build_cached_loader")
        entry = {
            "experiment": stage["experiment"],
            "run_dir": run_dir,
            "steps": int(cfg.steps),
            "previous": previous,
            "preprocess": [*launcher(nproc), "-m", "src.preprocess", *args] if cached else None,
            "train": [*launcher(nproc), "-m", "src.train", *args, f"hydra.run.dir={run_dir}"],
        }
        planned.append(entry)
        previous = entry
    return planned


def _run(cmd: list[str]) -> int:
    """Run one stage command, passing SIGUSR1/SIGTERM on so that the stage checkpoints and exits cleanly."""
    log.info("$ %s", shlex.join(cmd))
    child = subprocess.Popen(cmd)
    forward = {s: signal.signal(s, lambda sig, _f: child.send_signal(sig)) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


def stage_report(run_dir: Path) -> dict | None:
    """A finished stage's RUN_DIR/stage_report.json (written by src.train at its end), or None."""
    path = run_dir / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def describe_report(name: str, report: dict | None) -> str:
    """One paragraph for the log: validation loss, probe gaps, health ratios, alarms."""
    if report is None:
        return f"{name}: no {REPORT} (the stage ran without evaluation)"
    lines = [f"{name}: report of step {report['step']} (evaluated at {report['evaluated_step']})"]
    if report.get("val_loss") is not None:
        lines.append(f"  validation loss {report['val_loss']:.4f}")
    probes = report.get("probes") or {}
    for probe in ("time", "order", "text", "empty"):
        if probes.get(f"{probe}_gap") is not None:
            lines.append(f"  {probe} probe gap {probes[f'{probe}_gap']:+.4f} (se {probes[f'{probe}_se']:.4f})")
    if report.get("health"):
        lines.append("  health ratios " + ", ".join(f"{k} {v:.2f}" for k, v in report["health"].items()))
    lines += [f"  ALARM: {a}" for a in report.get("alarms", [])] or ["  no alarm"]
    return "\n".join(lines)


def run_curriculum(stages: list[dict], dry_run: bool = False, require_healthy: bool = False) -> int:
    """Run the planned stages in order; returns 0 when all are finished, STOPPED when one stopped cleanly,
    UNHEALTHY when `require_healthy` and a stage that another follows ended with an alarm (or without a report)."""
    for i, stage in enumerate(stages):
        name = f"stage {i + 1}/{len(stages)} ({stage['experiment']}, {stage['run_dir']})"
        if dry_run:
            for key in ("preprocess", "train"):
                if stage[key]:
                    print(shlex.join(stage[key]))
            continue
        if done_step(stage["run_dir"]) >= stage["steps"]:
            log.info("%s: finished (step %d), skipped", name, stage["steps"])
            continue
        previous = stage["previous"]
        if previous is not None and require_healthy:
            report = stage_report(previous["run_dir"])
            if report is None or not report.get("healthy"):
                why = "it has no stage report" if report is None else "; ".join(report["alarms"]) or "no evaluation"
                log.error("%s not started (--require-healthy): %s ended unhealthy: %s", name, previous["run_dir"], why)
                return UNHEALTHY
        if previous is not None and done_step(previous["run_dir"]) < previous["steps"]:
            reached = done_step(previous["run_dir"])
            raise RuntimeError(
                f"{name} needs the final checkpoint of {previous['run_dir']} (step {previous['steps']}), "
                f"which stopped at step {reached}"
            )
        for key in ("preprocess", "train"):
            if stage[key] and (rc := _run(stage[key])) != 0:
                log.error("%s: %s failed with exit code %d", name, key, rc)
                return rc
        reached = done_step(stage["run_dir"])
        if reached < stage["steps"]:
            log.info("%s stopped at step %d of %d: run the same command again to resume", name, reached, stage["steps"])
            return STOPPED
        log.info("%s: finished", name)
        log.info("%s", describe_report(name, stage_report(stage["run_dir"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("curriculum", help="a curriculum file, e.g. conf/curriculum/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, e.g. parallel=local")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per stage (torchrun --standalone when > 1)")
    parser.add_argument("--out-dir", default="outputs", help="run directories are OUT_DIR/<run_name>")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--require-healthy", action="store_true",
                        help="start a stage only if the previous one's stage_report.json has no alarm")  # fmt: skip
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    logging.basicConfig(level=logging.INFO, format="[kiln.stages] %(message)s")
    stages = plan(read_curriculum(args.curriculum), Path(args.out_dir).resolve(), args.nproc, args.overrides)
    return run_curriculum(stages, args.dry_run, args.require_healthy)


if __name__ == "__main__":
    sys.exit(main())
