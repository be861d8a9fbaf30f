"""Differential attention through ``torch.nn.functional.scaled_dot_product_attention``: one call per layer.

The 2·head_dim wide paired value makes each head's single softmax serve both halves of the differential pair
(DESIGN.md §1 step 4). Without padding and with as many queries as keys the call uses ``is_causal`` and no mask,
which keeps SDPA on its fused kernels; otherwise a boolean mask is passed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffllama.attention import AttentionMask, combine_pairs, pair_values


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
) -> tuple[torch.Tensor, None]:
    """Same contract as :func:`diffllama.attention.eager.attention`; never returns probabilities.

    Raises:
        ValueError: if ``output_attentions`` is requested (use ``attn_implementation="eager"``).
    """
    if output_attentions:
        raise ValueError("output_attentions=True needs attn_implementation='eager'; the sdpa backend has no probabilities")
    key, value2 = pair_values(key, value, query.shape[1])
    gqa = key.shape[1] != query.shape[1]
    if mask.plain_causal:
        out = F.scaled_dot_product_attention(
            query, key, value2, is_causal=query.shape[2] > 1, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
        return combine_pairs(out, lambda_full), None
    allowed, has_keys = mask.dense(), mask.query_has_keys()
    if has_keys is not None:
        # Rows that see no key would give NaN in some SDPA kernels: let them see everything, then zero them.
        allowed = allowed | ~has_keys
    out = F.scaled_dot_product_attention(
        query, key, value2, attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    if has_keys is not None:
        out = out * has_keys
    return combine_pairs(out, lambda_full), None
