"""The layout of a ``diffllama train`` run folder, as far as loading a model needs it: the final model in
``RUN_DIR/model``, resumable checkpoints in ``RUN_DIR/checkpoints/step-NNNNNN`` (complete once ``trainer_state.pt``
is there). A core module, so that the loaders can name the folder to give instead of a run folder without importing
training code; :mod:`diffllama.train.checkpoint` writes this layout."""

from __future__ import annotations

import os
import re
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those holding ``trainer_state.pt``), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
             and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def run_folder_hint(folder: str | os.PathLike) -> str:
    """'; ... looks like a training run folder ...' naming the model to load instead, when ``folder`` is a
    `diffllama train` run folder (which holds no config.json itself); else ''."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return ""
    if (folder / "model" / "config.json").is_file():
        return f"; {folder} looks like a training run folder: its final model is in {folder / 'model'}"
    latest = latest_checkpoint(folder)
    if latest is not None:
        return f"; {folder} looks like an unfinished training run folder: its newest checkpoint is {latest}"
    return ""
