"""The ``train`` and ``finetune`` flags are derived from their config dataclasses: every field has a flag, and every
flag is a field (or one of the few that are not settings: the config file, the run folder, --resume, and finetune's
task options, which map to FineTuneConfig fields)."""

from __future__ import annotations

import dataclasses

import typer.main

from diffllama.cli import app
from diffllama.config import DiffLlamaConfig
from diffllama.finetune.run import FINETUNE_FLAGS, RESUME_FLAGS, FineTuneConfig
from diffllama.train.config import FLAG_HELP, TRAIN_MODEL_FLAG_HELP, TrainConfig

# Options that are no setting of the run (the file and folder it comes from, whether it resumes).
NOT_SETTINGS = {"config", "out", "resume", "help"}


def _options(command: str) -> dict[str, list[str]]:
    """``{parameter name: its flags}`` of a subcommand's options (arguments left out)."""
    group = typer.main.get_command(app)
    params = group.commands[command].params
    return {p.name: [*p.opts, *p.secondary_opts] for p in params if p.param_type_name == "option"}


def _fields(config_class) -> set[str]:
    """The field names of a dataclass."""
    return {f.name for f in dataclasses.fields(config_class)}


def test_every_train_field_has_a_flag_and_every_flag_is_a_field():
    options = _options("train")
    settings = set(options) - NOT_SETTINGS
    model_flags = set(TRAIN_MODEL_FLAG_HELP)
    # `model` is the one field without a flag of its own: its DiffLlamaConfig fields have theirs (and --arch is
    # model.model_type in its command-line spelling)
    assert settings - model_flags - {"arch"} == _fields(TrainConfig) - {"model"}
    assert model_flags <= _fields(DiffLlamaConfig)
    assert set(FLAG_HELP) == _fields(TrainConfig) - {"model"}
    for name in settings:
        assert f"--{name.replace('_', '-')}" in options[name], (name, options[name])


def test_train_flag_spellings():
    options = _options("train")
    assert options["tokenizer_vocab_size"] == ["--tokenizer-vocab-size", "--vocab-size"]
    for name in ("compile", "activation_checkpointing", "document_mask", "tensorboard"):
        flag = name.replace("_", "-")
        assert options[name] == [f"--{flag}", f"--no-{flag}"]


def test_every_finetune_flag_is_a_field():
    options = _options("finetune")
    settings = set(options) - NOT_SETTINGS
    assert set(FINETUNE_FLAGS) <= settings & _fields(TrainConfig)
    flag_fields = {flag: field for field, flag in RESUME_FLAGS.items()}
    for name in settings - set(FINETUNE_FLAGS):  # the task's options: FineTuneConfig fields under their flags
        flag = f"--{name.replace('_', '-')}"
        assert flag_fields.get(flag, name) in _fields(FineTuneConfig), name
