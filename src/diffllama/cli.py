"""The ``diffllama`` command line: one typed function per subcommand; each docstring is its ``--help``."""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

from diffllama.config import DiffLlamaConfig
from diffllama.finetune.run import FINETUNE_DEFAULTS, FINETUNE_FLAGS, finetune_config, resume_command, run_finetune
from diffllama.train.config import (
    FLAG_ALIASES, FLAG_HELP, TRAIN_MODEL_FLAG_HELP, TrainConfig, read_config_file, resolve_config)


class _Commands(TyperGroup):
    """The subcommands; notes whether the one called was asked for --help (which does no work)."""

    def resolve_command(self, ctx, args):
        ctx.meta["help_asked"] = any(arg in ctx.help_option_names for arg in args[1:])
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="DiffLlama: train, generate with and fine-tune differential-attention language models.")


@app.callback()
def _check_environment(ctx: typer.Context) -> None:
    # Bad DIFFLLAMA_* kernel settings (diffllama.settings) are one error line before any command's work; a
    # command's --help is shown whatever they hold.
    from diffllama import settings  # lazy: CLI startup time

    if ctx.meta.get("help_asked"):
        return
    try:
        settings.check()
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None

# ---- generate (inference) ---------------------------------------------------------------------------------------

class _UsageError(Exception):
    """A user error of a `diffllama` command: printed as 'error: ...' with exit code 1 (or 2 for bad arguments)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def _reported(errors: type[Exception] | tuple = (), code: int = 1):
    """Run the block; a :class:`_UsageError` ends the command with its own exit code and any of ``errors`` with
    ``code``, each after one 'error: ...' line on stderr (a traceback would bury the message)."""
    import sys

    try:
        yield
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(error.code)
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(code)


def _write(text: str) -> None:
    """Write generated text to stdout at once (streaming)."""
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()


def _generation_device(device: str):
    import torch

    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(name)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise _UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}", 2)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise _UsageError(f"--device {device} was requested but CUDA is not available on this machine "
                              f"(use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise _UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return parsed


def _generation_dtype(dtype: str, device):
    from diffllama.hf_format import DTYPES  # lazy: CLI startup time

    if dtype == "auto":  # the checkpoint's dtype on a GPU; float32 on CPU (bf16 matmuls are slow there)
        return None if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise _UsageError(f"--dtype must be auto or one of {', '.join(sorted(DTYPES))}, got {dtype!r}", 2)
    return dtype


def _check_attn(attn, device) -> None:
    """Refuse an unknown --attn, and flash where it cannot run (no CUDA device, no Triton), before any loading."""
    from diffllama.config import ATTN_IMPLEMENTATIONS  # lazy: CLI startup time

    if attn not in ATTN_IMPLEMENTATIONS:
        raise _UsageError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn!r}", 2)
    if attn == "flash":
        from diffllama import settings  # lazy: CLI startup time
        from diffllama.attention import flash  # lazy: CLI startup time

        if device.type != "cuda" and not settings.triton_interpreting():
            raise _UsageError(f"--attn-implementation flash needs a CUDA GPU, but generation runs on {device}: "
                              f"use sdpa (or auto), or --device cuda on a machine with a GPU")
        if flash.triton is None:
            raise _UsageError(f"--attn-implementation flash needs Triton (pip install triton), which failed to "
                              f"import: {flash._IMPORT_ERROR}; use sdpa (or auto)")


def _utf8_line(raw: bytes, where: str) -> str:
    """One line of input without its line end (LF or CRLF); non-UTF-8 bytes raise a _UsageError naming ``where``."""
    try:
        return raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as error:
        raise _UsageError(f"{where} is not UTF-8 text: {error}", 2) from error


def _check_utf8_argument(text: str, name: str) -> None:
    """Refuse an argument holding bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _UsageError(f"{name} is not UTF-8 text: {error}", 2) from error


def _read_prompts(prompts_file: str) -> list[str]:
    """The non-empty lines of a file or of stdin ("-"). Only LF and CRLF end a line, as in any text editor
    (``str.splitlines`` would also split on form feeds and Unicode separators, and the output lines would no longer
    match the input lines); a UTF-8 byte-order mark is dropped."""
    import sys
    from pathlib import Path

    if prompts_file == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(prompts_file)
        if path.is_dir():
            raise _UsageError(f"--prompts-file {prompts_file!r} is a directory; expected a text file with "
                              f"one prompt per line", 2)
        if not path.is_file():
            raise _UsageError(f"--prompts-file {prompts_file!r} does not exist", 2)
        data = path.read_bytes()
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    texts = [_utf8_line(line, f"--prompts-file {prompts_file!r} line {n}") for n, line in enumerate(lines, 1)]
    prompts = [line for line in texts if line.strip()]
    if not prompts:
        raise _UsageError(f"--prompts-file {prompts_file!r} holds no prompts (one per non-empty line)", 2)
    return prompts


@app.command()
def generate(
    model_dir: str = typer.Argument(..., metavar="MODEL_DIR_OR_REPO",
                                    help="Checkpoint directory (config.json, safetensors, tokenizer) or a hub repo id."),
    prompt: str = typer.Argument(None, help="Text to continue. Omit with --interactive or --prompts-file."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="New tokens per prompt (>= 1)."),
    temperature: float = typer.Option(0.0, "--temperature", "-t",
                                      help="0 = greedy (default); > 0 samples at that temperature."),
    top_k: int = typer.Option(None, "--top-k", help="Sample among the k most likely tokens (needs --temperature)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1] (needs --temperature)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="CTRL penalty (> 0; 1 = off)."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="auto (checkpoint's on CUDA, float32 on CPU), float32, bfloat16, float16, float64."),
    attn: str = typer.Option("auto", "--attn-implementation", "--attn", help="Attention backend: eager, sdpa, flash, auto (flash on a CUDA "
                             "GPU with Triton, else sdpa)."),
    compile: bool = typer.Option(False, "--compile", help="Static KV cache + torch.compile'd decode step "
                                 "(CUDA graphs on GPU); the first prompt pays the compilation (tens of seconds), "
                                 "so it pays off on a GPU for long outputs, rarely on a CPU."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Prompt loop on stdin; empty line or EOF ends."),
    prompts_file: str = typer.Option(None, "--prompts-file", "-f",
                                     help="One prompt per non-empty line ('-' = stdin; blank lines "
                                          "are skipped), generated in left-padded batches."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per batch with --prompts-file."),
) -> None:
    """Generate text with a DiffLlama checkpoint, streaming it to stdout as it is produced.

    One PROMPT streams its continuation; --prompts-file generates each non-empty line's continuation in batches
    (printed one per line in the order of those lines, backslashes and line breaks escaped as \\\\, \\n and
    \\r; blank lines are skipped);
    --interactive reads prompts from stdin until an empty line. Status messages
    go to stderr. EOS ids come from generation_config.json, then config.json, then the tokenizer.
    Example: diffllama generate runs/tiny/model "The people" -n 50 --temperature 0.8 --top-p 0.95 --seed 0
    """
    import sys

    with _reported():
        try:
            _run_generate(model_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, device=device, dtype=dtype,
                          attn=attn, compile=compile, interactive=interactive, prompts_file=prompts_file,
                          batch_size=batch_size)
        except KeyboardInterrupt:
            print("", file=sys.stderr)
            raise typer.Exit(130)


# Argument name -> the flag its errors name, for the shared resolver (diffllama.generation).
_GENERATE_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                   "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed",
                   "compile": "--compile", "static_cache": "--compile"}


def _run_generate(model_dir, prompt, *, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                  device, dtype, attn, compile, interactive, prompts_file, batch_size) -> None:
    import sys
    import time

    from diffllama.generation import resolve_generation_settings, with_tokenizer_eos  # lazy: CLI startup time
    from diffllama.train.resources import warn_slow_bf16  # lazy: CLI startup time

    if sum([prompt is not None, interactive, prompts_file is not None]) != 1:
        raise _UsageError("give exactly one of PROMPT, --interactive or --prompts-file", 2)
    if prompt is not None:
        _check_utf8_argument(prompt, "PROMPT")
    # --temperature 0 means greedy: the flag's own meaning, translated here; the values are checked by the resolver
    # (which also refuses NaN, which these comparisons let through).
    if temperature < 0:
        raise _UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}", 2)
    do_sample = temperature != 0
    if not do_sample and (top_k is not None or top_p is not None):
        raise _UsageError("--top-k/--top-p apply to sampling: add --temperature > 0", 2)
    if batch_size < 1:
        raise _UsageError(f"--batch-size must be >= 1, got {batch_size}", 2)
    torch_device = _generation_device(device)
    torch_dtype = _generation_dtype(dtype, torch_device)
    warn_slow_bf16(torch_device, torch_dtype, "--dtype bfloat16")
    _check_attn(attn, torch_device)
    prompts = _read_prompts(prompts_file) if prompts_file is not None else None

    started = time.perf_counter()
    tokenizer, tokens, model = _load_for_generation(model_dir, prompt, torch_dtype, torch_device, attn)
    try:
        settings = resolve_generation_settings(
            model.config, with_tokenizer_eos(model, tokenizer), names=_GENERATE_FLAGS, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature if do_sample else None, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, static_cache=compile, compile=compile)
    except (ValueError, TypeError) as error:
        raise _UsageError(str(error), 2) from error
    print(f"loaded {model_dir} ({model.num_parameters() / 1e6:.1f}M parameters, {model.dtype}, {torch_device}) in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    if prompts is not None:
        _generate_batches(model, tokenizer, prompts, settings, batch_size)
        return
    if tokens is not None:
        _stream_one(model, tokenizer, tokens, settings)
        return
    for tokens in _interactive_prompts(tokenizer):
        try:
            _stream_one(model, tokenizer, tokens, settings)
        except KeyboardInterrupt:  # Ctrl-C during an answer stops that answer; at the prompt it ends the session
            _write("\n")
            print("[stopped]", file=sys.stderr)


def _load_for_generation(model_dir, prompt, dtype, device, attn):
    """``(tokenizer, PROMPT's tokens or None, model)``; the tokenizer first (cheap): a PROMPT that tokenizes to
    nothing without a BOS token is refused before the weights load."""
    from diffllama.config import DiffLlamaConfig  # lazy: CLI startup time
    from diffllama.hub import resolve_checkpoint_dir  # lazy: CLI startup time
    from diffllama.generation import prompt_tokens  # lazy: CLI startup time
    from diffllama.modeling import DiffLlamaForCausalLM  # lazy: CLI startup time
    from diffllama.tokenizer import Tokenizer  # lazy: CLI startup time

    try:
        directory = resolve_checkpoint_dir(model_dir)
        DiffLlamaConfig.from_pretrained(directory)  # a folder that is no checkpoint at all: say so, not "no tokenizer"
        tokenizer = Tokenizer.from_pretrained(directory)
        try:
            tokens = None if prompt is None else prompt_tokens(tokenizer, prompt)
        except ValueError as error:
            raise _UsageError(f"{error}: give PROMPT some text", 2) from error
        with warnings.catch_warnings(record=True) as caught:  # held back: a task model's would repeat the error
            warnings.simplefilter("always")
            model = DiffLlamaForCausalLM.from_pretrained(directory, dtype=dtype, device=device,
                                                         attn_implementation=attn)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise _UsageError(f"MODEL_DIR_OR_REPO {model_dir!r}: {error}") from error
    except (ValueError, ImportError) as error:
        raise _UsageError(f"cannot load {model_dir!r}: {error}") from error
    if "lm_head.weight" in model.loading_report["new"]:  # a task model's folder: the head would be random
        raise _UsageError(f"{model_dir!r} has no language-model head (lm_head.weight is not in its weights: a "
                          f"fine-tuned task model?); generate needs a causal LM checkpoint")
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return tokenizer, tokens, model


def _warn_past_positions(model, n_tokens: int, max_new_tokens: int, where: str) -> None:
    import sys

    limit = model.config.max_position_embeddings
    if n_tokens + max_new_tokens > limit:
        print(f"warning: {where} has {n_tokens} tokens; with --max-new-tokens {max_new_tokens} it runs past "
              f"max_position_embeddings={limit}, where the model was not trained", file=sys.stderr)


def _stream_one(model, tokenizer, tokens: list[int], settings) -> None:
    """Stream one prompt's continuation to stdout, then its time to stderr."""
    import sys
    import time

    from diffllama.generation import stream_text  # lazy: CLI startup time

    _warn_past_positions(model, len(tokens), settings.max_new_tokens, "the prompt")
    t0 = time.perf_counter()
    for piece in stream_text(model, tokenizer, tokens, settings=settings):
        _write(piece)
    _write("\n")
    print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)


def _interactive_prompts(tokenizer):
    """The tokens of each line of stdin until an empty line or EOF; a line that is not UTF-8 is reported and
    skipped, one that tokenizes to nothing without a BOS token too."""
    import sys

    from diffllama.generation import prompt_tokens  # lazy: CLI startup time

    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = _utf8_line(sys.stdin.buffer.readline(), "that line")
            if not line.strip():
                return
            yield prompt_tokens(tokenizer, line)
        except (_UsageError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)


def _generate_batches(model, tokenizer, prompts: list[str], settings, batch_size: int) -> None:
    """Each prompt's continuation on one line of stdout (up to its first EOS; backslashes and line breaks escaped),
    generated in left-padded batches."""
    from diffllama.generation import pad_batch  # lazy: CLI startup time

    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer.encode_batch(prompts[start:start + batch_size])
        _warn_past_positions(model, max(len(e) for e in encoded), settings.max_new_tokens,
                             f"prompt batch {start // batch_size}")
        ids, mask = pad_batch(encoded, pad_token_id=settings.fill_token_id, device=model.device)
        out = model.generate(ids, mask, settings=settings)
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in settings.eos_token_id), len(row))
            text = tokenizer.decode(row[:cut])
            _write(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r") + "\n")

# ---- train / plot (training) ------------------------------------------------------------------------------------
def _run_reporting_errors(run, errors: tuple):
    """``run()``; the expected ``errors`` become one 'error: ...' line and exit code 1. Releases torch.distributed."""
    from diffllama.train.distributed import cleanup  # lazy: CLI startup time

    try:
        with _reported(errors):
            return run()
    finally:
        cleanup()


def _finished_summary(result, run_dir, resume_command: str) -> dict | None:
    """The run's summary to print, or None (ranks > 0, or a finished run resumed with nothing to do).

    An interrupted run exits 130 (SIGINT) or 143 (SIGTERM) after saying how to continue.
    """
    import os
    import sys

    if result.interrupted:
        saved = getattr(result, "checkpoint", None)
        print(f"interrupted by {result.interrupted} at step {result.step}; checkpoint: {saved or 'saved'}; "
              f"continue with: {resume_command}", file=sys.stderr)
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return None
    summary = result.metrics.get("summary")
    if not summary:
        print(f"nothing to do: {run_dir} is already at step {result.step} (raise --max-steps to train on)")
    return summary or None


def _flag(name: str) -> str:
    """The command-line flag of a config field: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def _field_flags(config_class, helps: dict[str, str], defaults: dict | None = None) -> list[inspect.Parameter]:
    """One typer option per field of ``config_class`` named in ``helps`` (its ``--help``), typed as the field:
    ``--field-name`` and its FLAG_ALIASES, or ``--x/--no-x`` for a bool. Each defaults to None, 'not given', so
    that the preset's and the config file's values stand unless a flag overrides them; ``defaults`` (what stands
    when none is given) are named in the help."""
    types = typing.get_type_hints(config_class)
    params = []
    for name, text in helps.items():
        flag = _flag(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if types[name] is bool else [flag, *FLAG_ALIASES.get(name, ())]
        if defaults and name in defaults:
            text = f"{text.removesuffix('.')} (default {defaults[name]})."
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=types[name],
                                        default=typer.Option(None, *decls, help=text)))
    return params


def _with_flags(params: list[inspect.Parameter]):
    """Decorate a command so that it also takes the options ``params`` (typer reads a command's options from its
    signature) and receives their values as one dict, its keyword argument ``settings`` (None: not given)."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [param for name, param in signature.parameters.items() if name != "settings"]

        @functools.wraps(command)
        def with_settings(**arguments):
            settings = {param.name: arguments.pop(param.name) for param in params}
            return command(**arguments, settings=settings)

        with_settings.__signature__ = signature.replace(parameters=own + params)
        with_settings.__annotations__ = {param.name: param.annotation for param in own + params}
        return with_settings

    return decorate


@app.command()
@_with_flags(_field_flags(TrainConfig, FLAG_HELP) + _field_flags(DiffLlamaConfig, TRAIN_MODEL_FLAG_HELP))
def train(
    config: str = typer.Option(None, "--config", help="YAML/TOML/JSON file of settings (see diffllama.train.config)."),
    out: str = typer.Option(None, "--out", help="Run folder (metrics, checkpoints, final model): a new or empty "
                            "folder, or an existing run's folder with --resume. Default: runs/PRESET."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out with the run's "
                                "settings: --max-steps and the logging, saving and device flags may change; flags "
                                "the checkpoint fixes (--lr, --seq-len, --arch, ...) are refused."),
    arch: str = typer.Option(None, "--arch", help="Architecture: diffllama (V1), diffllama-v2 (Differential "
                             "Transformer V2), llama; the preset's matching trio member. Default: the config "
                             "file's model.model_type, else diffllama."),
    *,
    settings: dict,
) -> None:
    """Train a DiffLlama (or V2, or Llama) language model from raw text; each checkpoint is a complete
    transformers-style model.

    Works on CPU, one GPU, or many GPUs under torchrun (torchrun --nproc_per_node=N -m diffllama train ...).
    Example: diffllama train --preset tiny --arch diffllama-v2 --out runs/tiny-diffllama-v2
    """
    from diffllama.train.data import CorpusError  # lazy: CLI startup time
    from diffllama.train.loop import BatchTooLargeError  # lazy: CLI startup time

    run_dir, result = _run_reporting_errors(functools.partial(_start_training, config, out, resume, arch, settings),
                                            (CorpusError, ValueError, FileNotFoundError, BatchTooLargeError,
                                             MemoryError))
    summary = _finished_summary(result, run_dir, f"diffllama train --out {run_dir} --resume")
    if summary:
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens; validation loss "
              f"{summary['val_loss']:.4f} nats/token = {summary['val_bits_per_byte']:.3f} bits/byte "
              f"(unigram entropy of the corpus: {summary['unigram_entropy_bits_per_byte']:.3f} bits/byte)\n"
              f"model: {summary['model_dir']}  (try: diffllama generate {summary['model_dir']} \"The people\")")


def _train_overrides(settings: dict, arch: str | None) -> dict:
    """The flags' settings as :func:`~diffllama.train.config.resolve_config` overrides: the model's fields gathered
    under ``model`` (``--arch`` as its ``model_type``), and no ``--data`` given as None (not given) rather than an
    empty corpus list. Raises ValueError naming ``--arch`` for an unknown architecture."""
    from diffllama.config import model_type_for_arch  # lazy: CLI startup time

    overrides = {name: value for name, value in settings.items() if name not in TRAIN_MODEL_FLAG_HELP}
    model = {name: settings[name] for name in TRAIN_MODEL_FLAG_HELP if settings[name] is not None}
    if arch is not None:
        try:
            model["model_type"] = model_type_for_arch(arch)
        except ValueError as error:
            raise ValueError(f"--{error}") from None
    return {**overrides, "data": list(overrides["data"]) if overrides["data"] else None, "model": model or None}


def _start_training(config: str | None, out: str | None, resume: bool, arch: str | None, settings: dict):
    """``(run folder, FitResult)`` of the run the flags describe: ``settings`` over the config file over the preset
    (resuming without --config and --preset, the run's own resolved config stands for the file)."""
    from pathlib import Path

    from diffllama.run_folder import latest_checkpoint  # lazy: CLI startup time
    from diffllama.train.checkpoint import check_run_dir  # lazy: CLI startup time
    from diffllama.train.loop import run_training  # lazy: CLI startup time

    overrides = _train_overrides(settings, arch)
    preset = overrides.pop("preset")
    if out is not None and not out.strip():  # Path("") would be the current folder
        raise ValueError("--out must be a folder path, got ''; leave --out out for the default runs/PRESET")
    name = preset or (read_config_file(config).get("preset") if config else None)
    run_dir = Path(out or f"runs/{name or 'tiny'}")
    check_run_dir(run_dir)
    if resume and latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume: no checkpoint in {run_dir} to resume from (drop --resume to start a new run)")
    saved, config_file = run_dir / "config.yaml", config
    if resume and not config and not preset and saved.is_file():
        config_file = str(saved)  # resuming: the run's own resolved config, then any flags given now
    # The trainer refuses, before any data work, settings that a resumed run could not honour.
    return run_dir, run_training(resolve_config(preset, config_file, overrides), run_dir, resume=resume)


@app.command()
def plot(
    run_dir: list[str] = typer.Argument(..., help="Run folders written by `diffllama train` (several: one image, "
                                        "each run in its own colour, e.g. the tiny trio of architectures)."),
    out: str = typer.Option(None, "--out", help="PNG path. Default: RUN_DIR/loss.png (one run; several need it)."),
) -> None:
    """Draw runs' training and validation loss (and learning rate) curves to a PNG file; the legend gives each
    run's last validation loss.

    Example: diffllama plot runs/tiny-diffllama runs/tiny-diffllama-v2 runs/tiny-llama --out runs/tiny-trio.png
    """
    from diffllama.train.plot import plot_run  # lazy: CLI startup time

    with _reported((FileNotFoundError, ValueError)):
        path = plot_run(run_dir, out)
    print(path)


# ---- convert (Llama -> DiffLlama) -------------------------------------------------------------------------------

@app.command()
def convert(
    src_dir: str = typer.Argument(..., metavar="SRC_DIR_OR_REPO", help="A transformers Llama checkpoint (folder or "
                                  "hub repo id; config.json model_type 'llama')."),
    out_dir: str = typer.Argument(..., help="The new checkpoint folder (must not exist, or be empty)."),
    arch: str = typer.Option(..., "--arch", help="diffllama-v2 (function-preserving: the same logits) or diffllama "
                             "(V1: an initialisation, not the same function)."),
) -> None:
    """Convert a Llama checkpoint to DiffLlama V2 or V1, tokenizer and generation config carried over; continue
    training it with `diffllama train --init-from OUT_DIR`.

    Example: diffllama convert meta-llama/Llama-3.2-1B llama-v2 --arch diffllama-v2
    """
    from diffllama.convert import CONVERSION_ARCHES, convert as convert_checkpoint  # lazy: CLI startup time

    with _reported((ValueError, FileNotFoundError, NotADirectoryError, ImportError)):
        if arch not in CONVERSION_ARCHES:
            raise _UsageError(f"--arch must be one of {', '.join(CONVERSION_ARCHES)} (what a Llama converts to), "
                              f"got {arch!r}", 2)
        path = convert_checkpoint(src_dir, out_dir, arch)
    print(f"wrote {path} ({arch}); continue training with: diffllama train --init-from {path} --out RUN_DIR")


# ---- finetune / predict (task heads) ----------------------------------------------------------------------------

_TASK_HELP = "sequence-classification, token-classification or question-answering."


def _task_options(task_name, labels=None, **options):
    """The task with its :class:`~diffllama.finetune.tasks.TaskOptions` (``labels``: comma-separated text or a
    list); a bad task name or option (TaskOptions and the task check them, naming the flag) is
    :class:`_UsageError` with exit code 2."""
    from diffllama.finetune.tasks import TaskOptions, get_task  # lazy: CLI startup time

    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",")]
    try:
        return get_task(task_name, TaskOptions(labels=labels, **options))
    except ValueError as error:
        raise _UsageError(str(error), 2) from None


def _check_out_file(flag: str, file) -> None:
    """Refuse an output file whose folder does not exist, or that is a directory (exit code 2)."""
    from pathlib import Path

    path = Path(file)
    if path.is_dir():
        raise _UsageError(f"{flag} {file} is a directory; expected a file path", 2)
    parent = path.parent
    if not parent.is_dir():
        raise _UsageError(f"{flag} {file}: its folder {parent} does not exist (create it first)", 2)


@app.command()
@_with_flags(_field_flags(TrainConfig, {name: FLAG_HELP[name] for name in FINETUNE_FLAGS}, FINETUNE_DEFAULTS))
def finetune(
    task: str = typer.Argument(..., help="Task: " + _TASK_HELP),
    model: str = typer.Option(..., "--model", help="Pretrained checkpoint directory (weights + tokenizer)."),
    data: str = typer.Option(..., "--data", help="Labelled training data: CSV/TSV/JSONL (classification), "
                             "CoNLL or JSONL token/tag lists (tagging), SQuAD JSON (QA)."),
    eval_data: str = typer.Option(None, "--eval-data", help="Labelled evaluation data (default: 10% of --data)."),
    test_data: str = typer.Option(None, "--test-data", help="Labelled test data, scored once after training."),
    text_column: str = typer.Option("text", help="Text column / key (classification)."),
    label_column: str = typer.Option("label", help="Label column / key (classification)."),
    tokens_column: str = typer.Option("tokens", help="JSONL key of the token list (tagging)."),
    tags_column: str = typer.Option("tags", help="JSONL key of the tag list (tagging)."),
    labels: str = typer.Option(None, help="Comma-separated label set, in order (default: sorted labels of --data)."),
    max_length: int = typer.Option(256, help="Tokens per sequence (per window for QA; a QA question may take up "
                                   "to --max-length - --stride - 2 tokens)."),
    stride: int = typer.Option(64, help="Overlap in tokens of consecutive QA context windows."),
    out: str = typer.Option(None, "--out", help="Run folder. Default: runs/finetune-TASK."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    *,
    settings: dict,
) -> None:
    """Fine-tune a pretrained DiffLlama checkpoint on labelled data; prints metrics and writes them to JSON.

    The checkpoint's weights load into the task's head (the new head weights are listed); training uses the
    `diffllama train` loop (progress, checkpoints, --resume, bf16, torchrun). RUN_DIR/model is the fine-tuned
    model (config.json with id2label/label2id, transformers' Auto classes load it); RUN_DIR/finetune_metrics.json
    holds the metrics. Example: diffllama finetune sequence-classification --model runs/tiny/model --data train.csv
    """
    from pathlib import Path

    from diffllama.finetune.data import DataError  # lazy: CLI startup time
    from diffllama.train.checkpoint import check_run_dir  # lazy: CLI startup time

    run_dir = Path(out or f"runs/finetune-{task}")
    with _reported(ValueError):  # arguments first, before any data is read or anything written
        task_obj = _task_options(task, labels, text_column=text_column, label_column=label_column,
                                 tokens_column=tokens_column, tags_column=tags_column, max_length=max_length,
                                 stride=stride)
        check_run_dir(run_dir)

    def run():
        return run_finetune(task_obj, finetune_config(settings), run_dir, model_dir=model, train_path=data,
                            eval_path=eval_data, test_path=test_data, resume=resume)

    result = _run_reporting_errors(run, (DataError, ValueError, FileNotFoundError, MemoryError))
    hint = resume_command(task, {  # every flag given: --resume refuses a change to those the checkpoint fixes
        "--model": model, "--data": data, "--eval-data": eval_data, "--test-data": test_data,
        "--text-column": text_column, "--label-column": label_column, "--tokens-column": tokens_column,
        "--tags-column": tags_column, "--labels": labels, "--max-length": max_length, "--stride": stride,
        "--out": run_dir, **{_flag(name): value for name, value in settings.items()}})
    summary = _finished_summary(result, run_dir, hint)
    if summary:
        _print_finetune_summary(summary, run_dir)


def _print_finetune_summary(summary: dict, run_dir) -> None:
    """The run's headline metrics as JSON on stdout (per-label tables stay in RUN_DIR/finetune_metrics.json)."""
    import json

    brief = {k: summary[k] for k in ("task", "steps", "baseline", "eval", "test", "test_baseline", "model_dir")
             if k in summary}
    for split in ("eval", "test"):
        if split in brief:
            brief[split] = {k: v for k, v in brief[split].items() if k not in ("per_label", "per_tag")}
    print(json.dumps(brief, indent=2))
    print(f"metrics: {run_dir / 'finetune_metrics.json'}")


@app.command()
def predict(
    task: str = typer.Argument(..., help="Task: " + _TASK_HELP),
    source: str = typer.Argument("-", help="Input file, or - for standard input (text lines or JSONL)."),
    model: str = typer.Option(..., "--model", help="A fine-tuned checkpoint directory (e.g. RUN_DIR/model)."),
    text_column: str = typer.Option("text", help="Text column / key (classification)."),
    label_column: str = typer.Option("label", help="Label column / key, used for metrics when present."),
    tokens_column: str = typer.Option("tokens", help="JSONL key of the token list (tagging)."),
    tags_column: str = typer.Option("tags", help="JSONL key of the tag list (tagging)."),
    max_length: int = typer.Option(None, help="Tokens per sequence (per window for QA). Default: the value the "
                                   "model was fine-tuned with (its train_config.yaml), else 256."),
    stride: int = typer.Option(None, help="Overlap of QA context windows. Default: the value the model was "
                               "fine-tuned with, else 64."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass (>= 1)."),
    device: str = typer.Option("auto", help="auto (cuda when available, as generate and train), cpu, cuda or cuda:N."),
    metrics_out: str = typer.Option(None, "--metrics-out", help="Write metrics JSON here (input with a gold label "
                                    "on every row; else a note says it was not written)."),
) -> None:
    """Predict with a fine-tuned model: one JSON line per input (label with scores, tags per word, answer span).

    When every input row carries a gold label, metrics are printed to stderr (and written to --metrics-out;
    without gold labels a note says the file was not written).
    Example: echo "A triumph of a film." | diffllama predict sequence-classification --model runs/ft/model -
    """
    import json
    import sys

    from diffllama.finetune.data import DataError  # lazy: CLI startup time
    from diffllama.finetune.predict import gold_metrics, predict as run_predict, read_input  # lazy: CLI startup time

    with _reported((DataError, ValueError, FileNotFoundError, NotADirectoryError)):
        # arguments and the checkpoint's class first, before any input is read or anything printed
        task_obj, torch_device = _prediction_task(
            task, model, dict(text_column=text_column, label_column=label_column, tokens_column=tokens_column,
                              tags_column=tags_column), max_length, stride, batch_size, device, metrics_out)
        examples = read_input(task_obj, source, sys.stdin.buffer.read() if source == "-" else None)
        predictions = run_predict(task_obj, model, examples, batch_size=batch_size, device=torch_device)
    scores = gold_metrics(task_obj, examples, predictions)
    _write_metrics_out(scores, metrics_out)  # first: a reader that stops early (| head) must not cost the file
    _print_predictions(task_obj, examples, predictions)
    if scores is not None:
        brief = {k: v for k, v in scores.items() if k not in ("per_label", "per_tag")}
        print(json.dumps({"metrics": brief}), file=sys.stderr)


def _prediction_task(task: str, model: str, columns: dict, max_length: int | None, stride: int | None,
                     batch_size: int, device: str, metrics_out: str | None):
    """``(task, torch device)`` for ``diffllama predict``, the arguments checked and the task's settings those of
    the checkpoint's head; ``max_length`` and ``stride`` default to the lengths the model was fine-tuned with
    (other ones would cut texts and QA windows differently from training)."""
    from diffllama.finetune.predict import check_checkpoint  # lazy: CLI startup time

    if batch_size < 1:
        raise _UsageError(f"--batch-size must be >= 1 (sequences per forward pass), got {batch_size}", 2)
    torch_device = _generation_device(device)
    if metrics_out:
        _check_out_file("--metrics-out", metrics_out)
    found = check_checkpoint(_task_options(task), model)  # the task's head class; its settings next
    given = {k: v for k, v in dict(max_length=max_length, stride=stride).items() if v is not None}
    return _task_options(task, found.labels, **columns, **{**found.settings, **given}), torch_device


def _write_metrics_out(scores: dict | None, metrics_out: str | None) -> None:
    """Write the metrics to ``--metrics-out`` if given, or say why not (input without gold labels)."""
    import sys

    from diffllama.finetune.predict import write_metrics  # lazy: CLI startup time

    if scores is not None and metrics_out:
        write_metrics(metrics_out, scores)
    elif metrics_out:  # said, not skipped silently: a missing file would be found only later
        print(f"note: --metrics-out {metrics_out} not written: metrics need a gold label on every input row, "
              f"and this input has rows without one", file=sys.stderr)


def _print_predictions(task_obj, examples, predictions) -> None:
    """One JSON line per input on stdout; a reader that closes the pipe ends the command quietly (exit 141)."""
    import json
    import os
    import sys

    from diffllama.finetune.predict import output_records  # lazy: CLI startup time

    try:
        for record in output_records(task_obj, examples, predictions):
            print(json.dumps(record, ensure_ascii=False))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader closed the pipe: stop quietly, as Unix tools do on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush would fail again
        raise typer.Exit(141)


# ---- serve (an OpenAI-compatible server) -------------------------------------------------------------------------

@app.command()
def serve(
    model_dir: str = typer.Argument(..., metavar="MODEL_DIR_OR_REPO",
                                    help="Checkpoint directory (config.json, safetensors, tokenizer) or a hub repo id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(16, "--max-batch", help="Requests decoded at once (KV-cache slots)."),
    max_seq_len: int = typer.Option(None, "--max-seq-len",
                                    help="Tokens per request, prompt included (default: max_position_embeddings)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests that may wait for a busy slot; "
                                 "beyond --max-batch running plus these, requests get 429."),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk",
                                      help="Prompt tokens prefilled per engine step, between decode steps."),
    api_key: str = typer.Option(None, "--api-key", envvar="DIFFLLAMA_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1/ (also from $DIFFLLAMA_API_KEY)."),
    served_model_name: str = typer.Option(None, "--served-model-name",
                                          help="Model id in the API (default: MODEL_DIR_OR_REPO as given)."),
    chat_template: str = typer.Option(None, "--chat-template",
                                      help="Jinja chat template file (default: the tokenizer's, if any)."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds a request may take (408 after)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="auto (checkpoint's on CUDA, float32 on CPU), float32, bfloat16, float16, float64."),
    attn: str = typer.Option("auto", "--attn-implementation", "--attn", help="Attention backend: eager, sdpa, flash, "
                             "auto (flash on a CUDA GPU with Triton, else sdpa)."),
) -> None:
    """Serve a checkpoint over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health,
    /metrics), with continuous batching. Needs FastAPI and uvicorn (the package's serve extra).

    Example: diffllama serve runs/tiny/model --port 8000
    """
    with _reported():
        _run_serve(model_dir, host=host, port=port, max_batch=max_batch, max_seq_len=max_seq_len,
                   max_queue=max_queue, prefill_chunk=prefill_chunk, api_key=api_key,
                   served_model_name=served_model_name, chat_template=chat_template,
                   request_timeout=request_timeout, device=device, dtype=dtype, attn=attn)


def _check_serve_numbers(*, port, max_batch, max_queue, prefill_chunk, max_seq_len, request_timeout) -> None:
    """A _UsageError (exit 2) naming the first serve flag whose number is out of range."""
    if not 0 <= port <= 65535:
        raise _UsageError(f"--port must be in [0, 65535], got {port}", 2)
    for flag, value, low in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                             ("--prefill-chunk", prefill_chunk, 1), ("--max-seq-len", max_seq_len, 2)):
        if value is not None and value < low:
            raise _UsageError(f"{flag} must be >= {low}, got {value}", 2)
    if request_timeout <= 0:
        raise _UsageError(f"--request-timeout must be > 0 seconds, got {request_timeout}", 2)


def _run_serve(model_dir, *, host, port, max_batch, max_seq_len, max_queue, prefill_chunk, api_key,
               served_model_name, chat_template, request_timeout, device, dtype, attn) -> None:
    import sys

    try:
        from diffllama.serve import api  # lazy: CLI startup time
    except ImportError as error:
        raise _UsageError(f"diffllama serve needs FastAPI and uvicorn: pip install 'diffllama[serve]' ({error})")
    from diffllama.config import DiffLlamaConfig  # lazy: CLI startup time
    from diffllama.hub import resolve_checkpoint_dir  # lazy: CLI startup time
    from diffllama.modeling import DiffLlamaForCausalLM  # lazy: CLI startup time
    from diffllama.serve.engine import Engine  # lazy: CLI startup time
    from diffllama.tokenizer import Tokenizer  # lazy: CLI startup time

    # Every argument is checked before the checkpoint loads (which may take minutes), so that a typo fails at once.
    _check_serve_numbers(port=port, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                         max_seq_len=max_seq_len, request_timeout=request_timeout)
    torch_device = _generation_device(device)
    torch_dtype = _generation_dtype(dtype, torch_device)
    _check_attn(attn, torch_device)
    template_file = None
    if chat_template is not None:
        try:
            template_file = api.load_chat_template(None, chat_template)
        except (OSError, UnicodeDecodeError) as error:
            raise _UsageError(f"--chat-template {chat_template!r}: {error}", 2) from error
    _check_bind(host, port)
    try:
        directory = resolve_checkpoint_dir(model_dir)
        limit = DiffLlamaConfig.from_pretrained(directory).max_position_embeddings
        if max_seq_len is not None and max_seq_len > limit:  # refused before the KV cache is allocated
            raise _UsageError(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings "
                              f"({limit})", 2)
        tokenizer = Tokenizer.from_pretrained(directory)
        template = template_file if template_file is not None else api.load_chat_template(directory)
        model = DiffLlamaForCausalLM.from_pretrained(directory, dtype=torch_dtype, device=torch_device,
                                                     attn_implementation=attn)
        engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, max_queue=max_queue,
                        prefill_chunk=prefill_chunk)
        app = api.create_app(engine, tokenizer, served_model_name or model_dir, api_key=api_key,
                             request_timeout=request_timeout, chat_template=template)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise _UsageError(f"MODEL_DIR_OR_REPO {model_dir!r}: {error}") from error
    except (ValueError, ImportError) as error:
        raise _UsageError(f"cannot serve {model_dir!r}: {error}") from error
    if "lm_head.weight" in model.loading_report["new"]:
        raise _UsageError(f"{model_dir!r} has no language-model head (lm_head.weight is not in its weights: a "
                          f"fine-tuned task model?); serve needs a causal LM checkpoint")
    warning = api.exposure_warning(host, api_key)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"serving {served_model_name or model_dir} ({model.num_parameters() / 1e6:.1f}M parameters, {model.dtype}, "
          f"{torch_device}; {max_batch} slots of {engine.max_seq_len} tokens) on http://{host}:{port}/v1"
          + ("" if template else " (no chat template: /v1/chat/completions answers 400)"), file=sys.stderr)
    api.serve(app, host=host, port=port)


def _check_bind(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (IPv6 for a host with ':', SO_REUSEADDR), then close it at once: a host
    that does not resolve or is not this machine's, or a port in use, fails in one line before the model loads
    rather than in a uvicorn traceback after. A pre-check only: the port may still be taken between this close
    and uvicorn's bind (uvicorn then reports it); holding the socket open would need uvicorn to take it over."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as error:
        raise _UsageError(f"--host {host!r} does not resolve: {error}", 2) from error
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise _UsageError(f"--port {port}: {host}:{port} is already in use (another server?): pick another "
                              f"--port or stop that process") from error
        if error.errno == errno.EACCES:
            raise _UsageError(f"--port {port}: permission denied to bind {host}:{port} (ports below 1024 need "
                              f"privileges): pick another --port") from error
        raise _UsageError(f"--host {host!r}: cannot bind {host}:{port}: {error}", 2) from error
# ---- eval (evaluations of differential attention) ---------------------------------------------------------------

def _int_list(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated integers, or None for an empty/absent value; a _UsageError (exit 2) names ``flag``."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise _UsageError(f"{flag} must be comma-separated integers, got {text!r}", 2) from None


@app.command("eval")
def eval_command(
    model_dir: str = typer.Argument(..., help="Checkpoint directory (weights + tokenizer), e.g. runs/tiny/model."),
    task: list[str] = typer.Option(None, "--task", help="perplexity, needle, attention, outliers, quantization, "
                                   "icl, harness (repeatable or comma-separated). Default: all but harness."),
    out: str = typer.Option(None, "--out", help="Output folder for results.json and the PNGs. Default: "
                            "MODEL_DIR/eval."),
    text: list[str] = typer.Option(None, "--text", help="Text file (repeatable) for perplexity, outliers and the "
                                   "quantised losses. Default: the held-out split of the bundled corpus."),
    window: int = typer.Option(None, help="Perplexity window in tokens (default: the model's maximum)."),
    stride: int = typer.Option(None, help="Perplexity window step (default: the window; smaller = sliding)."),
    max_tokens: int = typer.Option(16384, help="Held-out tokens scored for perplexity (0 = all)."),
    lengths: str = typer.Option(None, help="Needle context lengths, comma-separated (default: 1k, 2k, ... up to "
                                "the model's maximum; half and all of it below 1k)."),
    samples: int = typer.Option(1, help="Needle samples per (N, R), length and depth."),
    outlier_sequences: int = typer.Option(4, help="Windows of the model's length for the outlier statistics."),
    bits: str = typer.Option("8,6,4", help="Attention-logit quantisation widths, comma-separated."),
    icl_train: str = typer.Option(None, help="Labelled CSV/JSONL for ICL demonstrations (default: "
                                  "the bundled Rotten Tomatoes slice, diffllama/data/rt_train.csv)."),
    icl_test: str = typer.Option(None, help="Labelled CSV/JSONL scored by ICL (default: diffllama/data/rt_test.csv)."),
    harness_tasks: str = typer.Option(None, help="lm_eval task names for --task harness, comma-separated."),
    include_path: str = typer.Option(None, help="Folder of lm_eval task YAMLs (e.g. docs/eval_tasks)."),
    seed: int = typer.Option(0, help="Seed of the needle samples and ICL orders."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    num_threads: int = typer.Option(0, help="CPU threads for torch (0 = torch's default; 1 is much faster on a "
                                    "CPU shared with other jobs)."),
) -> None:
    """Evaluate a checkpoint: perplexity, multi-needle retrieval, attention allocation, outliers, quantisation and
    ICL order robustness (arXiv 2410.05258 §3); writes OUT/results.json and PNG plots, prints a summary.

    Example: diffllama eval runs/tiny/model --task needle,attention --samples 2
    """
    from pathlib import Path

    from diffllama.eval.runner import evaluate, summary  # lazy: CLI startup time

    with _reported(ValueError, code=2):
        settings = _eval_settings(task, text=text, window=window, stride=stride, max_tokens=max_tokens,
                                  lengths=lengths, samples=samples, outlier_sequences=outlier_sequences, bits=bits,
                                  icl_train=icl_train, icl_test=icl_test, seed=seed, harness_tasks=harness_tasks,
                                  include_path=include_path)
        torch_device = _generation_device(device)
        if num_threads < 0:
            raise _UsageError(f"--num-threads must be >= 0 (0 = torch's default), got {num_threads}", 2)
        folder = Path(out or Path(model_dir) / "eval")
        if folder.exists() and not folder.is_dir():
            raise _UsageError(f"--out {str(folder)!r} is a file: give a folder for the results", 2)
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    with _reported((FileNotFoundError, NotADirectoryError, ValueError, ImportError)):
        results = evaluate(model_dir, folder, settings, device=str(torch_device))
    print(summary(results))
    print(f"results: {folder / 'results.json'}")


def _eval_settings(task, *, text, lengths, bits, harness_tasks, **options):
    """The checked :class:`~diffllama.eval.runner.EvalSettings` of the eval flags (lists given comma-separated or
    repeated); ValueError or a _UsageError naming the bad one."""
    from diffllama.eval.runner import EvalSettings  # lazy: CLI startup time

    tasks = [t.strip() for item in task or [] for t in item.split(",") if t.strip()]
    settings = EvalSettings(texts=list(text or []), lengths=_int_list(lengths, "--lengths"),
                            bits=_int_list(bits, "--bits") or [],
                            harness_tasks=[t for t in (harness_tasks or "").split(",") if t], **options)
    if tasks:
        settings.tasks = tasks
    settings.check()
    return settings


def main() -> None:
    """Entry point of the ``diffllama`` command and of ``python -m diffllama``."""
    import os
    import sys

    if not sys.stdout.isatty():  # piped --help: rich would assume 80 columns and cut the long flag names short
        os.environ.setdefault("COLUMNS", "140")
    warnings.showwarning = _show_warning
    app()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning as one ``warning: ...`` line: the file, line and source line Python adds mean nothing to
    a user of the command."""
    import sys

    print(f"warning: {message}", file=file or sys.stderr)
