"""Presets, config files and flags resolve into a validated TrainConfig."""

import pytest

from diffllama.presets import PRESETS, get_preset
from diffllama.train.config import TrainConfig, resolve_config


def test_presets_shapes():
    assert set(PRESETS) >= {"tiny", "small", "0.4b", "1b"}
    p = get_preset("0.4b")["model"]
    assert (p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"], p["intermediate_size"]) == \
        (1024, 24, 16, 2816)
    assert get_preset("0.4b")["train"]["seq_len"] == 2048
    p = get_preset("1b")["model"]
    assert (p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"], p["num_key_value_heads"],
            p["vocab_size"]) == (2048, 16, 32, 8, 128256)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_precedence_preset_file_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmax_steps: 50\nlr: 0.01\nmodel: {num_hidden_layers: 2}\n")
    cfg = resolve_config(None, path, {"lr": 0.02, "batch_size": None})
    assert cfg.max_steps == 50 and cfg.lr == 0.02 and cfg.batch_size == get_preset("tiny")["train"]["batch_size"]
    assert cfg.model["num_hidden_layers"] == 2 and cfg.model["hidden_size"] == 256
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 7\ndata = ["a.txt"]\n[model]\nhidden_size = 64\n')
    cfg = resolve_config("small", toml)
    assert cfg.preset == "small" and cfg.max_steps == 7 and cfg.data == ["a.txt"] and cfg.model["hidden_size"] == 64
    again = resolve_config(None, _write(tmp_path / "saved.yaml", cfg.to_yaml()))
    assert again == cfg


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("batch_size", 0), ("max_steps", 1.5), ("dtype", "fp8"),
                                         ("parallel", "tp"), ("val_fraction", 1.0), ("device", "tpu")])
def test_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        resolve_config("tiny", overrides={field: value})


def test_unknown_keys_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_config("tiny", overrides={"learning_rate": 1.0})
    with pytest.raises(FileNotFoundError):
        resolve_config("tiny", tmp_path / "missing.yaml")
    bad = _write(tmp_path / "bad.yaml", "- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve_config(None, bad)
    with pytest.raises(ValueError, match=r"\.yaml"):
        resolve_config(None, _write(tmp_path / "x.ini", "a=1"))
    assert isinstance(TrainConfig(), TrainConfig)


@pytest.mark.parametrize("field,value,expected", [
    ("val_fraction", 1.5, "val_fraction must be a number with 0 < val_fraction < 1"),
    ("val_fraction", 0, "val_fraction must be a number with 0 < val_fraction < 1"),
    ("min_lr_ratio", 2.0, "min_lr_ratio must be a number in [0, 1]"),
    ("beta1", 1.0, "beta1 must be a number in [0, 1)"),
    ("beta2", -0.1, "beta2 must be a number in [0, 1)"),
    ("adam_eps", 0.0, "adam_eps must be a number > 0"),
    ("weight_decay", -1.0, "weight_decay must be a number >= 0"),
    ("grad_clip", float("nan"), "grad_clip must be a number >= 0 (0 = off)"),
    ("lr", float("inf"), "lr must be a number > 0"),
    ("lr", "fast", "lr must be a number > 0"),
    ("device", "tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("device", "cuda:x", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("seed", 99999999999999999999999, "seed must be an integer in [0, 2**64 - 1]"),
    ("seed", 2**64, "seed must be an integer in [0, 2**64 - 1]"),
    ("seed", -1, "seed must be a non-negative integer"),
])
def test_bad_value_messages_state_the_expected_range(field, value, expected):
    with pytest.raises(ValueError) as caught:
        resolve_config("tiny", overrides={field: value})
    assert expected in str(caught.value) and repr(value) in str(caught.value)


def test_largest_seed_is_one_torch_accepts():
    import torch

    cfg = resolve_config("tiny", overrides={"seed": 2**64 - 1})
    torch.manual_seed(cfg.seed)  # what Trainer does with it
    assert cfg.seed == torch.initial_seed() == 2**64 - 1


@pytest.mark.parametrize("name, text", [
    ("bad.yaml", "model:\n  hidden_size: 64\n bad_indent: 1\n"),
    ("bad.json", "{\"max_steps\": }"),
    ("bad.toml", "max_steps = = 3\n"),
])
def test_unparsable_config_file_is_one_line_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        resolve_config("tiny", path)
    message = str(caught.value)
    assert message.startswith(f"cannot parse config file {str(path)!r}: ") and "\n" not in message, message


@pytest.mark.parametrize("text, expected", [
    ("model: 5\n", "model in the config file must be a mapping of DiffLlamaConfig fields (e.g. model: "
                    "{num_hidden_layers: 2}), got 5"),
    ("model: [2]\n", "model in the config file must be a mapping of DiffLlamaConfig fields"),
    ("preset: [tiny]\n", "preset must be a preset name (a string), got ['tiny']"),
    ("data: 5\n", "data must be a list of paths, got 5"),
    ("text_field: [a]\n", "text_field must be a string, got ['a']"),
    ("tokenizer: 5\n", "tokenizer must be a string, got 5"),
    ("cache_dir: 5\n", "cache_dir must be a string, got 5"),
    ("compile: 'no'\n", "compile must be true or false, got 'no'"),
    ("tensorboard: 1\n", "tensorboard must be true or false, got 1"),
    ("lr: 3e-3\n", "lr must be a number > 0 (the peak learning rate, e.g. 0.003), got '3e-3' (text, not a number: "
                    "YAML reads 3e-3 as text; write 3.0e-3 or 0.003)"),
    ("1: 2\nfoo: 3\n", "unknown setting(s) in config file: [1, 'foo']"),
], ids=["model-int", "model-list", "preset-list", "data-int", "text-field", "tokenizer", "cache-dir", "compile",
        "tensorboard", "lr-as-text", "int-key"])
def test_config_file_values_of_the_wrong_type(tmp_path, text, expected):
    with pytest.raises(ValueError) as caught:
        resolve_config(None, _write(tmp_path / "run.yaml", text))
    assert str(caught.value).startswith(expected), str(caught.value)


def test_resume_compares_data_paths_absolute(tmp_path, monkeypatch):
    """A run saved before data paths were stored absolute named them relative to the folder it ran in."""
    from diffllama.train.config import absolute_paths, resume_conflicts

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data=absolute_paths(["corpus/a.txt"]))
    assert cfg.data == [str(tmp_path / "corpus" / "a.txt")]
    assert resume_conflicts({"data": ["corpus/a.txt"]}, cfg, 1, 1) == {}
    assert resume_conflicts({"data": ["other/a.txt"]}, cfg, 1, 1) == \
        {"data": ([str(tmp_path / "other" / "a.txt")], [str(tmp_path / "corpus" / "a.txt")])}
