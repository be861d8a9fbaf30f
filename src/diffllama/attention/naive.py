"""The paper's differential attention, literally: two softmaxes per head pair. The reference every backend is
tested against (outputs and all gradients); slow (a Python loop over head pairs), never used by the model.

Source: Ye et al., "Differential Transformer" (arXiv 2410.05258) §2.1, eq. (1):
``DiffAttn(X) = (softmax(Q1 K1ᵀ/√d) − λ·softmax(Q2 K2ᵀ/√d)) V``, with transformers' ``DiffLlamaAttention`` head
layout (DESIGN.md §1 step 4): query head ``i`` and query head ``i + H/2`` form pair ``i``; query head ``j`` reads
key head ``j // (H/KV)``; the pair's value is ``[v_H[i], v_H[i + H/2]]`` (2·head_dim wide), ``v_H`` being the
values expanded to H heads. Written from the formula, without the grouped matmuls and paired-value tensors
(:func:`diffllama.attention.pair_values`) that the backends share, so that it checks them.
"""

from __future__ import annotations

import torch

from diffllama.attention.contract import AttentionMask, check_inputs


def allowed_keys(mask: AttentionMask, batch: int) -> torch.Tensor:
    """(B, Sq, Sk) bool, True where query i may see key j: ``j <= query_positions[i]``, key j is not padding, and
    (packed rows) key j lies in query i's document, as :class:`~diffllama.attention.AttentionMask` states it."""
    positions = mask.query_positions.long()
    sq = positions.shape[0]
    keys = torch.arange(mask.k_len, device=positions.device)
    allowed = (keys[None, :] <= positions[:, None]).expand(batch, sq, mask.k_len)
    if mask.key_padding is not None:
        allowed = allowed & mask.key_padding[:, None, :]
    if mask.document_ids is not None:
        own = torch.gather(mask.document_ids, 1, positions[None, :].expand(batch, sq))  # (B, Sq)
        allowed = allowed & (mask.document_ids[:, None, :] == own[:, :, None])
    return allowed


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, *, scale: float,
              lambda_full: torch.Tensor, dropout_p: float = 0.0, output_attentions: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differential attention of every head pair, the backends' contract (:func:`diffllama.attention.eager.attention`).

    Args:
        query: (B, H, Sq, d), H even. key, value: (B, KV, Sk, d), H a multiple of KV (any KV: MQA, odd).
        mask: which keys each query sees. scale: the softmax temperature (1/√d for DiffLlama).
        lambda_full: the layer's λ, a 0-d (or one-element) tensor; differentiable.
        dropout_p: must be 0 (a reference has no randomness). output_attentions: also return the probabilities.

    Returns:
        ``(out, probs)``: out (B, Sq, H/2, 2d) = ``o1 − λ·o2`` in the query dtype; probs (B, H, Sq, Sk) in the
        query dtype, or None. Scores and softmaxes run in float32 for half types, float64 for float64; a query
        that sees no key gets zero probabilities (output 0, never NaN).

    Raises:
        ValueError: ``dropout_p`` not 0; inputs that break the shared contract
            (:func:`diffllama.attention.check_inputs`, which also raises TypeError for a mask of the wrong dtypes).
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0 for the naive reference, got {dropout_p}")
    check_inputs(query, key, value, mask)
    b, h, _, d = query.shape
    group = h // key.shape[1]
    compute = torch.promote_types(query.dtype, torch.float32)
    allowed = allowed_keys(mask, b)  # (B, Sq, Sk)
    sees_some = allowed.any(-1, keepdim=True)

    def probabilities(head: int) -> torch.Tensor:  # (B, Sq, Sk) softmax(q_j k_jᵀ · scale + mask)
        scores = (query[:, head] @ key[:, head // group].transpose(-1, -2)).to(compute) * scale
        scores = scores.masked_fill(~allowed, torch.finfo(compute).min)
        return torch.where(sees_some, torch.softmax(scores, -1), 0.0)

    lam = lambda_full.reshape(()).to(compute)
    outs, probs = [], []
    for i in range(h // 2):
        p1, p2 = probabilities(i), probabilities(i + h // 2)
        pair_value = torch.cat((value[:, i // group], value[:, (i + h // 2) // group]), -1).to(compute)
        outs.append((p1 - lam * p2) @ pair_value)  # (B, Sq, 2d)
        probs += [p1, p2]
    out = torch.stack(outs, 2).to(query.dtype)
    if not output_attentions:
        return out, None
    ordered = probs[0::2] + probs[1::2]  # heads 0..H/2-1 then H/2..H-1
    return out, torch.stack(ordered, 1).to(query.dtype)
