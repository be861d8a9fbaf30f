"""The attention modules of the two other architectures (DESIGN.md §2): Llama's plain attention and Differential
Transformer V2's. The decoder layer of :mod:`diffllama.modeling` takes one of them, or DiffLlama V1's, by
``config.model_type``; all three share one ``forward`` signature and the ``qkv`` hook that
:func:`diffllama.decode.prepare_for_decode` fuses.

- Llama: transformers' ``LlamaAttention`` (same parameter names and numerics).
- V2: microsoft/unilm ``Diff-Transformer/Diff-Transformer-V2/multihead_flashdiffv2.py`` ("Differential Transformer
  V2", January 2026): one causal attention over 2h query heads, adjacent heads (2i, 2i + 1) combined as
  ``a_{2i} − sigmoid(lambda_proj(x))_i · a_{2i+1}`` per token, no per-head norm and no λ_init. One difference:
  RoPE here is Llama's non-interleaved ``rotate_half`` form (first half / second half of each head), where the
  reference rotates interleaved pairs (``interleaved=True``); with the same weights the two differ, the model
  class is otherwise the same.

Shapes: B batch, S new tokens, H = ``num_attention_heads`` (V2's h output heads), KV key/value heads, d head_dim,
D hidden_size.
"""

from __future__ import annotations

import torch
from torch import nn

from diffllama.attention import AttentionMask, ChosenBackend
from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import DiffLlamaConfig
from diffllama.rope import apply_rotary_pos_emb


def rotated_heads(module: nn.Module, hidden_states: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor],
                  past_key_values: DynamicCache | StaticCache | None,
                  cache_position: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention inputs of every architecture: ``module.qkv(hidden_states)`` ((B, S, D) in) split into heads of
    ``module.head_dim``, RoPE on q and k, then k and v written to ``module``'s layer of the cache (and read back
    whole). Returns q (B, Hq, S, d), k and v (B, KV, Sk, d); Sk = S without a cache."""
    b, s, _ = hidden_states.shape
    q, k, v = (t.view(b, s, -1, module.head_dim).transpose(1, 2) for t in module.qkv(hidden_states))
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(module.layer_idx, k, v, cache_position)
    return q, k, v


class LlamaAttention(nn.Module):
    """Plain multi-head attention with GQA (transformers' ``LlamaAttention``): query head j reads key/value head
    ``j // (Hq / KV)``. The backend is chosen once from ``config.attn_implementation``
    (:func:`diffllama.attention.get_plain_backend`: eager, or SDPA for "sdpa", "flash" and "auto").

    Subclasses change the number of query heads (``query_heads_per_output``) and how the per-head outputs become
    the o_proj input (:meth:`combine_heads`).
    """

    query_heads_per_output = 1

    def __init__(self, config: DiffLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.backend = ChosenBackend(config, plain=True)
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        bias = config.attention_bias
        query_width = self.query_heads_per_output * self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, query_width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S, D) -> q (B, S, Hq·d), k and v (B, S, KV·d) (one matmul after
        :func:`diffllama.decode.prepare_for_decode`)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def combine_heads(self, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-query-head outputs (B, S, Hq, d) -> the o_proj input (B, S, H·d); Llama: the heads side by side."""
        return out.flatten(2)

    def forward(
            self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
            mask: AttentionMask, past_key_values: DynamicCache | StaticCache | None = None,
            cache_position: torch.Tensor | None = None,
            output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) -> (B, S, D) in the dtype of ``hidden_states``, plus the probabilities (B, Hq, S, Sk) with
        ``output_attentions`` (eager only). Arguments, cache handling and errors as
        :meth:`diffllama.modeling.DiffLlamaAttention.forward`."""
        q, k, v = rotated_heads(self, hidden_states, position_embeddings, past_key_values, cache_position)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        out, probs = self.backend(q.device)(  # out: (B, S, Hq, d)
            q, k, v, mask, scale=self.scaling, dropout_p=dropout_p, output_attentions=output_attentions)
        return self.o_proj(self.combine_heads(out, hidden_states)), probs


class DiffLlamaV2Attention(LlamaAttention):
    """Differential attention V2 (module docstring): 2h query heads (``q_proj``: D -> 2h·d), GQA over them (query
    head j reads KV head ``j // (2h / KV)``), then ``o_i = a_{2i} − σ(lambda_proj(x))_i · a_{2i+1}`` with
    ``lambda_proj``: D -> h, no bias, so λ is per token and per output head. ``o_proj``: h·d -> D.

    Training and prefill run one plain attention call over the 2h heads (SDPA's fused kernels on a GPU), the
    combine is elementwise; the KV cache is a Llama's of the same KV and d. ``lambda_proj`` is initialised as
    every Linear, N(0, ``initializer_range``) (:meth:`diffllama.pretrained.PreTrainedMixin.init_weights`), so λ
    starts near σ(0) = 1/2.
    """

    query_heads_per_output = 2

    def __init__(self, config: DiffLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.lambda_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    def combine_heads(self, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, S, 2h, d) -> (B, S, h·d): ``a_{2i} − σ(λ_i)·a_{2i+1}``, λ = ``lambda_proj(hidden_states)`` (B, S, h),
        the sigmoid in the activation dtype (as the reference)."""
        lam = torch.sigmoid(self.lambda_proj(hidden_states)).unsqueeze(-1)  # (B, S, h, 1)
        return (out[:, :, 0::2] - lam * out[:, :, 1::2]).flatten(2)
