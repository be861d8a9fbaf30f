"""lm-evaluation-harness support: the ``diffllama`` model class (lm_eval >= 0.4; ``pip install diffllama[eval]``).

Importing this module registers :class:`DiffLlamaLM` under the name ``diffllama``. lm_eval 0.4 finds models only
in its own registry (no entry-point discovery), so the registration must be imported before lm_eval's command
line runs; ``python -m diffllama.eval.harness ARGS`` does exactly that and then runs lm_eval's command line with
ARGS unchanged, e.g.::

    python -m diffllama.eval.harness --model diffllama --model_args pretrained=runs/tiny/model \\
        --tasks rt_sentiment --include_path docs/eval_tasks

In Python: ``import diffllama.eval.harness`` and then ``lm_eval.simple_evaluate(model="diffllama", ...)``, or
:func:`run_harness`.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from diffllama.eval.perplexity import sliding_window_nll
from diffllama.eval.scoring import continuation_logprobs, greedy_continuation
from diffllama.modeling import DiffLlamaForCausalLM
from diffllama.tokenizer import Tokenizer


@register_model("diffllama")
class DiffLlamaLM(LM):
    """A diffllama causal LM for lm_eval: loglikelihood, loglikelihood_rolling and greedy generate_until.

    Args (``--model_args``): pretrained: checkpoint directory or hub id (weights + tokenizer). device: "cpu",
    "cuda", ... (default cuda; as lm_eval's own HF model, a CUDA device falls back to the CPU, with a message on
    stderr, where CUDA is not available, since lm_eval's command line passes ``cuda`` unless told otherwise). dtype: "float32", "bfloat16", ... (default float32 on CPU, the
    checkpoint's on CUDA). batch_size: sequences per forward pass (default 8). max_length: context tokens
    (default: the config's ``max_position_embeddings``); longer inputs lose tokens at the left.

    Raises:
        ValueError: a bad batch_size or max_length; errors of ``from_pretrained`` for a bad checkpoint.
    """

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None, batch_size=8,
                 max_length: int | None = None, **_ignored) -> None:
        super().__init__()
        import sys

        import torch


        batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # lm_eval may pass "auto"
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        target = torch.device(device or "cuda")
        if target.type == "cuda" and not torch.cuda.is_available():  # lm_eval's CLI asks for cuda by default
            print(f"diffllama: device {device or 'default'}: CUDA is not available, running on cpu", file=sys.stderr)
            target = torch.device("cpu")
        self.model = DiffLlamaForCausalLM.from_pretrained(
            pretrained, device=target, dtype=dtype or ("float32" if target.type == "cpu" else None)).eval()
        self.tokenizer = Tokenizer.from_pretrained(pretrained)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.batch_size = batch_size

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prefix(self) -> list[int]:
        """The token a text with no context is conditioned on: EOS, the document separator in training."""
        return [self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context) in nats, whether it is the greedy continuation) per request."""

        pairs = []
        for request in requests:
            context, continuation = request.args
            # as lm_eval's HF model: spaces at the end of the context belong to the continuation
            stripped = context.rstrip(" ")
            continuation = context[len(stripped):] + continuation
            context_ids = self._encode(stripped) or self._prefix()
            continuation_ids = self._encode(continuation)[-(self.max_length - 1):]
            pairs.append((context_ids[-(self.max_length - len(continuation_ids)):], continuation_ids))
        return continuation_logprobs(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log P(text) in nats per request: every token scored once, in windows of ``max_length`` (the first
        token conditioned on EOS)."""

        out = []
        for request in requests:
            (text,) = request.args
            ids = self._prefix() + self._encode(text)
            out.append(-sliding_window_nll(self.model, ids, self.max_length, batch_size=self.batch_size)[0]
                       if len(ids) >= 2 else 0.0)
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuation of each context up to ``max_gen_toks`` tokens (default 256), cut at the first of
        the ``until`` strings."""

        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = (self._encode(context) or self._prefix())[-(self.max_length - max_new):]
            text = self.tokenizer.decode(greedy_continuation(self.model, ids, max_new))
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            out.append(text[:min(cuts)] if cuts else text)
        return out


def run_harness(model_dir: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                device: str | None = None, batch_size: int = 8) -> dict:
    """``lm_eval.simple_evaluate`` with this model class; returns lm_eval's ``results`` dict (metrics per task).

    Raises:
        ValueError: no task given; lm_eval's own errors for unknown tasks.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("give at least one lm_eval task")
    model_args = f"pretrained={model_dir}" + (f",device={device}" if device else "")
    results = lm_eval.simple_evaluate(model="diffllama", model_args=model_args, tasks=list(tasks),
                                      task_manager=TaskManager(include_path=include_path), limit=limit,
                                      batch_size=batch_size)
    return results["results"]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
