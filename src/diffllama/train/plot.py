"""``diffllama plot RUN_DIR [RUN_DIR ...]``: loss curves of runs from their ``metrics.jsonl``, drawn with matplotlib to
PNG; several runs share the axes (e.g. the tiny trio of three architectures)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from diffllama.io import atomic_write
from diffllama.train.metrics import read_metrics_file


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``, in file order (a last line cut short is left out with a note on
    stderr: a run still writing it, or one killed mid-write).

    Raises:
        FileNotFoundError: no metrics file. ValueError: a line that is not a record (naming file and line, see
        :func:`~diffllama.train.metrics.read_metrics_file`), or no records.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {str(run_dir)!r} a run folder of `diffllama train`?")
    records, note = read_metrics_file(path)
    if note:
        print(note, file=sys.stderr)
    if not records:
        raise ValueError(f"{path} holds no records yet")
    return records


def plot_path(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """The image file :func:`plot_run` writes for ``out``: ``RUN_DIR/loss.png`` without ``out``; ``out/loss.png``
    for a folder (an existing one, or a path ending in a separator); ``out`` with ``.png`` added when it has no
    suffix; else ``out`` in the format of its suffix (``.png``, ``.pdf``, ``.svg``, ... as matplotlib writes).

    Raises:
        ValueError: naming --out: a suffix matplotlib cannot write, or a folder that does not exist.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if not out:
        return Path(run_dir) / "loss.png"
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        path = path / "loss.png"
    elif not path.suffix:  # matplotlib would add .png itself: name the file it writes
        path = path.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--out {str(out)!r}: matplotlib cannot write {path.suffix!r} files; expected a .png path "
                         f"(or another format matplotlib writes: .pdf, .svg, ...) or a folder")
    if not path.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: the folder {str(path.parent)!r} does not exist")
    return path


def plot_run(run_dir: str | Path | list, out: str | Path | None = None) -> Path:
    """Plot training loss and validation loss (nats/token, left) and the learning rate (right) against steps.

    Args:
        run_dir: a run folder, or a list of them: each run's curves in a colour of its own, labelled with the
            folder's name and the last validation loss.
        out: where to write the image, as :func:`plot_path` resolves it (default ``RUN_DIR/loss.png``; needed for
            several runs).

    Returns:
        The path of the image written: written whole (a temp file renamed into place), so a reader such as an image
        viewer refreshing it never sees a half-written file.

    Raises:
        FileNotFoundError / ValueError: as :func:`plot_path` (checked first) and :func:`read_metrics`; ValueError
            for several runs without ``out``, or none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
    if not runs or (len(runs) > 1 and not out):
        raise ValueError("give one run folder, or several with --out (the image they share)" if runs else
                         "give at least one run folder")
    path = plot_path(runs[0], out)
    every_run = [(run, read_metrics(run)) for run in runs]  # all read before drawing: a bad one draws nothing
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (run, records) in enumerate(every_run):
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
        name, color = Path(run).resolve().name, f"C{index}"
        prefix = f"{name} " if len(runs) > 1 else ""
        if train:
            ax.plot(*zip(*train), label=f"{prefix}train", linewidth=1, color=color, alpha=0.6 if val else 1)
        if val:
            ax.plot(*zip(*val), "o-", label=f"{prefix}validation ({val[-1][1]:.4f})", linewidth=1.5, color=color)
        if lr:
            ax_lr.plot(*zip(*lr), color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss: {', '.join(Path(run).resolve().name for run in runs)}")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    try:  # the temp file's name has no image suffix: the format is the target's
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:].lower()))
    finally:
        plt.close(fig)
    return path
