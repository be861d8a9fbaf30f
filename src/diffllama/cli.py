"""The ``diffllama`` command line: one typed function per subcommand; each docstring is its ``--help``."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="DiffLlama: train, generate with and fine-tune differential-attention language models.")

# ---- generate (inference) ---------------------------------------------------------------------------------------

# ---- train / plot (training) ------------------------------------------------------------------------------------

# ---- finetune / predict (task heads) ----------------------------------------------------------------------------


def main() -> None:
    """Entry point of ``python -m diffllama``."""
    app()
