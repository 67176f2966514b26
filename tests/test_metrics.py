"""metrics.jsonl, its truncation on resume, the loss plot, and the wandb mirror (offline)."""

import pytest
import torch

from src.metrics import MetricsLogger, StepWindow, plot_loss, read_metrics, summary, truncate_after


def test_jsonl_rows_truncate_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 1.0 / step, "samples_per_s": 2.0, "tokens_per_s": 100.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    truncate_after(tmp_path, 3)
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 0.5, 1.0 / 3]
    png = plot_loss(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary(tmp_path).startswith("loss 1.0000 (step 1) -> 0.3333 (step 3)")


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
