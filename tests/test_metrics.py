"""metrics.jsonl, its truncation on resume, the loss plot, and the wandb mirror (offline)."""

import pytest
import torch

from src.metrics import plot_loss, summary
from src.run.metrics import MetricsLogger, StepWindow, read_metrics, truncate_after


def test_jsonl_rows_truncate_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step, "samples_per_s": 2.0, "tokens_per_s": 100.0, "step_time_s": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    truncate_after(tmp_path, 3)
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 0.5, 1.0 / 3]
    png = plot_loss(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary(tmp_path).startswith("loss 1.0000 (step 1) -> 0.3333 (step 3)")


def test_the_summary_gives_the_runs_mean_throughput_and_labels_the_last_window(tmp_path):
    # steps 1-10 at 1 s a step and 2 samples/s (compilation, a slow start), steps 11-20 at 0.1 s and 20 samples/s:
    # 20 + 20 samples in 10 + 1 seconds, not the last window's 20 samples/s
    logger = MetricsLogger(tmp_path)
    logger.log({"step": 10, "loss": 1.0, "samples_per_s": 2.0, "tokens_per_s": 200.0, "step_time_s": 1.0})
    logger.log({"step": 20, "loss": 0.5, "samples_per_s": 20.0, "tokens_per_s": 2000.0, "step_time_s": 0.1})
    text = summary(tmp_path)
    assert "run mean 3.6 samples/s, 364 tokens/s (last window: 20.0 samples/s, 2000 tokens/s)" in text, text


def test_only_enabled_loggers_write(tmp_path):
    MetricsLogger(tmp_path, enabled=False).log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="no logged steps"):
        (tmp_path / "metrics.jsonl").write_text("")
        plot_loss(tmp_path)


def test_wandb_offline_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, wandb=True, project="kiln-test", config={"steps": 2})
    logger.log({"step": 1, "loss": 0.5})
    logger.close()
    assert read_metrics(tmp_path)[0]["loss"] == 0.5
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_step_window_throughput_and_mfu():
    window = StepWindow(torch.device("cpu"), world_size=2, peak_flops=1e12)
    for _ in range(2):
        window.add(torch.tensor(0.5), data_wait=0.0, samples=4, tokens=400, flops=2e9)
    start = window.start
    row = window.row(step=2, lr=1e-4, grad_norm=torch.tensor(1.0), samples_seen=8)
    elapsed = 2 * row["step_time_s"]
    assert row["loss"] == 0.5 and row["samples_per_s"] == pytest.approx(8 / elapsed)
    assert row["tokens_per_s"] == pytest.approx(800 / elapsed)
    assert row["tflops_per_device"] == pytest.approx(4e9 / elapsed / 2 / 1e12)
    assert row["mfu"] == pytest.approx(4e9 / elapsed / 2 / 1e12)
    assert window.steps == 0 and window.start >= start  # the window restarts after a row
    unknown = StepWindow(torch.device("cpu"))  # no peak for the device: no MFU, never a guessed one
    unknown.add(torch.tensor(0.5), data_wait=0.0, samples=1, tokens=1, flops=1.0)
    assert unknown.row(1, 0.0, 0.0, 1)["mfu"] is None


class _DeviceClock:
    """A fake perf_counter and a fake device: reading a value to the host waits `pending` seconds of queued work."""

    def __init__(self):
        self.now, self.pending = 100.0, 0.0

    def perf_counter(self) -> float:
        return self.now

    def synchronise(self, value: torch.Tensor) -> torch.Tensor:
        self.now += self.pending  # the host blocks until the queued kernels are done
        self.pending = 0.0
        return value


def test_step_window_counts_the_device_work_still_queued_when_it_ends(monkeypatch):
    # a GPU returns from each step's launches at once; its kernels finish later. The window's time must run until
    # the loss read at the row has waited for them, not stop at the last launch.
    import src.run.metrics as metrics

    clock = _DeviceClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(metrics, "all_mean", clock.synchronise)
    window = StepWindow(torch.device("cpu"), world_size=1, peak_flops=1e12)
    for _ in range(2):
        clock.now += 0.1  # the host launches the step's kernels
        clock.pending += 0.9  # ... which the device runs afterwards
        window.add(torch.tensor(0.5), data_wait=0.0, samples=4, tokens=400, flops=2e9)
    row = window.row(step=2, lr=1e-4, grad_norm=torch.tensor(1.0), samples_seen=8)
    assert row["step_time_s"] == pytest.approx(1.0)  # 0.1 s of launches + 0.9 s of device work per step
    assert row["tokens_per_s"] == pytest.approx(800 / 2.0)
    assert row["mfu"] == pytest.approx(4e9 / 2.0 / 1e12)
