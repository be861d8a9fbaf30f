"""Scoring helpers every evaluation shares: greedy continuation and continuation log-likelihoods.

Log-likelihoods (and greedy decoding unless asked otherwise) run full forward passes without a KV cache, so the
hooks of :mod:`diffllama.eval.attention_maps` (which recompute attention from a layer's whole input) see every
position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def greedy_continuation(model, input_ids: list[int], max_new_tokens: int, use_cache: bool = False) -> list[int]:
    """The ``max_new_tokens`` tokens greedy decoding appends to ``input_ids`` (one sequence).

    ``use_cache=True`` decodes with the model's KV cache (``model.generate``; it may stop early at EOS);
    ``False`` runs one full forward pass per token, which the hooks of :mod:`diffllama.eval.attention_maps` need.

    Raises:
        ValueError: empty ``input_ids`` or ``max_new_tokens`` < 1.
    """
    if not input_ids:
        raise ValueError("input_ids must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    if use_cache:
        return model.generate(ids, torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False)[0, len(input_ids):].tolist()
    new = []
    for _ in range(max_new_tokens):
        next_id = model(ids, use_cache=False).logits[0, -1].argmax()
        new.append(int(next_id))
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return new


def _batched_logits(model, sequences: list[list[int]], batch_size: int):
    """Yield ``(index, logits (S_i, vocab))`` for each sequence, run in right-padded batches of ``batch_size``."""
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, device=device)
            mask[row, :len(seq)] = 1
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        for row, seq in enumerate(chunk):
            yield start + row, logits[row, :len(seq)]


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8
                          ) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)`` token-id pair: the summed log-probability (nats) of the continuation
    given the context, and whether greedy decoding would produce it (every continuation token is the argmax).

    Sequences are right-padded in batches of ``batch_size``; context + continuation must fit the model (the
    caller cuts the context's left end). This is lm-evaluation-harness' ``loglikelihood`` contract.

    Raises:
        ValueError: an empty continuation, or a pair with no context token (nothing to condition on).
    """
    for context, continuation in pairs:
        if not continuation or not context:
            raise ValueError("each pair needs a non-empty context and a non-empty continuation")
    results = []
    for index, logits in _batched_logits(model, [c + x for c, x in pairs], batch_size):
        context, continuation = pairs[index]
        target = torch.tensor(continuation, device=logits.device)
        # (n, vocab): the predictions of the continuation's tokens
        scores = F.log_softmax(logits[len(context) - 1:len(context) + len(continuation) - 1].double(), dim=-1)
        results.append((float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all())))
    return results


@torch.no_grad()
def next_token_logprobs(model, contexts: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """The log-probabilities (float64, (vocab,)) of the token after each context (right-padded batches).

    Raises:
        ValueError: an empty context.
    """
    if any(not c for c in contexts):
        raise ValueError("each context needs at least one token")
    return [F.log_softmax(logits[-1].double(), dim=-1) for _, logits in _batched_logits(model, contexts, batch_size)]
