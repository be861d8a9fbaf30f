"""The ``diffllama`` command line: one typed function per subcommand; each docstring is its ``--help``."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="DiffLlama: train, generate with and fine-tune differential-attention language models.")

# ---- generate (inference) ---------------------------------------------------------------------------------------

# ---- train / plot (training) ------------------------------------------------------------------------------------

@app.command()
def train(
    preset: str = typer.Option(None, help="Preset: tiny (CPU), small, 0.4b, 1b. Default: the config file's, else tiny."),
    config: str = typer.Option(None, "--config", help="YAML/TOML/JSON file of settings (see diffllama.train.config)."),
    data: list[str] = typer.Option(None, "--data", help="Corpus: text files, folders, JSONL (repeatable). "
                                   "Default: the bundled State of the Union corpus."),
    out: str = typer.Option(None, "--out", help="Run folder (metrics, checkpoints, final model). Default: runs/PRESET."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    max_steps: int = typer.Option(None, help="Optimizer steps."),
    batch_size: int = typer.Option(None, help="Sequences per micro-batch per process."),
    grad_accum: int = typer.Option(None, help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(None, help="Tokens per sequence."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    warmup_steps: int = typer.Option(None, help="Linear warm-up steps before the cosine decay."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay (matrices only)."),
    grad_clip: float = typer.Option(None, help="Max gradient norm (0 = off)."),
    eval_every: int = typer.Option(None, help="Steps between validation passes."),
    eval_batches: int = typer.Option(None, help="Validation batches per pass."),
    log_every: int = typer.Option(None, help="Steps between metric records."),
    save_every: int = typer.Option(None, help="Steps between checkpoints (0 = only at the end)."),
    keep_last: int = typer.Option(None, help="Checkpoints to keep."),
    seed: int = typer.Option(None, help="Seed for weights, data order and dropout."),
    device: str = typer.Option(None, help="auto, cpu, cuda."),
    dtype: str = typer.Option(None, help="auto (bf16 autocast on CUDA), float32, bfloat16."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile each decoder layer."),
    activation_checkpointing: bool = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing",
                                                  help="Recompute layer activations in backward."),
    parallel: str = typer.Option(None, help="auto (DDP under torchrun), none, ddp, fsdp (FSDP2)."),
    tokenizer: str = typer.Option(None, help="Reuse the tokenizer in this folder instead of training a BPE."),
    vocab_size: int = typer.Option(None, help="BPE vocabulary size to train."),
    text_field: str = typer.Option(None, help="JSONL key holding the text."),
    val_fraction: float = typer.Option(None, help="Share of documents held out for validation."),
    cache_dir: str = typer.Option(None, help="Tokenized-data cache (default ~/.cache/diffllama)."),
    num_threads: int = typer.Option(None, help="CPU threads for torch (0 = default)."),
    attn_implementation: str = typer.Option(None, help="Attention backend: eager, sdpa, flash, auto."),
) -> None:
    """Train a DiffLlama language model from raw text; each checkpoint is a complete transformers-style model.

    Works on CPU, one GPU, or many GPUs under torchrun (torchrun --nproc_per_node=N -m diffllama train ...).
    Example: diffllama train --preset tiny --out runs/tiny
    """
    import sys
    from pathlib import Path

    from diffllama.train.config import read_config_file, resolve_config
    from diffllama.train.data import CorpusError
    from diffllama.train.distributed import cleanup
    from diffllama.train.loop import BatchTooLargeError, run_training

    flags = dict(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                 warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
                 eval_batches=eval_batches, log_every=log_every, save_every=save_every, keep_last=keep_last,
                 seed=seed, device=device, dtype=dtype, compile=compile,
                 activation_checkpointing=activation_checkpointing, parallel=parallel, tokenizer=tokenizer,
                 tokenizer_vocab_size=vocab_size, text_field=text_field, val_fraction=val_fraction,
                 cache_dir=cache_dir, num_threads=num_threads, data=list(data) if data else None,
                 model={"attn_implementation": attn_implementation} if attn_implementation else None)
    try:
        name = preset or (read_config_file(config).get("preset") if config else None)
        run_dir = Path(out or f"runs/{name or 'tiny'}")
        saved = run_dir / "config.yaml"
        if resume and not config and not preset and saved.is_file():
            config = str(saved)  # resuming: the run's own resolved config, then any flags given now
        cfg = resolve_config(preset, config, flags)
        result = run_training(cfg, run_dir, resume=resume)
    except (CorpusError, ValueError, FileNotFoundError, BatchTooLargeError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1)
    finally:
        cleanup()
    if result.interrupted:
        print(f"interrupted by {result.interrupted} at step {result.step}; checkpoint: {result.checkpoint}; "
              f"continue with: diffllama train --out {run_dir} --resume", file=sys.stderr)
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)
    summary = result.metrics.get("summary")
    if summary:
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens; validation loss "
              f"{summary['val_loss']:.4f} nats/token = {summary['val_bits_per_byte']:.3f} bits/byte "
              f"(unigram entropy of the corpus: {summary['unigram_entropy_bits_per_byte']:.3f} bits/byte)\n"
              f"model: {summary['model_dir']}  (try: diffllama generate {summary['model_dir']} \"The people\")")


@app.command()
def plot(
    run_dir: str = typer.Argument(..., help="A run folder written by `diffllama train`."),
    out: str = typer.Option(None, "--out", help="PNG path. Default: RUN_DIR/loss.png."),
) -> None:
    """Draw a run's training and validation loss (and learning rate) curves to a PNG file."""
    import sys

    from diffllama.train.plot import plot_run

    try:
        path = plot_run(run_dir, out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1)
    print(path)


# ---- finetune / predict (task heads) ----------------------------------------------------------------------------


def main() -> None:
    """Entry point of ``python -m diffllama``."""
    app()
