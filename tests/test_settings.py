"""DIFFLLAMA_* kernel settings (diffllama.settings): parsed at import, refused by model construction and the CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import diffllama
from conftest import tiny_config
from diffllama import settings
from diffllama.cli import app


def test_defaults_and_valid_values():
    values, errors = settings.read({})
    assert errors == []
    assert values == {"DIFFLLAMA_GEMV": frozenset({"qkv"}), "DIFFLLAMA_FLASH_DQ": "kernel",
                      "DIFFLLAMA_FLASH_BWD": "auto", "DIFFLLAMA_FLASH_AUTOTUNE": "1", "DIFFLLAMA_FLASH_DEBUG": "0"}
    values, errors = settings.read({"DIFFLLAMA_GEMV": "down, lm_head", "DIFFLLAMA_FLASH_DQ": "atomic",
                                    "DIFFLLAMA_FLASH_BWD": " split ", "DIFFLLAMA_FLASH_AUTOTUNE": "0"})
    assert errors == []
    assert values["DIFFLLAMA_GEMV"] == {"down", "lm_head"} and values["DIFFLLAMA_FLASH_BWD"] == "split"
    assert settings.read({"DIFFLLAMA_GEMV": "none"})[0]["DIFFLLAMA_GEMV"] == frozenset()


def test_bad_values_name_the_variable_and_keep_the_default():
    values, errors = settings.read({"DIFFLLAMA_GEMV": "down,mlp", "DIFFLLAMA_FLASH_DQ": "foo",
                                    "DIFFLLAMA_FLASH_AUTOTUNE": "maybe"})
    assert errors == [
        "DIFFLLAMA_FLASH_DQ='foo': expected one of kernel, atomic",
        "DIFFLLAMA_FLASH_AUTOTUNE='maybe': expected one of 1, 0",
        "DIFFLLAMA_GEMV='down,mlp': unknown site(s) 'mlp'; expected a comma-separated subset of qkv, o, gate_up, "
        "down, lm_head, or none",
    ]
    assert values["DIFFLLAMA_FLASH_DQ"] == "kernel" and values["DIFFLLAMA_GEMV"] == {"qkv"}
    # Contradictions, empty values and control characters are errors, each reported on one line.
    for raw, problem in [("none,qkv", "none mixed with sites"), ("", "unknown site(s) ''"),
                         ("qkv\nfoo", "unknown site(s) 'qkv\\nfoo'")]:
        errors = settings.read({"DIFFLLAMA_GEMV": raw})[1]
        assert len(errors) == 1 and problem in errors[0] and "\n" not in errors[0], errors
    assert settings.read({"DIFFLLAMA_FLASH_BWD": " "})[1] == ["DIFFLLAMA_FLASH_BWD=' ': expected one of auto, "
                                                             "fused, split"]


def test_a_bad_setting_stops_model_construction_and_every_command(monkeypatch):
    monkeypatch.setattr(settings, "ERRORS", ["DIFFLLAMA_FLASH_BWD='both': expected one of auto, fused, split"])
    with pytest.raises(ValueError, match="bad environment: DIFFLLAMA_FLASH_BWD='both': expected one of auto"):
        diffllama.DiffLlamaForCausalLM(tiny_config())
    result = CliRunner().invoke(app, ["generate", "no-such-model", "hi"])
    assert result.exit_code == 2
    assert "error: bad environment: DIFFLLAMA_FLASH_BWD='both'" in result.output
    assert "no-such-model" not in result.output  # refused before the command looked at its arguments
