"""Robustness to low-bit attention logits (Ye et al., arXiv 2410.05258, §3.8, Fig. 8).

Each attention layer runs the paper's formula from its recomputed logits
(:func:`diffllama.eval.attention_maps.reference_attention`) after absmax fake quantisation to 8, 6 and 4 bits
(:func:`~diffllama.eval.attention_maps.fake_quantize`: one scale per batch row and head); "none" is the model
unchanged. Reported: the held-out loss and the needle accuracy at each width.
"""

from __future__ import annotations

import contextlib

from diffllama.eval.attention_maps import check_bits, reference_attention_path
from diffllama.eval.needle import score_samples
from diffllama.eval.perplexity import sliding_window_nll

BITS = (8, 6, 4)


def quantization_robustness(model, tokenizer, tokens, window: int, samples, bits=BITS, maps_fn=None,
                            batch_size: int = 8, progress: bool = True) -> dict:
    """``{"none" | "8" | ...: {"loss": nats/token, "needle_accuracy": acc}}`` over the token stream ``tokens``
    (non-overlapping windows of ``window``) and the needle ``samples`` (nan accuracy when there are none).

    Raises:
        ValueError: a width outside [2, 16] (before any work).
    """
    for b in bits:
        check_bits(b)
    widths = [None, *bits]
    out = {}
    for width in widths:
        context = contextlib.nullcontext() if width is None else reference_attention_path(model, width, maps_fn)
        with context:
            total, count = sliding_window_nll(model, tokens, window, batch_size=batch_size)
            scored = score_samples(model, tokenizer, samples, progress, desc=f"needle@{width or 'full'}",
                                   use_cache=width is None)
        accuracy = [sum(s.results) / len(s.results) for s in scored]
        out["none" if width is None else str(width)] = {
            "loss": total / count, "needle_accuracy": sum(accuracy) / len(accuracy) if accuracy else float("nan")}
    return out
