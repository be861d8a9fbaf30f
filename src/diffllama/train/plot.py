"""``diffllama plot RUN_DIR``: loss curves of a run from its ``metrics.jsonl``, drawn with matplotlib to PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``, in file order.

    Raises:
        FileNotFoundError: no metrics file. ValueError: a line that is not JSON, or no records.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {str(run_dir)!r} a run folder of `diffllama train`?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from error
    if not records:
        raise ValueError(f"{path} holds no records yet")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot training loss and validation loss (nats/token, left) and the learning rate (right) against steps.

    Returns:
        The PNG path (default ``RUN_DIR/loss.png``).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_metrics`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss: {Path(run_dir).resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
