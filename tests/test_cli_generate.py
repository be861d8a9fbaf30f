"""`diffllama generate` end to end on a small checkpoint made here: streaming, batches, stdin, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from typer.testing import CliRunner

import diffllama
import diffllama.cli as cli
from conftest import tiny_config
from diffllama.generation import stream_text
from test_tokenizer import make_bytelevel

PROMPTS = ["Hello world", "The quick brown fox", "Unicode: 日本"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 3-layer model saved with a byte-level BPE tokenizer (EOS = a token it never emits greedily)."""
    directory = tmp_path_factory.mktemp("ckpt")
    tok = make_bytelevel()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tok.vocab_size, initializer_range=0.15, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = diffllama.DiffLlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def run(*args, input=None):
    return CliRunner().invoke(cli.app, ["generate", *map(str, args)], input=input)


def expected_text(directory, prompt, dtype=torch.float64, **kwargs) -> str:
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(directory, dtype=dtype)
    tok = diffllama.Tokenizer.from_pretrained(directory)
    return "".join(stream_text(model, tok, prompt, **kwargs))


def test_streams_greedy_continuation(checkpoint, monkeypatch):
    pieces = []
    real_write = cli._write
    monkeypatch.setattr(cli, "_write", lambda text: (pieces.append(text), real_write(text)))
    result = run(checkpoint, PROMPTS[0], "-n", 24, "--dtype", "float64", "--device", "cpu")
    assert result.exit_code == 0, result.output
    want = expected_text(checkpoint, PROMPTS[0], max_new_tokens=24)
    assert result.stdout == want + "\n"
    assert len(pieces) > 3, "text must be written piece by piece as tokens arrive"
    assert "loaded" in result.stderr


def test_seeded_sampling_reproducible(checkpoint):
    args = (checkpoint, PROMPTS[1], "-n", 20, "--temperature", "1.3", "--top-k", 50, "--top-p", "0.95")
    first, second = run(*args, "--seed", 7), run(*args, "--seed", 7)
    other = run(*args, "--seed", 8)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout != other.stdout


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_batched_prompts(checkpoint, tmp_path, source):
    if source == "file":
        path = tmp_path / "prompts.txt"
        path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
        result = run(checkpoint, "--prompts-file", path, "-n", 12, "--dtype", "float64", "--batch-size", 2)
    else:
        result = run(checkpoint, "-f", "-", "-n", 12, "--dtype", "float64", input="\n".join(PROMPTS))
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == len(PROMPTS)
    for prompt, line in zip(PROMPTS, lines):
        assert line == expected_text(checkpoint, prompt, max_new_tokens=12).replace("\n", "\\n")


def test_interactive(checkpoint):
    result = run(checkpoint, "--interactive", "-n", 8, "--dtype", "float64", input=f"{PROMPTS[0]}\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected_text(checkpoint, PROMPTS[0], max_new_tokens=8) + "\n"


def test_a_folder_that_is_no_checkpoint_is_named_as_such(tmp_path):
    """Was "no tokenizer in ...": the tokenizer was read first, so a folder without config.json got the wrong cause."""
    (tmp_path / "file.txt").write_text("x")
    result = run(tmp_path, "hi", "-n", 2)
    assert result.exit_code == 1 and "MODEL_DIR_OR_REPO" in result.output and "no config.json" in result.output, \
        result.output


@pytest.mark.parametrize("args, code, message", [
    (["MISSING", "hi"], 1, "MODEL_DIR_OR_REPO"),
    (["CKPT", "hi", "--device", "tpu"], 2, "--device must be auto, cpu, cuda"),
    (["CKPT", "hi", "--dtype", "int8"], 2, "--dtype must be auto or one of"),
    (["CKPT", "hi", "-n", "0"], 2, "--max-new-tokens"),
    (["CKPT", "hi", "--temperature", "-1"], 2, "--temperature must be >= 0"),
    (["CKPT", "hi", "--top-p", "0.5"], 2, "--top-k/--top-p apply to sampling"),
    (["CKPT", "hi", "-t", "1", "--top-p", "1.5"], 2, "--top-p must be None or in (0, 1]"),
    (["CKPT", "hi", "-t", "1", "--top-k", "0"], 2, "--top-k must be None or an int >= 1"),
    (["CKPT"], 2, "exactly one of PROMPT, --interactive or --prompts-file"),
    (["CKPT", "-f", "nowhere.txt"], 2, "--prompts-file 'nowhere.txt' does not exist"),
    (["CKPT", "hi", "--temperature", "nan"], 2, "--temperature must be a finite number, got nan"),
    (["CKPT", "hi", "-t", "1", "--top-p", "nan"], 2, "--top-p must be a finite number, got nan"),
    (["CKPT", "hi", "--repetition-penalty", "inf"], 2,
     "--repetition-penalty must be a finite number, got inf"),
    (["CKPT", "hi", "--seed", str(10 ** 23)], 2,
     "--seed must be an integer in [0, 2**64 - 1], got 100000000000000000000000"),
    (["CKPT", "hi", "--attn", "fast"], 2, "--attn-implementation must be one of eager, sdpa, flash, auto, got 'fast'"),
    (["CKPT", "The", "--attn", "flash", "--device", "cpu"], 1, "--attn-implementation flash needs a CUDA GPU, but generation runs "
                                                               "on cpu"),
])
def test_errors(checkpoint, tmp_path, args, code, message):
    args = [str(checkpoint) if a == "CKPT" else str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    result = run(*args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_prompt_tokenized_once_and_settings_resolved_once(checkpoint, monkeypatch):
    """One PROMPT: encoded once (was three times) and its generation arguments resolved and checked once (was
    twice), the settings then shared by every prompt."""
    import diffllama.generation as generation

    encoded, resolved = [], []
    real_encode, real_resolve = diffllama.Tokenizer.encode, generation.resolve_generation_settings
    monkeypatch.setattr(diffllama.Tokenizer, "encode",
                        lambda self, *a, **k: encoded.append(1) or real_encode(self, *a, **k))
    monkeypatch.setattr(generation, "resolve_generation_settings",
                        lambda *a, **k: resolved.append(k) or real_resolve(*a, **k))
    result = run(checkpoint, PROMPTS[0], "-n", 5, "-t", "0.9", "--top-k", 5, "--seed", 3, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    assert len(encoded) == 1 and len(resolved) == 1
    assert resolved[0]["names"]["top_k"] == "--top-k" and resolved[0]["do_sample"] is True


def test_prompts_file_not_utf8_or_a_folder(checkpoint, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"The people\n\xff\xfe not UTF-8\n")
    result = run(checkpoint, "-f", bad, "-n", 2)
    assert result.exit_code == 2 and not isinstance(result.exception, UnicodeDecodeError), result.output
    assert f"error: --prompts-file '{bad}' line 2 is not UTF-8 text" in result.stderr and result.stdout == ""
    result = run(checkpoint, "-f", tmp_path, "-n", 2)
    assert result.exit_code == 2 and f"--prompts-file '{tmp_path}' is a directory" in result.stderr


def test_prompt_lines_end_only_at_newlines(checkpoint, tmp_path):
    """A form feed or U+2028 inside a line stays in its prompt, CRLF and a byte-order mark are dropped: one output
    line per input line."""
    prompts = ["A\x0cB", "line three\u2028tail", "last"]
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(prompts[:2]).encode() + b"\r\n\r\n" + prompts[2].encode() + b"\n")
    result = run(checkpoint, "-f", path, "-n", 4, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")[:-1]
    assert lines == [expected_text(checkpoint, p, max_new_tokens=4).replace("\n", "\\n") for p in prompts]


def test_interactive_crlf_and_bad_bytes(checkpoint):
    """CRLF line ends are not part of the prompt; a line that is not UTF-8 is reported and the loop goes on."""
    result = run(checkpoint, "-i", "-n", 8, "--dtype", "float64", input=b"\xff\r\n" + PROMPTS[0].encode() + b"\r\n\r\n")
    assert result.exit_code == 0, result.output
    assert "error: that line is not UTF-8 text" in result.stderr
    assert result.stdout == expected_text(checkpoint, PROMPTS[0], max_new_tokens=8) + "\n"


def test_non_utf8_prompt_argument_and_stdin(checkpoint):
    result = run(checkpoint, "x\udcffy", "-n", 2)  # how Python passes an argv byte that is not UTF-8
    assert result.exit_code == 2 and "error: PROMPT is not UTF-8 text" in result.stderr, result.output
    result = run(checkpoint, "-f", "-", "-n", 2, input=b"ok\n\xff\n")
    assert result.exit_code == 2 and "error: --prompts-file '-' line 2 is not UTF-8 text" in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_unavailable(checkpoint):
    result = run(checkpoint, "hi", "--device", "cuda")
    assert result.exit_code == 1 and "CUDA is not available" in result.stderr


def test_checkpoint_without_tokenizer(checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    result = run(tmp_path, "hi")
    assert result.exit_code == 1
    assert "no tokenizer" in result.stderr and "tokenizer.json" in result.stderr


def test_run_folder_suggests_its_model(checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    for path in checkpoint.iterdir():
        (run_dir / "model" / path.name).write_bytes(path.read_bytes())
    result = run(run_dir, "hi")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"looks like a training run folder: its final model is in {run_dir / 'model'}" in result.stderr


def _without_bos_template(checkpoint, folder, keep_bos: bool):
    """The checkpoint with a tokenizer that adds no BOS (like `diffllama train`'s), with or without a BOS token."""
    import json

    folder.mkdir()
    for path in checkpoint.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    if not keep_bos:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config = json.loads((folder / name).read_text())
            config.pop("bos_token", None)
            (folder / name).write_text(json.dumps(config))
    return folder


def test_empty_prompt_starts_from_bos_or_is_refused(checkpoint, tmp_path):
    with_bos = _without_bos_template(checkpoint, tmp_path / "bos", keep_bos=True)
    result = run(with_bos, "", "-n", 6, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    assert diffllama.Tokenizer.from_pretrained(with_bos).encode("") == []
    # The same as the original checkpoint, whose tokenizer template encodes "" as [BOS].
    assert result.stdout_bytes.decode() == expected_text(checkpoint, "", max_new_tokens=6) + "\n"
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(with_bos)
    no_bos = _without_bos_template(checkpoint, tmp_path / "nobos", keep_bos=False)
    result = run(no_bos, "", "-n", 6)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: prompt is empty (after tokenization the prompt has no tokens")
    with pytest.raises(ValueError, match="prompt is empty"):
        next(stream_text(model, diffllama.Tokenizer.from_pretrained(no_bos), "", max_new_tokens=2))


@pytest.mark.slow  # a subprocess or several: the README's test command keeps under 3 minutes
def test_console_entry_point(checkpoint):
    """`python -m diffllama generate` in a fresh process: only the generated text on stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "diffllama", "generate", str(checkpoint), PROMPTS[0], "-n", "10",
                           "--dtype", "float32"], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(checkpoint, PROMPTS[0], torch.float32, max_new_tokens=10) + "\n"


def test_a_task_model_is_refused_and_a_minus_one_pad_id_batches(checkpoint, tmp_path):
    """A fine-tuned classifier's folder has no lm_head: refused (was: random text, exit 0). A config pad id of -1
    (legacy Llama "no pad") falls back to the tokenizer's pad for batching (was: ids of -1 and a traceback)."""
    import json
    import shutil

    task = tmp_path / "task"
    shutil.copytree(checkpoint, task)
    classifier = diffllama.DiffLlamaForSequenceClassification.from_pretrained(checkpoint)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (task / name).unlink(missing_ok=True)
    classifier.save_pretrained(task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(task, "hi", "-n", 2)
    assert result.exit_code == 1 and "has no language-model head" in result.stderr and result.stdout == ""
    # one line: the loader's "newly initialised weights: lm_head.weight" UserWarning is held back (it said the
    # same, raw)
    assert result.stderr.strip().count("\n") == 0 and not caught, (result.stderr, [str(w.message) for w in caught])
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoint, legacy)
    config = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    result = run(legacy, "-f", prompts, "-n", 6, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n")[:-1] == [expected_text(checkpoint, p, max_new_tokens=6).replace("\n", "\\n")
                                              for p in PROMPTS]


def test_prompts_file_output_escapes_carriage_returns(checkpoint, tmp_path, monkeypatch):
    """Each continuation is one line for any text-mode reader: a generated \\r is escaped as well as \\n."""
    monkeypatch.setattr(diffllama.Tokenizer, "decode", lambda self, ids: "a\rb\nc\\d")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\ny\n", encoding="utf-8")
    result = run(checkpoint, "-f", prompts, "-n", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout == "a\\rb\\nc\\\\d\n" * 2


def test_ctrl_c_in_interactive_stops_the_answer_not_the_session(checkpoint, monkeypatch):
    import diffllama.generation as generation

    real = generation.stream_text
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        for i, piece in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt  # as Ctrl-C arrives in the middle of the first answer
            yield piece

    monkeypatch.setattr(generation, "stream_text", interrupted_once)
    result = run(checkpoint, "--interactive", "-n", 8, "--dtype", "float64", input=f"{PROMPTS[0]}\n{PROMPTS[1]}\n\n")
    assert result.exit_code == 0, result.output
    assert "[stopped]" in result.stderr and len(calls) == 2
    assert result.stdout.endswith(expected_text(checkpoint, PROMPTS[1], max_new_tokens=8) + "\n")


def test_bf16_on_a_cpu_without_bf16_warns(checkpoint, monkeypatch):
    from diffllama.train import resources

    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--dtype bfloat16 on this CPU .* about 30x slower"):
        result = run(checkpoint, "hi", "-n", 2, "--dtype", "bfloat16", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_the_command_prints_warnings_as_one_line(capsys):
    cli._show_warning(UserWarning("careful"), UserWarning, "/some/file.py", 12)
    assert capsys.readouterr().err == "warning: careful\n"
