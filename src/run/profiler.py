"""Where the time of a training step goes: `profile.steps=N` profiles N steps from `profile.start`.

Every rank runs `torch.profiler` over those steps and writes `RUN_DIR/profile/breakdown_rank<r>.json` (and, with
`profile.trace=true`, a Chrome trace `trace_rank<r>.json`); rank 0 logs the table. Time is put into categories by
op and kernel name (`categorize`): attention, matmul, communication, optimizer, memory copies, other ops, and
host time (Python, module hooks, the autograd engine: time inside profiled ranges that no op accounts for). On a
GPU the categories are kernel time and "GPU idle" is the step's wall time no kernel covers, which is what host
overhead and synchronisation cost; on a CPU they are the ops' own (self) time, and the step's wall time no event
covers is its own line.

Each event is counted once, on its own device: with kineto a CPU op's device time is the time of the kernels it
launched, which also appear as events of their own; and a GPU user annotation (the profiler's step ranges) spans
kernels. So on a GPU only kernel, memcpy and memset events count, and on a CPU only CPU events.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("kiln.train")

# (category, lower-case name fragments); the first match wins
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "aten::mm", "aten::addmm", "aten::bmm", "cublas", "cutlass", "xmma", "nvjet")),
    (
        "communication",
        (
            "nccl",
            "gloo",
            "all_gather",
            "allgather",
            "reduce_scatter",
            "all_reduce",
            "allreduce",
            "all_to_all",
            "alltoall",
            "broadcast",
            "c10d",
        ),
    ),
    ("optimizer", ("adam", "optimizer")),
    (
        "memory copies",
        (
            "memcpy",
            "memset",
            "aten::copy_",
            "aten::_to_copy",
            "aten::empty",
            "aten::zero_",
            "aten::fill_",
            "aten::cat",
            "aten::clone",
        ),
    ),
)
HOST = "host (Python, hooks, autograd engine)"
OUTSIDE = "outside any op (Python, data decoding)"
TOP_OPS = 12  # the ops (kernels on a GPU) with the most time, kept in the report


def categorize(name: str, kernel: bool) -> str:
    """The category of a profiler event: by name; an unmatched aten op or GPU kernel is "other ops", any other
    unmatched event (a step range, an autograd node, a hook's range) is host time."""
    lower = name.lower()
    for category, fragments in CATEGORIES:
        if any(f in lower for f in fragments):
            return category
    return "other ops (elementwise, norms, reductions)" if kernel or lower.startswith("aten::") else HOST


def own_seconds(event, on_gpu: bool) -> float:
    """The time an event of `profile.key_averages()` spent itself on the profiled device, counted once: a GPU
    kernel's (or copy's) duration on a GPU, a CPU event's self time on a CPU; 0 for everything else."""
    if on_gpu:
        kernel = event.device_type == DeviceType.CUDA and not event.is_user_annotation
        return event.self_device_time_total / 1e6 if kernel else 0.0  # microseconds -> seconds
    return event.self_cpu_time_total / 1e6 if event.device_type == DeviceType.CPU else 0.0


def breakdown(events, steps: int, wall_s: float, device: torch.device) -> dict:
    """Seconds per step by category from `profile.key_averages()`, with their share of the step's wall time."""
    on_gpu = device.type == "cuda"
    seconds: dict[str, float] = defaultdict(float)
    ops = []
    for e in events:
        own = own_seconds(e, on_gpu)
        if own > 0:
            category = categorize(e.key, kernel=on_gpu)
            seconds[category] += own / steps
            ops.append({"name": e.key, "category": category, "seconds_per_step": own / steps, "calls": e.count})
    step_s = wall_s / steps
    # the rest of the step: on a GPU no kernel covers it (the GPU waits for the host); on a CPU no op does
    seconds["GPU idle" if on_gpu else OUTSIDE] = max(step_s - sum(seconds.values()), 0.0)
    ordered = dict(sorted(seconds.items(), key=lambda kv: -kv[1]))
    return {
        "device": str(device),
        "steps": steps,
        "step_time_s": step_s,
        "seconds_per_step": ordered,
        "fraction_of_step": {k: v / step_s for k, v in ordered.items()},
        "top_ops": sorted(ops, key=lambda op: -op["seconds_per_step"])[:TOP_OPS],
    }


def table(report: dict) -> str:
    lines = [f"where a step's {report['step_time_s']:.4g} s go ({report['steps']} steps on {report['device']}):"]
    for category, s in report["seconds_per_step"].items():
        lines.append(f"  {category:<42} {s * 1e3:10.2f} ms  {report['fraction_of_step'][category]:6.1%}")
    lines.append("the ops with the most time:")
    for op in report["top_ops"]:
        name = op["name"] if len(op["name"]) <= 60 else op["name"][:57] + "..."
        lines.append(
            f"  {name:<60} {op['seconds_per_step'] * 1e3:10.2f} ms  {op['calls'] / report['steps']:6.0f} calls"
        )
    return "\n".join(lines)


class StepProfiler:
    """Profiles the steps [start, start + steps) of the loop; `at(step)` is called before each step and at the
    end (with the number of steps done so far). A no-op when `steps` is 0."""

    def __init__(
        self, run_dir: Path, rank: int, device: torch.device, steps: int = 0, start: int = 10, trace: bool = False
    ):
        if steps < 0 or start < 0:
            raise ValueError(f"profile.steps and profile.start must be >= 0, got {steps} and {start}")
        self.dir, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self.first, self.last, self.trace = start, start + steps, trace
        self.prof: profile | None = None
        self.t0 = 0.0
        self.begun = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def at(self, step: int, final: bool = False) -> None:
        if self.prof is None and not final and self.first <= step < self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self._sync()
            self.prof.__enter__()
            self.t0, self.begun = time.perf_counter(), step
        elif self.prof is not None and (step >= self.last or final):
            self._sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self._write(step - self.begun, wall)
            self.prof = None
        elif self.prof is not None:
            self.prof.step()

    def _write(self, steps: int, wall: float) -> None:
        if steps == 0:
            return
        report = breakdown(self.prof.key_averages(), steps, wall, self.device)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"breakdown_rank{self.rank}.json").write_text(json.dumps(report, indent=2))
        if self.trace:
            self.prof.export_chrome_trace(str(self.dir / f"trace_rank{self.rank}.json"))
        if self.rank == 0:
            log.info("%s", table(report))
