"""Differential attention through ``torch.nn.functional.scaled_dot_product_attention``: one call per layer.

The 2·head_dim wide paired value makes each head's single softmax serve both halves of the differential pair
(DESIGN.md §1 step 4). Keeping SDPA on its fused CUDA kernels takes care, because FlashAttention needs equal
query and value head dims and PyTorch's GQA support exists only in its flash and math kernels:

- no mask needed (training, prefill, or decode without padding): q and k are zero-padded to 2·head_dim, which
  leaves every score unchanged (the scale is passed explicitly) and lets the flash kernel run, GQA included;
- a padding mask: flash takes no mask, so K and V are expanded to all heads for the memory-efficient kernel.

cuDNN attention is left out of SDPA's choices on CUDA: in our H200 benchmark (torch 2.11, where it is the
default) its gradients disagreed with FlashAttention's, our Triton kernel's and eager's
(benchmarks/RESULTS.md; pytorch/pytorch#150700 reports wrong cuDNN gradients on H100 too), and for a single
decode query it is slower. On CPU the plain call is used. :func:`plain_attention` runs plain (unpaired) attention
through the same kernel choices, for the Llama and V2 attention modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffllama.attention.contract import AttentionMask, check_inputs, combine_pairs, pair_values, repeat_kv

FLASH_MAX_HEAD_DIM = 256
CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


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
        ValueError, TypeError: inputs that break the shared contract (:func:`diffllama.attention.check_inputs`).
    """
    if output_attentions:
        raise ValueError("output_attentions=True needs attn_implementation='eager'; the sdpa backend has no probabilities")
    check_inputs(query, key, value, mask)
    key, value2 = pair_values(key, value, query.shape[1])
    return combine_pairs(_attend(query, key, value2, mask, scale, dropout_p), lambda_full), None


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, *,
                    scale: float, dropout_p: float = 0.0, output_attentions: bool = False) -> tuple[torch.Tensor, None]:
    """Same contract as :func:`diffllama.attention.eager.plain_attention` (out (B, Sq, H, d)); one SDPA call, on
    FlashAttention-2 where the mask allows (the same kernel choice as :func:`attention`); never returns
    probabilities.

    Raises:
        ValueError: if ``output_attentions`` is requested (use ``attn_implementation="eager"``).
        ValueError, TypeError: inputs that break the shared contract (``check_inputs(..., paired=False)``).
    """
    if output_attentions:
        raise ValueError("output_attentions=True needs attn_implementation='eager'; the sdpa backend has no probabilities")
    check_inputs(query, key, value, mask, paired=False)
    return _attend(query, key, value, mask, scale, dropout_p).transpose(1, 2), None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, scale: float,
            dropout_p: float) -> torch.Tensor:
    """(B, H, Sq, d) queries over (B, n, Sk, d) keys and (B, n, Sk, dv) values (dv >= d) -> (B, H, Sq, dv), with
    the kernel choices of the module docstring; rows that see no key give zeros."""
    if mask.plain_causal:
        causal = query.shape[2] > 1
        if query.is_cuda and query.shape[-1] < value.shape[-1] <= FLASH_MAX_HEAD_DIM:  # paired values only
            query, key = pad_head_dim(query, key, value.shape[-1])
        return _sdpa(query, key, value, is_causal=causal, dropout_p=dropout_p, scale=scale,
                     enable_gqa=key.shape[1] != query.shape[1])
    allowed, has_keys = mask.dense(), mask.query_has_keys()
    if has_keys is not None:
        # Rows that see no key would give NaN in some SDPA kernels: let them see everything, then zero them.
        allowed = allowed | ~has_keys
    if query.is_cuda and key.shape[1] != query.shape[1]:  # the memory-efficient kernel has no GQA
        n_rep = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    out = _sdpa(query, key, value, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                enable_gqa=key.shape[1] != query.shape[1])
    if has_keys is not None:
        out = out * has_keys
    return out


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
    if not query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, **kwargs)
    with sdpa_kernel(CUDA_BACKENDS):
        return F.scaled_dot_product_attention(query, key, value, **kwargs)


def pad_head_dim(query: torch.Tensor, key: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad q (B, H, Sq, d) and k (B, KV, Sk, d) to ``width`` on the last dim: q·k is unchanged."""
    extra = width - query.shape[-1]
    return F.pad(query, (0, extra)), F.pad(key, (0, extra))
