"""The training configuration: one dataclass, filled from a preset, then a YAML/TOML file, then CLI flags.

Precedence (later wins): the preset (:mod:`diffllama.presets`) < the config file < explicit CLI flags. The file
holds top-level ``TrainConfig`` fields plus an optional ``model:`` mapping of ``DiffLlamaConfig`` fields, e.g.::

    preset: tiny
    max_steps: 300
    data: [corpus/]
    model: {num_hidden_layers: 2}

The architecture is the model field ``model_type`` (``model: {model_type: diffllama_v2}`` in a file; ``diffllama
train --arch diffllama-v2`` on the command line): it picks the preset's trio member
(:func:`diffllama.presets.get_preset`). With ``init_from`` (``--init-from DIR``) the model is the checkpoint's
instead of the preset's: its config.json gives every model field, and a model field given in the file or flags
must agree with it.

The resolved config is written to ``RUN_DIR/config.yaml`` and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffllama.config import ARCHITECTURES, MODEL_TYPE
from diffllama.presets import get_preset

DTYPES = ("auto", "float32", "bfloat16")
PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """Every setting of a training run. Units: steps are optimizer steps; sizes are in tokens or sequences.

    Fields (the dataclass defaults below are generic ones, not a preset's: ``TrainConfig()`` trains a
    ``DiffLlamaConfig()``-default model, about 1 B parameters, for 600 steps. :func:`resolve_config` starts from a
    preset, ``tiny`` by default, whose ``train`` and ``model`` fields replace these; use it, not the bare dataclass,
    for a run like ``diffllama train``'s):
        preset: the preset the run started from (informational once resolved).
        model: ``DiffLlamaConfig`` fields; ``vocab_size: None`` = tokenizer vocabulary rounded up to 64;
            ``model_type`` ("diffllama", "diffllama_v2", "llama") is the architecture.
        init_from: a checkpoint folder (a model directory or hub repo id) whose weights start this run (step 0, a
            fresh optimizer); its config.json gives the model fields and its tokenizer is used. Empty = random
            weights of the ``model`` fields.
        data: text files (.txt, .md, .text, .rst: one document each), JSON Lines files (.jsonl, .json: one object
            per line, text in ``text_field``), any of them optionally .gz, or folders of them; empty = the bundled
            State of the Union corpus. A run stores them as absolute paths.
        text_field: the JSON key holding a document's text in JSONL inputs.
        tokenizer: a directory holding a tokenizer (a checkpoint or ``save_pretrained`` output) to reuse; empty =
            train a byte-level BPE of ``tokenizer_vocab_size`` tokens on the training data.
        val_fraction: share of documents held out for validation (at least one document each side).
        cache_dir: where tokenized shards are cached; empty = ``$DIFFLLAMA_CACHE`` or ``~/.cache/diffllama``.
        seq_len: tokens per training sequence. batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches per optimizer step. Global batch = batch_size × grad_accum × world size.
        max_steps: optimizer steps in the run. lr: peak learning rate. min_lr_ratio: final lr / peak lr.
        warmup_steps: linear warm-up steps, then cosine decay to ``lr × min_lr_ratio`` at ``max_steps``.
        weight_decay, beta1, beta2, adam_eps: AdamW (decay is not applied to norms, biases and λ vectors).
        grad_clip: max global gradient L2 norm (0 = off).
        eval_every, eval_batches: validation every N steps (and at the end) on this many batches.
        log_every: steps between progress/metrics lines. save_every: steps between checkpoints (0 = end only).
        keep_last: checkpoints kept (older ones are deleted).
        seed: seeds weights, data order and dropout, in [0, 2**64 - 1]. device: "auto", "cpu", "cuda".
        dtype: "auto" (bfloat16 autocast on CUDA, float32 on CPU), "float32" or "bfloat16" (autocast).
        compile: ``torch.compile`` each decoder layer. activation_checkpointing: recompute layer activations.
        document_mask: attend only within each document of a packed row, split at the EOS separators, with RoPE
            positions restarting per document (:class:`diffllama.train.loop.TrainModule`); validation too.
        parallel: "auto" (DDP when launched with several processes), "none", "ddp", "fsdp" (FSDP2).
        loss_chunk_size: tokens per chunk of the fused LM head + cross-entropy (0 = automatic).
        num_threads: CPU threads for torch (0 = torch's default).
        tensorboard: also write TensorBoard events when the package is installed.

    Raises:
        ValueError: naming the field, for any value out of range or of the wrong type.
    """

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""
    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str = ""
    tokenizer_vocab_size: int = 4096
    val_fraction: float = 0.02
    cache_dir: str = ""
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    seed: int = 1234
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    document_mask: bool = False
    parallel: str = "auto"
    loss_chunk_size: int = 0
    num_threads: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ValueError naming the first bad one."""
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every",
                    "keep_last", "tokenizer_vocab_size")
        non_negative = ("warmup_steps", "save_every", "loss_chunk_size", "num_threads", "seed")
        for names, least, kind in ((positive, 1, "positive"), (non_negative, 0, "non-negative")):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
        if self.seed >= 1 << 64:  # torch.manual_seed takes an unsigned 64-bit seed (numpy and random any size)
            raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed}")
        if self.tokenizer_vocab_size < 300:
            raise ValueError(f"tokenizer_vocab_size must be >= 300 (256 bytes + special tokens + merges), "
                             f"got {self.tokenizer_vocab_size}")
        # name: (test, the expected value as the message states it)
        ranges = {"lr": (lambda v: v > 0, "a number > 0 (the peak learning rate, e.g. 0.003)"),
                  "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1] (final lr / peak lr)"),
                  "weight_decay": (lambda v: v >= 0, "a number >= 0"),
                  "beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
                  "beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
                  "adam_eps": (lambda v: v > 0, "a number > 0"),
                  "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
                  "val_fraction": (lambda v: 0 < v < 1, "a number with 0 < val_fraction < 1 (the share of "
                                                        "documents held out for validation, e.g. 0.02)")}
        for name, (ok, expected) in ranges.items():
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or not ok(value)):
                raise ValueError(f"{name} must be {expected}, got {value!r}{_yaml_number_hint(value)}")
        for name in ("preset", "text_field", "tokenizer", "cache_dir", "init_from"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("compile", "activation_checkpointing", "document_mask", "tensorboard"):
            if not isinstance(getattr(self, name), bool):  # YAML's 'no' in quotes would otherwise count as true
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if not isinstance(self.data, list) or not all(isinstance(p, str) for p in self.data):
            raise ValueError(f"data must be a list of paths, got {self.data!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of DiffLlamaConfig fields, got {self.model!r}")
        if self.init_from and self.tokenizer:  # the checkpoint's embeddings are indexed by its own tokenizer's ids
            raise ValueError(f"init_from {self.init_from!r} brings its checkpoint's tokenizer: leave tokenizer "
                             f"({self.tokenizer!r}) unset")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON/YAML ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML text (keys in field order)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# The ``--help`` of each ``diffllama train`` flag: one per TrainConfig field (``--max-steps`` for ``max_steps``; the
# CLI derives the flags from the fields and this text), but ``model``, whose fields have flags of their own
# (TRAIN_MODEL_FLAG_HELP). A test checks that the fields and the flags match.
FLAG_HELP = {
    "preset": "Preset: tiny (CPU), small, 0.4b, 1b. Default: the config file's, else tiny.",
    "init_from": "Start from this checkpoint folder's weights (step 0, fresh optimizer); the model settings and "
                 "tokenizer are the checkpoint's.",
    "data": "Corpus: text files, folders, JSONL (repeatable). Default: the bundled State of the Union corpus.",
    "text_field": "JSONL key holding the text.",
    "tokenizer": "Reuse the tokenizer in this folder instead of training a BPE.",
    "tokenizer_vocab_size": "BPE vocabulary size to train (the model's vocab_size follows it).",
    "val_fraction": "Share of documents held out for validation.",
    "cache_dir": "Tokenized-data cache (default ~/.cache/diffllama).",
    "seq_len": "Tokens per sequence.",
    "batch_size": "Sequences per micro-batch per process.",
    "grad_accum": "Micro-batches per optimizer step.",
    "max_steps": "Optimizer steps.",
    "lr": "Peak learning rate.",
    "min_lr_ratio": "Final learning rate / peak learning rate (the end of the cosine decay).",
    "warmup_steps": "Linear warm-up steps before the cosine decay.",
    "weight_decay": "AdamW weight decay (matrices only).",
    "beta1": "AdamW beta1.",
    "beta2": "AdamW beta2.",
    "adam_eps": "AdamW epsilon.",
    "grad_clip": "Max gradient norm (0 = off).",
    "eval_every": "Steps between validation passes.",
    "eval_batches": "Validation batches per pass.",
    "log_every": "Steps between metric records.",
    "save_every": "Steps between checkpoints (0 = only at the end).",
    "keep_last": "Checkpoints to keep.",
    "seed": "Seed for weights, data order and dropout.",
    "device": "auto, cpu, cuda.",
    "dtype": "auto (bf16 autocast on CUDA), float32, bfloat16.",
    "compile": "torch.compile each decoder layer.",
    "activation_checkpointing": "Recompute layer activations in backward.",
    "document_mask": "Attend only within each document of a packed sequence (split after each EOS), positions "
                     "restarting per document.",
    "parallel": "auto (DDP under torchrun), none, ddp, fsdp (FSDP2).",
    "loss_chunk_size": "Tokens per chunk of the fused LM head + cross-entropy (0 = automatic).",
    "num_threads": "CPU threads for torch (0 = default).",
    "tensorboard": "Also write TensorBoard events (when the package is installed).",
}
# Other spellings of a flag, kept from earlier versions of the CLI.
FLAG_ALIASES = {"tokenizer_vocab_size": ("--vocab-size",)}
# The DiffLlamaConfig fields that ``diffllama train`` takes as flags (into TrainConfig.model), with their ``--help``.
TRAIN_MODEL_FLAG_HELP = {
    "attn_implementation": "Attention backend: eager, sdpa, flash, auto (the default: flash on a CUDA GPU, sdpa on "
                           "CPU).",
}


# Settings a resumed run may change: they steer the run from the resumed step on, and it honours them exactly
# (max_steps also ends the cosine schedule: its decay is recomputed to end at the new max_steps). Every other
# setting is fixed by the checkpoint: the restored optimizer and scheduler hold lr, betas, eps, weight decay and
# the schedule's shape; which windows step N reads follows data, tokenizer, split, seq_len, seed and the global
# batch (diffllama.train.data.BatchPlan); the weights follow the model settings. (preset only names where the
# settings came from; the settings themselves are compared.)
RESUME_MAY_CHANGE = ("preset", "cache_dir", "max_steps", "grad_clip", "eval_every", "eval_batches", "log_every",
                     "save_every", "keep_last", "device", "dtype", "compile", "activation_checkpointing",
                     "parallel", "loss_chunk_size", "num_threads", "tensorboard")
# Every attention backend computes the same function (a GPU run may resume on CPU with sdpa instead of flash).
MODEL_MAY_CHANGE = ("attn_implementation",)
# Batches index global samples: the global batch (batch_size x grad_accum x processes) is fixed, not its split.
BATCH_SPLIT = ("batch_size", "grad_accum")


# Model fields a run started from a checkpoint (init_from) may set differently from the checkpoint's config.json:
# they change how the same weights run (backend, dropout, RoPE positions, which have no weights), not what they are.
INIT_MAY_CHANGE = MODEL_MAY_CHANGE + ("max_position_embeddings", "attention_dropout", "use_cache")


def init_model_fields(checkpoint_config, given: dict[str, Any], init_from: str) -> dict[str, Any]:
    """The ``model`` fields of a run started from the checkpoint whose config is ``checkpoint_config`` (a
    :class:`~diffllama.config.DiffLlamaConfig`): every field of that config, with ``given`` (the file's and the
    flags' model fields; None = unset) over it where :data:`INIT_MAY_CHANGE` allows.

    Raises:
        ValueError: naming each given field that differs from the checkpoint's (``model_type`` also by its
            ``--arch`` spelling), with both values, and ``init_from``.
    """
    fields = {name: value for name, value in checkpoint_config.to_dict().items()
              if name in {f.name for f in dataclasses.fields(checkpoint_config)}}
    given = {name: value for name, value in given.items() if value is not None}
    conflicts = [f"{name} {value!r} given vs {fields.get(name)!r} in the checkpoint"
                 + (f" (--arch {arch_name(value)} vs --arch {arch_name(fields['model_type'])})"
                    if name == "model_type" and value in ARCHITECTURES.values() else "")
                 for name, value in given.items() if name not in INIT_MAY_CHANGE and value != fields.get(name)]
    if conflicts:
        raise ValueError(f"--init-from {init_from}: model settings given differ from the checkpoint's config.json "
                         f"({'; '.join(conflicts)}); a run started from a checkpoint keeps its model: drop those "
                         f"settings (the preset's model fields do not apply with --init-from)")
    return {**fields, **given}


def arch_name(model_type: str) -> str:
    """The ``--arch`` spelling of a ``model_type`` (``"diffllama_v2"`` -> ``"diffllama-v2"``): the inverse of
    :func:`diffllama.config.model_type_for_arch`.

    Raises:
        ValueError: a model_type that is none of :data:`diffllama.config.MODEL_TYPES`, naming it.
    """
    for arch, known in ARCHITECTURES.items():
        if known == model_type:
            return arch
    raise ValueError(f"model_type must be one of {tuple(ARCHITECTURES.values())}, got {model_type!r}")


def fit_positions(model: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """``model`` with ``max_position_embeddings`` raised to ``seq_len`` where it is lower (or unset): the model a
    run of ``seq_len``-token sequences builds (RoPE has no position weights to grow)."""
    return {**model, "max_position_embeddings": max(model.get("max_position_embeddings") or 0, seq_len)}


def absolute_paths(paths: list[str]) -> list[str]:
    """``paths`` made absolute against the current folder (``~`` expanded; links kept, as the user named them)."""
    return [os.path.abspath(os.path.expanduser(path)) for path in paths]


def resume_conflicts(saved: dict[str, Any], cfg: TrainConfig, saved_world: int, world: int) -> dict[str, tuple]:
    """``{setting: (checkpoint's value, value now)}`` for the settings a resumed run could not honour.

    Args:
        saved: the checkpoint's resolved config (its ``train_config.yaml``); settings it lacks are not compared.
        cfg: the config given now. saved_world, world: processes of the saved run and of this one.

    Model fields are named ``model.FIELD``. When the global batch changed, those of ``batch_size``,
    ``grad_accum`` and ``processes`` that differ are listed.
    """
    now = cfg.to_dict()
    if isinstance(saved.get("data"), list) and all(isinstance(path, str) for path in saved["data"]):
        # A run saved before data paths were stored absolute read relative ones against the current folder
        saved = {**saved, "data": absolute_paths(saved["data"])}
    skip = RESUME_MAY_CHANGE + BATCH_SPLIT + ("model",)
    conflicts = {name: (saved[name], value) for name, value in now.items()
                 if name not in skip and name in saved and saved[name] != value}
    # A run saved before model_type was recorded trained the default architecture, DiffLlama V1
    old_model = {"model_type": MODEL_TYPE,
                 **fit_positions(saved.get("model") or {}, saved.get("seq_len", cfg.seq_len))}
    new_model = {"model_type": MODEL_TYPE, **fit_positions(cfg.model, cfg.seq_len)}
    for key in sorted(set(old_model) | set(new_model)):
        if key not in MODEL_MAY_CHANGE and old_model.get(key) != new_model.get(key):
            conflicts[f"model.{key}"] = (old_model.get(key), new_model.get(key))
    old_batch = {**{name: saved.get(name, now[name]) for name in BATCH_SPLIT}, "processes": saved_world}
    new_batch = {**{name: now[name] for name in BATCH_SPLIT}, "processes": world}
    if math.prod(old_batch.values()) != math.prod(new_batch.values()):
        conflicts.update({name: (old, new_batch[name]) for name, old in old_batch.items() if old != new_batch[name]})
    return conflicts


def describe_resume_conflicts(conflicts: dict[str, tuple], checkpoint) -> str:
    """The error message for :func:`resume_conflicts`' result."""
    listed = ", ".join(f"{name} {old!r} in the checkpoint vs {new!r} now" for name, (old, new) in conflicts.items())
    free = ", ".join(name for name in RESUME_MAY_CHANGE if name != "preset")
    return (f"--resume: settings given now differ from those of the run's checkpoint {checkpoint} and a resumed run "
            f"cannot honour them ({listed}); --resume continues the run with its saved settings: drop the flags "
            f"(or --preset/--config entries) that changed, or choose another --out to start a new run. A resumed "
            f"run may change only {free}, model.attn_implementation, and how batch_size x grad_accum x processes "
            f"splits the same global batch")


def _yaml_number_hint(value: Any) -> str:
    """A hint for a number that arrived as text: PyYAML reads ``3e-3`` (no dot) as a string."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (text, not a number: YAML reads 3e-3 as text; write 3.0e-3 or 0.003)"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``/``.json``/``.toml`` config file into a dict.

    Raises:
        FileNotFoundError: no such file. ValueError: unparsable, not a mapping, or an unknown extension.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json")
    if suffix == ".toml" and sys.version_info < (3, 11):
        raise ValueError(f"config file {str(path)!r}: TOML needs Python >= 3.11 (tomllib); use YAML or JSON")
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as error:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        detail = " ".join(str(error).split())  # one line: yaml's messages span several
        raise ValueError(f"cannot parse config file {str(path)!r}: {detail}") from error
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Merge preset < config file < ``overrides`` into a validated :class:`TrainConfig`.

    ``overrides`` holds CLI flags that were given (``None`` values are skipped); its ``model`` entry, if any,
    updates the model fields. The preset is ``preset``, else the file's ``preset`` key, else ``tiny``; its trio
    member is the ``model_type`` the overrides or the file give (default "diffllama"). With ``init_from`` the
    preset's model fields are left out (the checkpoint's config stands for them, see :class:`TrainConfig`).

    Raises:
        ValueError: unknown preset, unknown keys (listing the valid ones), bad values.
        FileNotFoundError: a missing config file.
    """
    file_data = read_config_file(config_file) if config_file else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = preset or file_data.get("preset") or "tiny"
    if not isinstance(name, str):
        raise ValueError(f"preset must be a preset name (a string), got {name!r}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    sources = (("config file", file_data), ("overrides", overrides))
    for source_name, source in sources:
        unknown = sorted(set(source) - known, key=str)
        if unknown:
            raise ValueError(f"unknown setting(s) in {source_name}: {unknown}; valid: {sorted(known)}")
        model_fields = source.get("model")
        if model_fields is not None and not isinstance(model_fields, dict):  # merged field by field below
            raise ValueError(f"model in the {source_name} must be a mapping of DiffLlamaConfig fields "
                             f"(e.g. model: {{num_hidden_layers: 2}}), got {model_fields!r}")
    given_model = {k: v for _, source in sources for k, v in (source.get("model") or {}).items()}
    base = get_preset(name, given_model.get("model_type", MODEL_TYPE))
    merged: dict[str, Any] = {**base["train"], "preset": name}
    for _, source in sources:
        merged.update({k: v for k, v in source.items() if k not in ("model", "preset")})
    merged["model"] = given_model if merged.get("init_from") else {**base["model"], **given_model}
    if isinstance(merged.get("data"), str):
        merged["data"] = [merged["data"]]
    return TrainConfig(**merged)
