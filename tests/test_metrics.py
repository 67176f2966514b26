"""metrics.jsonl, its truncation on resume, the loss plot, and the wandb mirror (offline)."""

import pytest

from src.metrics import MetricsLogger, plot_loss, read_metrics, summary, truncate_after


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
