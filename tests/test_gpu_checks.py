"""launch/gpu_checks.sh itself, run with --dry-run on the CPU at tiny shapes (so CI runs the GPU script), and the
report it writes into BENCHMARKS.md (src/gpu_report.py)."""

import subprocess

import pytest
import torch

from src.gpu_report import BEGIN, END, gpu_test_results, read_steps, write_section
from tests.conftest import ROOT, clean_env

STEPS = [
    "GPU tests",
    "speed at 8.4k tokens, profiled",
    "speed at 19k tokens, every block checkpointed",
    "engines at 8.4k tokens: ZeRO-3 and FSDP2",
]


def test_gpu_checks_dry_run_writes_its_report_into_a_copy_of_the_page(tmp_path):
    env = clean_env() | {"OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "launch/gpu_checks.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(name, rc) for name, rc, _ in read_steps(tmp_path / "steps.tsv")] == [(s, 0) for s in STEPS]
    page = (tmp_path / "BENCHMARKS.md").read_text()
    section = page[page.index(BEGIN) : page.index(END)]
    for line in ("| device | CPU (", f"| torch | {torch.__version__} |", "| deepspeed | ", "| driver | ", "| date | "):
        assert line in section, line
    assert "`tests/test_gpu.py`: 0 passed, 0 failed" in section  # collected and skipped on a CPU, none failing
    kiln = [line for line in section.splitlines() if "| Kiln (DeepSpeedEngine, bf16, 1 rank) |" in line]
    baseline = [line for line in section.splitlines() if "| diffusers FluxTransformer2DModel" in line]
    assert len(baseline) == 2  # both shapes, Kiln against the baseline, and ZeRO-3 again in the engines' run
    assert sorted(line.split(":")[0] for line in kiln) == ["| 19k", "| 8k", "| engines"]
    assert any(line.startswith("| 8k: 32 video + 8 text tokens") for line in kiln)
    assert any(line.startswith("| 19k: 48 video") for line in kiln)
    assert any(line.startswith("| engines: 32 video") and "| Kiln (FSDP2Engine, bf16, 1 rank) |" in line
               for line in section.splitlines())  # fmt: skip
    assert "Where a step's time goes at 8k" in section and "| matmul |" in section
    shipped = (ROOT / "docs/BENCHMARKS.md").read_text()
    assert outside_markers(page) == outside_markers(shipped)  # only the section between the markers was written
    assert "on CPU (" not in shipped  # the dry run leaves docs/ alone


def outside_markers(page: str) -> str:
    return page.split(BEGIN)[0] + page.split(END)[1]


def test_the_report_goes_between_the_markers_or_nowhere(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    write_section(page, f"{BEGIN}\nnew\n{END}")
    assert page.read_text() == f"before\n{BEGIN}\nnew\n{END}\nafter\n"
    page.write_text("a page without markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        write_section(page, f"{BEGIN}\nnew\n{END}")


def test_gpu_test_results_name_failures_and_group_skips(tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase name="test_a"/>'
        '<testcase name="test_b"><failure message="AssertionError: 0.3 &gt; 0.02&#10;more">trace</failure></testcase>'
        '<testcase name="test_c"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase name="test_d"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    results = gpu_test_results(junit)
    assert (results["passed"], results["failed"], results["skipped"]) == (1, 1, 2)
    assert results["details"] == ["failed: `test_b` AssertionError: 0.3 > 0.02", "skipped (2): needs a CUDA device"]
    assert gpu_test_results(tmp_path / "missing.xml")["details"] == ["no test report (the test step did not run)"]
