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
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [c + x for c, x in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq, device=device)
            mask[row, :len(seq)] = 1
        logprobs = F.log_softmax(model(ids, attention_mask=mask, use_cache=False).logits.double(), dim=-1)
        for row, (context, continuation) in enumerate(chunk):
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=device)
            target = torch.tensor(continuation, device=device)
            scores = logprobs[row, positions]  # (n, vocab): the predictions of each continuation token
            results.append((float(scores.gather(1, target[:, None]).sum()),
                            bool((scores.argmax(-1) == target).all())))
    return results
