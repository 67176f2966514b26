"""Writes what `launch/gpu_checks.sh` measured into docs/BENCHMARKS.md, between its markers:

    python -m src.gpu_report OUT_DIR DOC

OUT_DIR holds the script's results: `steps.tsv` (each step's name, exit status and seconds), `gpu_tests.xml`
(pytest's JUnit report of tests/test_gpu.py) and `speed_*.json` (`python -m src.bench --json`). The section gets
the device, driver and library versions, the date, the test results, the speed table and the profile, so a GPU
run fills the page itself and nothing is copied by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

from src.cli import HelpFormatter

BEGIN = "<!-- gpu_checks: begin (written by launch/gpu_checks.sh; edits inside are overwritten) -->"
END = "<!-- gpu_checks: end -->"
LIBRARIES = ("deepspeed", "flash-attn", "diffusers", "transformers")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "n/a (no nvidia-smi)"
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    return out.splitlines()[0] if out else "n/a"


def environment() -> dict[str, str]:
    """Device, driver, library versions and date of this machine, as the report states them."""
    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}), no CUDA device",
        "memory": f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB" if cuda else "n/a",
        "driver": _driver(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda or "n/a",
        "cuDNN": str(torch.backends.cudnn.version()) if cuda else "n/a",
        "NCCL": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "n/a",
        "Python": platform.python_version(),
    }
    env |= {name: _version(name) for name in LIBRARIES}
    env["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env


def read_steps(path: Path) -> list[tuple[str, int, int]]:
    """The script's steps: (name, exit status, seconds); 124 is a step stopped by its time limit."""
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [(name, int(rc), int(seconds)) for name, rc, seconds in rows]


def gpu_test_results(junit: Path) -> dict:
    """Counts from pytest's JUnit XML, each failed test named with its message, the skipped ones grouped by reason."""
    if not junit.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0, "details": ["no test report (the test step did not run)"]}
    counts, failed, skipped = {"passed": 0, "failed": 0, "skipped": 0}, [], Counter()
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        message = ((outcome.get("message") or "").splitlines() or [""])[0][:200] if outcome is not None else ""
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skipped[message] += 1
        else:
            counts["failed"] += 1
            failed.append(f"failed: `{case.get('name')}` {message}".rstrip())
    details = failed + [f"skipped ({n}): {reason}" for reason, n in skipped.most_common()]
    return counts | {"details": details}


def _fmt_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{mfu:.1%}"


def speed_table(reports: dict[str, dict]) -> str:
    """One row per run of each `src.bench` report, labelled by shape, with the Kiln / baseline ratio."""
    lines = [
        "| shape | run | tokens/s/device | MFU | TFLOP/s/device | step time s | peak memory GB | Kiln / baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, report in reports.items():
        tokens = report["tokens_per_sample"]
        shape = f"{label}: {tokens['video']:,} video + {tokens['text']} text tokens, batch {report['batch_per_rank']}"
        ratio = report.get("ratio_kiln_over_baseline")
        for i, (name, r) in enumerate(report["results"].items()):
            share = "" if ratio is None else (f"{ratio:.2f}x" if i == 0 else "1.00x")
            lines.append(
                f"| {shape} | {name} | {r['tokens_per_s_per_device']:,.0f} | {_fmt_mfu(r['mfu'])} | "
                f"{r['tflops_per_device']:.3g} | {r['step_time_s']:.4g} | {r['peak_mem_gb']:.2f} | {share} |"
            )
    return "\n".join(lines)


def profile_table(profile: dict) -> str:
    lines = ["| category | ms per step | share of the step |", "|---|---:|---:|"]
    for category, seconds in profile["seconds_per_step"].items():
        lines.append(f"| {category} | {seconds * 1e3:.2f} | {profile['fraction_of_step'][category]:.1%} |")
    return "\n".join(lines)


def section(env: dict[str, str], steps: list[tuple[str, int, int]], tests: dict, reports: dict[str, dict]) -> str:
    """The markdown between the markers."""
    out = [BEGIN, "", f"Measured by `bash launch/gpu_checks.sh` on {env['device']}, {env['date']}.", ""]
    out += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in env.items()), ""]
    out.append("Steps of the script (exit status 124: stopped by its time limit; 125: not started, over budget):")
    out += ["", "| step | exit status | seconds |", "|---|---:|---:|"]
    out += [f"| {name} | {rc} | {seconds} |" for name, rc, seconds in steps] + [""]
    out.append(f"`tests/test_gpu.py`: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped.")
    out += [""] + [f"- {d}" for d in tests["details"]] + ([""] if tests["details"] else [])
    if reports:
        out += ["Training speed (`python -m src.bench`, medians over the log windows after the first):", ""]
        out += [speed_table(reports), ""]
        for label, report in reports.items():
            if report.get("profile"):
                out += [f"Where a step's time goes at {label} (`--profile`, {report['profile']['device']}):", ""]
                out += [profile_table(report["profile"]), ""]
    else:
        out += ["No speed figures: the benchmark steps wrote no report.", ""]
    return "\n".join([*out, END])


def write_section(doc: Path, text: str) -> None:
    """Replace what lies between the markers of `doc` (both included) by `text`."""
    page = doc.read_text()
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{doc} lacks the markers {BEGIN!r} ... {END!r} that say where the GPU results go")
    doc.write_text(page[:start] + text + page[end + len(END) :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the script's results folder")
    parser.add_argument("doc", type=Path, help="the page to write into (docs/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    found = {
        path.stem.removeprefix("speed_"): json.loads(path.read_text()) for path in args.out_dir.glob("speed_*.json")
    }
    reports = dict(sorted(found.items(), key=lambda kv: kv[1]["tokens_per_sample"]["video"]))  # shortest first
    steps = read_steps(args.out_dir / "steps.tsv")
    text = section(environment(), steps, gpu_test_results(args.out_dir / "gpu_tests.xml"), reports)
    write_section(args.doc, text)
    print(f"wrote the GPU results into {args.doc}")


if __name__ == "__main__":
    main()
