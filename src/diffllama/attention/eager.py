"""Eager differential attention: explicit scores and softmax, the reference every other backend must match.

Source: Ye et al., "Differential Transformer" (arXiv 2410.05258) §2.1, in the single-softmax-per-head form of
DESIGN.md §1 step 4. It is the only backend that can return the attention probabilities. :func:`plain_attention`
is the same computation without the pairing, for the Llama and V2 attention modules.
"""

from __future__ import annotations

import torch

from diffllama.attention.contract import AttentionMask, check_inputs, combine_pairs, pair_values


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: AttentionMask,
    *,
    scale: float,
    lambda_full: torch.Tensor,
    dropout_p: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head softmax attention over a 2·head_dim wide paired value.

    Args:
        query: (B, H, Sq, d). key, value: (B, KV, Sk, d), same dtype. mask: which keys each query sees.
        scale: the softmax temperature, head_dim ** -0.5 for DiffLlama.
        lambda_full: the layer's scalar λ (0-dim tensor, the activation dtype) weighting the second softmax.
        dropout_p: dropout on the attention probabilities (training only); one mask per head, shared by both
            halves of the 2d-wide value, so ``o1`` and ``o2`` of a head see the same dropped keys.
        output_attentions: also return the probabilities.

    Returns:
        ``(out, probs)``: out (B, Sq, H/2, 2d) = o1 − λ·o2 in the query dtype; probs (B, H, Sq, Sk) or None. The softmax runs in
        float32 for half types and float64 for float64; rows with no visible key give zeros.

    Raises:
        ValueError, TypeError: inputs that break the shared contract (:func:`diffllama.attention.check_inputs`).
    """
    check_inputs(query, key, value, mask)
    key, value2 = pair_values(key, value, query.shape[1])
    out, probs = _softmax_attention(query, key, value2, mask, scale, dropout_p)
    return combine_pairs(out, lambda_full), (probs if output_attentions else None)


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, *,
                    scale: float, dropout_p: float = 0.0, output_attentions: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain softmax attention (Llama's, and DiffLlama V2's over its 2h query heads), query head j reading key head
    ``j // (H / KV)``.

    Args:
        query: (B, H, Sq, d), any H that is a multiple of KV. key, value: (B, KV, Sk, d), same dtype.
        mask, scale, dropout_p, output_attentions: as :func:`attention` (one dropout mask per head).

    Returns:
        ``(out, probs)``: out (B, Sq, H, d) in the query dtype; probs (B, H, Sq, Sk) or None. Softmax precision and
        rows with no visible key as :func:`attention`.

    Raises:
        ValueError, TypeError: inputs that break the shared contract (``check_inputs(..., paired=False)``).
    """
    check_inputs(query, key, value, mask, paired=False)
    out, probs = _softmax_attention(query, key, value, mask, scale, dropout_p)
    return out.transpose(1, 2), (probs if output_attentions else None)


def _softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask,
                       scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Sq, d) queries over (B, n, Sk, d) keys and (B, n, Sk, dv) values, H a multiple of n -> per-head
    outputs (B, H, Sq, dv) and probabilities (B, H, Sq, Sk), both in the query dtype."""
    group = query.shape[1] // key.shape[1]
    b, h, sq, d = query.shape
    # Group query heads by the key head they read: (B, n, group, Sq, d) against (B, n, 1, Sk, d).
    q = query.view(b, key.shape[1], group, sq, d)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scale  # (B, n, group, Sq, Sk)
    scores = scores.view(b, h, sq, -1)
    # Half types take the softmax in float32 (as transformers); float64 stays float64.
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    # A finite fill (not -inf) keeps rows with no visible key finite; they are zeroed just below.
    scores = scores.masked_fill(~mask.dense(), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    has_keys = mask.query_has_keys()
    if has_keys is not None:
        probs = probs * has_keys
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs.view(b, key.shape[1], group, sq, -1), value.unsqueeze(2))  # (B, n, group, Sq, dv)
    return out.view(b, h, sq, value.shape[-1]), probs
