"""Training checkpoints: complete model directories plus the state needed to resume exactly.

Layout of ``RUN_DIR/checkpoints/step-000200/``:

- ``config.json``, ``generation_config.json`` + ``model.safetensors`` (or shards + index): transformers' layout, so
  ``AutoModelForCausalLM.from_pretrained`` and :meth:`DiffLlamaForCausalLM.from_pretrained` both load it;
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``: ``AutoTokenizer`` loads them;
- ``trainer_state.pt``: step, optimizer, LR scheduler, data position (the step: batches are a pure function of
  it), metrics so far; ``rng-rank{r}.pt``: each rank's Python, NumPy, torch CPU and CUDA generator states;
- ``train_config.yaml``: the resolved run config.

Writes are atomic: everything goes to ``.tmp-step-000200`` first and is renamed into place when complete (rank 0
renames after every rank wrote its files), so a crash leaves the previous checkpoints intact and at worst a
``.tmp-*`` folder, which the next save removes. After a save only the newest ``keep_last`` checkpoints remain.
Under FSDP2 the full (unsharded) model and optimizer state is gathered to CPU with
``torch.distributed.checkpoint.state_dict``; every rank loads the full state on resume.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from diffllama.hf_format import load_state_dict, pretrained_files, save_state_dict
from diffllama.run_folder import TRAINER_STATE, list_checkpoints
from diffllama.train.data import fcntl, file_in_the_way
from diffllama.train.distributed import DistInfo, barrier

LOCK_FILE = ".lock"  # RUN_DIR/.lock: held by the run writing the folder (lock_run_dir)


class RunDirInUse(ValueError):
    """Another live run holds the run folder's lock."""


def lock_run_dir(run_dir: Path):
    """Create ``run_dir`` if needed and take an exclusive, non-blocking ``flock`` on ``run_dir/.lock``.

    Two runs writing one folder would delete each other's checkpoint staging folders and interleave
    ``metrics.jsonl``; the lock makes the second one stop at once. The OS drops it when the process dies however
    it dies, so a killed run leaves no stale lock (the file itself stays: removing it would let two runs lock two
    different files of the same name). On a filesystem without flock, and on Windows, the run goes on unlocked, as
    the data cache's staging does (:func:`diffllama.train.data._staging`).

    Returns:
        The open lock file: the lock is held until it is closed (or garbage collected).

    Raises:
        RunDirInUse: (a ValueError) another process holds the lock, naming the folder.
        ValueError: the folder cannot be created or written (read-only, no permission), or its ``.lock`` is not a
            regular file.
    """
    lock = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock.exists() and not lock.is_file():  # a folder or a FIFO there would fail or block the open below
            raise ValueError(f"--out {str(run_dir)!r}: {lock} is not a regular file; remove it")
        handle = open(lock, "a")
    except OSError as error:
        raise ValueError(f"--out {str(run_dir)!r} cannot be written: {error}") from None
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunDirInUse(f"--out {str(run_dir)!r} is in use by another run (it holds {run_dir / LOCK_FILE}): "
                              f"wait for that run to end, or choose another --out") from None
        except OSError:  # no flock on this filesystem
            pass
    return handle


def rng_state() -> dict:
    """This process' RNG states: Python, NumPy, torch CPU, and every CUDA device's (if CUDA is initialised)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_train_config(checkpoint: str | os.PathLike) -> dict:
    """The resolved run config saved in ``checkpoint`` (its ``train_config.yaml``) as a dict.

    Raises:
        ValueError: the file is missing or not a mapping (not a checkpoint of ``diffllama train``).
    """
    import yaml

    path = Path(checkpoint) / "train_config.yaml"
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):  # a damaged file: the message below says what to do
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(f"--resume: checkpoint {checkpoint} has no readable train_config.yaml, so its settings "
                         f"are unknown; choose another --out to start a new run{_earlier_hint(Path(checkpoint))}")
    return settings


class SavedCheckpoint(NamedTuple):
    """What :func:`read_checkpoint` reads: the causal LM's weights, ``trainer_state.pt``, and this rank's
    ``rng-rank{r}.pt`` (None when the saved run had fewer processes)."""

    weights: dict
    state: dict
    rng: dict | None


def read_checkpoint(path: str | os.PathLike, rank: int = 0) -> SavedCheckpoint:
    """Read every file of checkpoint ``path`` that resuming on ``rank`` needs, so that a damaged one stops the run
    before any work.

    Raises:
        ValueError: starting with ``--resume:``, naming the file that is missing, truncated or corrupt (and the
            run's earlier checkpoint, if there is one).
    """
    path = Path(path)
    rng_file = path / f"rng-rank{rank}.pt"
    try:
        weights = load_state_dict(path)
        state = _load_dict(path / TRAINER_STATE, ("step", "optimizer", "scheduler"))
        rng = _load_dict(rng_file, ("python", "numpy", "torch")) if rng_file.is_file() else None
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--resume: {error}{_earlier_hint(path)}") from error
    return SavedCheckpoint(weights, state, rng)


def _load_dict(path: Path, keys: tuple[str, ...]) -> dict:
    """``torch.load`` of a checkpoint file written by :func:`save_checkpoint`: a dict holding ``keys``."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or overwritten: EOFError, UnpicklingError, RuntimeError (zip), ValueError
        raise ValueError(f"checkpoint file {path} cannot be read, it is truncated or corrupt "
                         f"({type(error).__name__}: {error})") from error
    if not isinstance(value, dict) or not all(key in value for key in keys):
        raise ValueError(f"checkpoint file {path} is corrupt: expected a dict with {', '.join(keys)}")
    return value


def _earlier_hint(checkpoint: Path) -> str:
    """How to resume from the run's newest checkpoint before ``checkpoint`` (--resume takes the newest), or ""."""
    found = list_checkpoints(checkpoint.parent.parent)  # in step order
    names = [p.name for p in found]
    if checkpoint.name not in names or names.index(checkpoint.name) == 0:
        return ""
    return (f"; the run's earlier checkpoint {found[names.index(checkpoint.name) - 1]} remains: move {checkpoint} out "
            f"of {checkpoint.parent} and --resume continues from it")


def saved_world_size(checkpoint: str | os.PathLike) -> int:
    """Processes of the run that wrote ``checkpoint``: each rank saves its own ``rng-rank{r}.pt``."""
    return len(list(Path(checkpoint).glob("rng-rank*.pt"))) or 1


def is_run_dir(folder: str | os.PathLike) -> bool:
    """True for a folder that a run wrote: its ``config.yaml`` with ``metrics.jsonl`` or ``checkpoints/`` (a run
    writes config.yaml and metrics.jsonl before its first step)."""
    folder = Path(folder)
    return (folder / "config.yaml").is_file() and ((folder / "metrics.jsonl").is_file()
                                                   or (folder / "checkpoints").is_dir())


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Refuse, before any work, an ``--out`` that cannot be a run folder: a file, a path under a file, or an
    existing folder that is neither empty nor a run's (a run would write its files among someone else's).

    Raises:
        ValueError: naming --out, the folder and what is expected.
    """
    run_dir = Path(run_dir)
    expected = "a new or empty folder, or an existing run's folder with --resume"
    blocker = file_in_the_way(run_dir)
    if blocker is not None:
        where = "is a file" if blocker == run_dir else f"cannot be created: {blocker} is a file"
        raise ValueError(f"--out {str(run_dir)!r} {where}, expected a run folder ({expected})")
    # The lock file alone is what a run refused or failed before its first write leaves (lock_run_dir).
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not is_run_dir(run_dir):
        raise ValueError(f"--out {str(run_dir)!r} is an existing folder that is not a run folder (no config.yaml "
                         f"with metrics.jsonl or checkpoints/), expected {expected}")


def full_state_dicts(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, fsdp: bool):
    """(model state dict, optimizer state dict) of the *training module*, unsharded, on CPU under FSDP2.

    Keys of the model state dict are the module's own (e.g. ``model.model.layers.0...`` for the training wrapper).
    Under FSDP2 this is a collective: every rank must call it.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(module, options=options)
        optim_sd = get_optimizer_state_dict(module, optimizer, options=options) if optimizer else None
        return model_sd, optim_sd
    return module.state_dict(), (optimizer.state_dict() if optimizer else None)


def write_model_dir(directory: Path, state: dict[str, torch.Tensor], model, tokenizer) -> None:
    """Write what ``save_pretrained`` writes (config.json, generation_config.json, safetensors in transformers'
    layout) and the tokenizer files into ``directory``.

    ``state``: the causal LM's state dict (``model.*``, ``lm_head.weight``); the tied ``lm_head.weight`` is left out
    as transformers does. ``model``: the :class:`DiffLlamaForCausalLM` (its config and class name are written).
    """
    state, files = pretrained_files(model, state)
    save_state_dict(state, directory, extra_files=files)
    tokenizer.save_pretrained(directory)


def save_checkpoint(run_dir: Path, step: int, *, module, model, optimizer, scheduler, tokenizer, config_yaml: str,
                    info: DistInfo, fsdp: bool, keep_last: int, extra: dict | None = None) -> Path:
    """Save a resumable checkpoint of step ``step`` atomically and prune to the newest ``keep_last``.

    Collective under distributed training: every rank must call it. Returns the checkpoint path.

    Args:
        module: the training module as trained (possibly FSDP-sharded; DDP wrappers must be unwrapped).
        model: the :class:`DiffLlamaForCausalLM` inside it (``module.model``).
        extra: JSON-able values stored in ``trainer_state.pt`` (e.g. metrics so far).
    """
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step-{step:06d}"
    staging = folder / f".tmp-step-{step:06d}"
    model_sd, optim_sd = full_state_dicts(module, optimizer, fsdp)
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
    barrier(info)
    try:
        torch.save(rng_state(), staging / f"rng-rank{info.rank}.pt")
        if info.is_main:
            prefix = "model."
            lm_state = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
            write_model_dir(staging, lm_state, model, tokenizer)
            torch.save({"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                        "world_size": info.world_size, "extra": extra or {}}, staging / TRAINER_STATE)
            (staging / "train_config.yaml").write_text(config_yaml)
    except BaseException:
        if info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier(info)
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: Path, *, module, optimizer, scheduler, info: DistInfo, fsdp: bool,
                    saved: SavedCheckpoint | None = None) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG state from checkpoint ``path``.

    Args:
        saved: the checkpoint's files as :func:`read_checkpoint` read them (default: read them now).

    Returns:
        The ``trainer_state.pt`` dict (``step``, ``extra``, ...).

    Raises:
        ValueError: a missing or damaged file (:func:`read_checkpoint`); weights that do not match the model.
    """
    weights, state, rng = saved or read_checkpoint(path, info.rank)
    model_sd = {f"model.{k}": v for k, v in weights.items()}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        target = module.state_dict()
        if "model.lm_head.weight" in target and "model.lm_head.weight" not in model_sd:
            model_sd["model.lm_head.weight"] = model_sd["model.model.embed_tokens.weight"]
        options = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(module, model_sd, options=options)
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)
    else:
        missing, unexpected = module.load_state_dict(model_sd, strict=False)
        missing = [k for k in missing if not (k == "model.lm_head.weight" and module.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if rng is not None:
        set_rng_state(rng)
    return state
