"""`python -m src.metrics RUN_DIR`: a run's summary, `loss.png` and `learning.png` from its metrics.jsonl.

The rows are written by src/run/metrics.py during training.
"""

from __future__ import annotations

from pathlib import Path

from src.run.metrics import read_metrics


def plot_loss(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curve of a run as a PNG (default RUN_DIR/loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no logged steps in metrics.jsonl")
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE of velocity)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_learning(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """RUN_DIR/learning.png: training loss (and its timestep bins), validation loss by timestep bin, probe gaps
    with their standard errors, and sample-health ratios, over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, eval_rows = read_metrics(run_dir), read_metrics(run_dir, "eval")
    if not train_rows:
        raise ValueError(f"{run_dir} has no logged steps in metrics.jsonl")
    out = Path(out) if out else Path(run_dir) / "learning.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], color="k", label="train loss")
    ax.set_yscale("log")
    ax.set_title("training loss")
    val = [r for r in eval_rows if "val_loss_by_t" in r]
    ax = axes[0, 1]
    if val:
        bins = len(val[0]["val_loss_by_t"])
        for k in range(bins):
            label, colour = f"t in [{k / bins:.2f}, {(k + 1) / bins:.2f})", plt.cm.viridis(k / max(bins - 1, 1))
            ax.plot([r["step"] for r in val], [r["val_loss_by_t"][k] for r in val], ".-", color=colour, label=label)
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    ax.set_title("validation loss by timestep bin")
    ax = axes[1, 0]
    for name in ("time", "order", "text", "empty"):
        pts = [r for r in val if r.get(f"probe_{name}_gap") is not None]
        if pts:
            ax.errorbar([r["step"] for r in pts], [r[f"probe_{name}_gap"] for r in pts],
                        yerr=[r[f"probe_{name}_se"] for r in pts], marker=".", capsize=2, label=name)  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title("probe gaps (relative to the validation loss, +- 1 se)")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    health = [r for r in eval_rows if r.get("health")]
    for name in health[0]["health"] if health else []:
        ax.plot([r["step"] for r in health], [r["health"][name] for r in health], marker=".", label=name)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_title("sample health: ratio to the data")
    if health:
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def run_throughput(rows: list[dict]) -> tuple[float, float]:
    """(samples/s, tokens/s) over all logged windows: their samples and tokens over their time (each row's window
    covers the steps since the previous row, `step_time_s` each), not the mean of the windows' rates."""
    seconds = samples = tokens = 0.0
    previous = 0
    for row in rows:
        window = (row["step"] - previous) * row["step_time_s"]
        seconds, previous = seconds + window, row["step"]
        samples += row["samples_per_s"] * window
        tokens += row["tokens_per_s"] * window
    return samples / seconds, tokens / seconds


def summary(run_dir: str | Path) -> str:
    """One line: first and last logged loss, the run's mean throughput and the last window's."""
    rows = read_metrics(run_dir)
    first, last = rows[0], rows[-1]
    samples_per_s, tokens_per_s = run_throughput(rows)
    return (
        f"loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
        f"run mean {samples_per_s:.1f} samples/s, {tokens_per_s:.0f} tokens/s "
        f"(last window: {last['samples_per_s']:.1f} samples/s, {last['tokens_per_s']:.0f} tokens/s)"
    )


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m src.metrics RUN_DIR   (writes RUN_DIR/loss.png, learning.png; prints a summary)")
    print(f"{plot_loss(sys.argv[1])}, {plot_learning(sys.argv[1])}: {summary(sys.argv[1])}")
