"""DIFFLLAMA_* kernel settings (diffllama.settings): parsed at import, refused by model construction and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_a_bad_setting_stops_every_command(monkeypatch):
    """The CLI checks the environment (settings.check); the model constructor reads no environment variable."""
    monkeypatch.setattr(settings, "ERRORS", ["DIFFLLAMA_FLASH_BWD='both': expected one of auto, fused, split"])
    diffllama.DiffLlamaForCausalLM(tiny_config())
    result = CliRunner().invoke(app, ["generate", "no-such-model", "hi"])
    assert result.exit_code == 2
    assert "error: bad environment: DIFFLLAMA_FLASH_BWD='both'" in result.output
    assert "no-such-model" not in result.output  # refused before the command looked at its arguments


BAD_DQ = "error: bad environment: DIFFLLAMA_FLASH_DQ='bogus': expected one of kernel, atomic\n"


@pytest.mark.slow  # a subprocess or several: the README's test command keeps under 3 minutes
def test_a_real_bad_variable_stops_a_real_command_but_not_the_help(tmp_path):
    """The variable is read at import, so this runs the installed CLI in a fresh process with it set."""
    env = {**os.environ, "DIFFLLAMA_FLASH_DQ": "bogus"}
    env.pop("COLUMNS", None)  # as a pipe from a plain shell: the CLI picks the width

    def diffllama_cli(*args):
        return subprocess.run([sys.executable, "-m", "diffllama", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    out = tmp_path / "run"
    proc = diffllama_cli("train", "--preset", "tiny", "--out", str(out), "--max-steps", "1")
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, BAD_DQ, "")
    assert not out.exists()  # refused before the command did any work
    proc = diffllama_cli("--help")  # help does no work: it prints whatever the environment
    assert proc.returncode == 0 and "Usage:" in proc.stdout and "finetune" in proc.stdout and not proc.stderr
    proc = diffllama_cli("train", "--out", str(out), "--help")  # a command's help too, with whole flag names
    assert "--activation-checkpointing" in proc.stdout and "…" not in proc.stdout  # piped: not cut at 80 columns
    assert proc.returncode == 0 and "diffllama train [OPTIONS]" in proc.stdout and not proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", [c.name or c.callback.__name__ for c in app.registered_commands])
def test_every_command_refuses_a_bad_variable_in_one_line(monkeypatch, command):
    monkeypatch.setattr(settings, "ERRORS", settings.read({"DIFFLLAMA_FLASH_DQ": "bogus"})[1])
    result = CliRunner().invoke(app, [command, "x"])
    assert (result.exit_code, result.output) == (2, BAD_DQ)
