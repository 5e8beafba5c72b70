"""``shardstore plot``: a run's training loss and evaluation curves as one PNG (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from shardstore.errors import ConfigError
from shardstore.kd.metrics import read_metrics


def plot_run(run_dir: Path, output: Path | None = None) -> Path:
    """Write ``output`` (default ``RUN_DIR/curves.png``): loss per logged step, and eval metrics per epoch."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass the run directory of a `shardstore train` run")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("shardstore plot needs matplotlib; install it with `pip install matplotlib`") from None
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r.get("kind") == "step" and r.get("loss") is not None]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], label="train loss", lw=1)
        for part in ("kd", "ce", "feature"):
            if any(part in r for r in steps):
                ax_loss.plot([r["global_step"] for r in steps if part in r], [r[part] for r in steps if part in r],
                             label=part, lw=0.8, alpha=0.7)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for key, label in (("eval_top1", "student top-1"), ("eval_agreement", "agreement with teacher"),
                       ("eval_teacher_top1", "teacher top-1")):
        points = [(r["epoch"] + 1, r[key]) for r in epochs if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_title("evaluation")
    if ax_acc.lines:
        ax_acc.legend()
    fig.tight_layout()
    output = output or run_dir / "curves.png"
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
