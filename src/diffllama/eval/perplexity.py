"""Perplexity and bits per byte, with a sliding window for texts longer than the model's context.

Tokens are predicted in chunks of ``stride``: each forward pass feeds the (at most ``window``) tokens that precede
the chunk's end and scores the chunk's tokens only, so every token after the first is predicted exactly once, and
(once the stream is longer than a window) with at least ``window − stride + 1`` tokens of context.
``stride == window`` gives the non-overlapping windows of the training loop's validation loss (``window`` inputs,
``window`` targets).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffllama.train.data import bundled_corpus, prepare_data


@torch.no_grad()
def sliding_window_nll(model, tokens: list[int] | torch.Tensor, window: int, stride: int | None = None,
                       batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``tokens[1:]`` given what precedes them, and the count scored.

    Args:
        tokens: one token stream (N,). window: input tokens per forward pass, >= 1. stride: tokens scored per
            pass, 1 <= stride <= window (default ``window``). batch_size: windows per forward pass.

    Raises:
        ValueError: a bad window or stride, or fewer than 2 tokens.
    """
    stride = window if stride is None else stride
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    jobs = []  # (begin, end, first): inputs tokens[begin:end-1], targets tokens[first:end]
    first = 1
    while first < n:
        end = min(first + stride, n)
        jobs.append((max(0, end - 1 - window), end, first))
        first = end
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        width = max(end - 1 - begin for begin, end, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (begin, end, _) in enumerate(chunk):
            ids[row, :end - 1 - begin] = tokens[begin:end - 1]
            mask[row, :end - 1 - begin] = 1
        logits = model(ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        for row, (begin, end, first) in enumerate(chunk):
            targets = tokens[first:end].to(device)  # token t is predicted at input position t - 1 - begin
            predictions = logits[row, first - 1 - begin:end - 1 - begin]
            total += float(F.cross_entropy(predictions.double(), targets, reduction="sum"))
            count += targets.numel()
    return total, count


def perplexity_of_texts(model, tokenizer, texts: list[str], window: int, stride: int | None = None,
                        batch_size: int = 8) -> dict:
    """Loss of each text (tokenized without special tokens, scored independently), pooled.

    Returns:
        ``{"nats_per_token", "perplexity", "bits_per_byte", "tokens", "bytes"}``; bits per byte divide the total
        bits by the UTF-8 bytes of the texts (the first token of each text is not scored, its bytes count).

    Raises:
        ValueError: no text with at least 2 tokens.
    """
    total = count = nbytes = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) < 2:
            continue
        nll, n = sliding_window_nll(model, ids, window, stride, batch_size)
        total, count, nbytes = total + nll, count + n, nbytes + len(text.encode("utf-8"))
    if count == 0:
        raise ValueError("no text has at least 2 tokens to score")
    return {"nats_per_token": total / count, "perplexity": math.exp(total / count),
            "bits_per_byte": total / math.log(2) / nbytes, "tokens": count, "bytes": nbytes}


def held_out_tokens(tokenizer, max_tokens: int | None = None) -> tuple[torch.Tensor, float]:
    """The validation split of the bundled corpus as ``diffllama train`` makes it for this tokenizer
    (:func:`diffllama.train.data.prepare_data`; cached, built on first use), cut to ``max_tokens``; and its tokens
    per byte (to turn nats per token into bits per byte as the training loop reports them)."""
    import numpy as np


    folder, meta = prepare_data([bundled_corpus()], tokenizer)
    parts = [np.memmap(folder / name, dtype=np.dtype(meta.dtype), mode="r") for name in meta.val_shards]
    tokens = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return (tokens[:max_tokens] if max_tokens else tokens), meta.val_tokens / meta.val_bytes


def held_out_perplexity(model, tokenizer, window: int, stride: int | None = None, max_tokens: int | None = None,
                        batch_size: int = 8) -> dict:
    """:func:`sliding_window_nll` over :func:`held_out_tokens`; the same keys as :func:`perplexity_of_texts`
    (``bytes`` estimated from the split's tokens per byte)."""
    tokens, tokens_per_byte = held_out_tokens(tokenizer, max_tokens)
    total, count = sliding_window_nll(model, tokens, window, stride, batch_size)
    return {"nats_per_token": total / count, "perplexity": math.exp(total / count),
            "bits_per_byte": total / count / math.log(2) * tokens_per_byte, "tokens": count,
            "bytes": round(count / tokens_per_byte)}
