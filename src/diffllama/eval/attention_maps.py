"""Attention maps recomputed from a layer's input, and the paper's two-softmax attention as a reference path.

Nothing here reads a backend's internals: a forward pre-hook on each ``layer.self_attn`` captures the module's
input (hidden states, the RoPE ``(cos, sin)`` and the :class:`~diffllama.attention.AttentionMask`), and one small
function per architecture (:data:`ARCHITECTURES`) rebuilds from it, with the module's own projections, RoPE and λ,
what the evaluations need: the pre-softmax logits of every query head, which heads pair up and with what λ, the
values each output head reads, and how the module turns the attention output into its own output.

:func:`reference_attention` then computes the attention the paper writes down (Ye et al., arXiv 2410.05258, §2.1):
``(softmax(Q1K1ᵀ/√d) − λ·softmax(Q2K2ᵀ/√d))·V`` per head pair, optionally with the logits fake-quantised first
(§3.8, Fig. 8); with no quantisation it reproduces the model's attention output (tests: float64, 1e-6).
Llama and Differential Transformer V2 share :func:`plain_attention_maps`: Llama's output head i is query head i;
V2's pairs query heads 2i and 2i + 1 with its per-token λ = σ(lambda_proj(x)), so its combined map
``a_{2i} − λ·a_{2i+1}`` is the differential map the evaluations read, as V1's is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from diffllama.rope import apply_rotary_pos_emb


@dataclass
class AttentionMaps:
    """What one attention layer computes for one input, in a form every architecture shares.

    Attributes:
        logits: (B, H, Sq, Sk) pre-softmax scores ``q·kᵀ·scale`` of every query head, in the activation dtype;
            entries the mask forbids are left as computed (see ``allowed``).
        allowed: (B or 1, 1, Sq, Sk) bool, True where a query may attend to a key.
        first, second: output head i combines query heads ``first[i]`` and ``second[i]`` (differential
            attention); ``second`` is None for plain attention, where output head i is query head ``first[i]``.
        lambda_full: λ, broadcastable to (B, len(first), Sq, 1) (a 0-d tensor for DiffLlama V1), or None.
        value: (B, len(first), Sk, dv), the value each output head reads.
        finish: maps the combined attention output (B, len(first), Sq, dv) to the module's output (B, Sq, D).
    """

    logits: torch.Tensor
    allowed: torch.Tensor
    first: list[int]
    second: list[int] | None
    lambda_full: torch.Tensor | None
    value: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor]

    def probabilities(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax over keys of ``logits`` (default: :attr:`logits`) with forbidden keys at probability 0:
        (B, H, Sq, Sk); rows with no allowed key are all zeros (as the model's backends output)."""
        logits = self.logits if logits is None else logits
        masked = logits.masked_fill(~self.allowed, float("-inf"))
        return torch.softmax(masked, dim=-1).nan_to_num(0.0)

    def combined(self, probs: torch.Tensor | None = None) -> torch.Tensor:
        """The map each output head applies to its values, (B, len(first), Sq, Sk): ``P[first] − λ·P[second]``
        for differential attention (its rows sum to 1 − λ and may be negative), ``P[first]`` otherwise."""
        probs = self.probabilities() if probs is None else probs
        if self.second is None:
            return probs[:, self.first]
        return probs[:, self.first] - self.lambda_full * probs[:, self.second]


def _logits_and_values(module, hidden_states: torch.Tensor, position_embeddings, mask,
                       query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, values)`` of an attention module with ``query_heads`` query heads: the pre-softmax scores
    (B, Hq, S, S) = RoPE'd ``q·kᵀ·scale`` and the values (B, Hq, S, d), query head j reading key/value head
    ``j // (Hq/KV)``. ValueError for a mask whose key count is not S (no KV cache)."""
    b, s, _ = hidden_states.shape
    if mask.k_len != s:
        raise ValueError(f"attention maps need the whole sequence as input (no KV cache): the mask covers "
                         f"{mask.k_len} keys, the input has {s} tokens")
    kv, d = module.num_key_value_heads, module.head_dim
    q = module.q_proj(hidden_states).view(b, s, query_heads, d).transpose(1, 2)  # (B, Hq, S, d)
    k = module.k_proj(hidden_states).view(b, s, kv, d).transpose(1, 2)  # (B, KV, S, d)
    v = module.v_proj(hidden_states).view(b, s, kv, d).transpose(1, 2)  # (B, KV, S, d)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k = k.repeat_interleave(query_heads // kv, dim=1)  # (B, Hq, S, d): query head j reads key head j // (Hq / KV)
    v = v.repeat_interleave(query_heads // kv, dim=1)
    return torch.matmul(q, k.transpose(-1, -2)) * module.scaling, v


def diffllama_attention_maps(module, hidden_states: torch.Tensor, position_embeddings, mask) -> AttentionMaps:
    """:class:`AttentionMaps` of a :class:`diffllama.modeling.DiffLlamaAttention` for its input (no KV cache).

    Follows DESIGN.md §1 steps 1-6: q, k, v from the module's projections, RoPE, query head i paired with head
    i + H/2, key/value head ``j // (H/KV)`` for query head j, the paired value ``[v_i, v_{i+H/2}]`` (2d wide) of
    the values expanded to H heads, λ from :meth:`compute_lambda`, then the weightless RMSNorm over 2d, the
    (1 − λ_init) scale and ``o_proj``.

    Args:
        module: the layer's ``self_attn``. hidden_states: (B, S, D), its input. position_embeddings: ``(cos, sin)``,
        each (B or 1, S, d). mask: the :class:`~diffllama.attention.AttentionMask` the layer received.

    Raises:
        ValueError: a mask whose key count is not S (the maps are for a whole sequence, not a cached step).
    """
    b, s, _ = hidden_states.shape
    h, d = module.num_heads, module.head_dim
    logits, v = _logits_and_values(module, hidden_states, position_embeddings, mask, h)
    paired = torch.cat(v.chunk(2, dim=1), dim=-1)  # (B, H/2, S, 2d): [v_i, v_{i + H/2}]

    def finish(out: torch.Tensor) -> torch.Tensor:  # (B, H/2, S, 2d) -> (B, S, D)
        out = (1 - module.lambda_init) * F.rms_norm(out, (2 * d,), eps=module.config.rms_norm_eps)
        return module.o_proj(out.transpose(1, 2).reshape(b, s, h * d))

    return AttentionMaps(logits=logits, allowed=mask.dense(), first=list(range(h // 2)),
                         second=list(range(h // 2, h)), lambda_full=module.compute_lambda(logits.dtype), value=paired,
                         finish=finish)


def plain_attention_maps(module, hidden_states: torch.Tensor, position_embeddings, mask) -> AttentionMaps:
    """:class:`AttentionMaps` of a :class:`diffllama.attention_variants.LlamaAttention` (Llama: output head i is
    query head i, ``second`` None) or :class:`~diffllama.attention_variants.DiffLlamaV2Attention` (output head i
    pairs query heads 2i and 2i + 1, λ (B, h, S, 1) = σ(lambda_proj(x)) per token) for its input (no KV cache).

    Query head j reads key/value head ``j // (Hq/KV)`` (Hq = 2h for V2), each value d wide; ``finish`` lays the h
    output heads side by side, (B, S, h·d), and applies ``o_proj``.

    Args:
        module: the layer's ``self_attn``. hidden_states: (B, S, D), its input. position_embeddings: ``(cos, sin)``,
        each (B or 1, S, d). mask: the :class:`~diffllama.attention.AttentionMask` the layer received.

    Raises:
        ValueError: a mask whose key count is not S (as :func:`diffllama_attention_maps`); a V2 module whose paired
            query heads read different value heads (``num_key_value_heads`` not dividing ``num_attention_heads``),
            whose output is then no single map applied to one value.
    """
    b, s, _ = hidden_states.shape
    h, kv, d = module.num_heads, module.num_key_value_heads, module.head_dim
    per_output = module.query_heads_per_output  # 1 (Llama) or 2 (V2)
    if per_output == 2 and h % kv:
        raise ValueError(f"attention maps of a V2 model need num_key_value_heads ({kv}) to divide "
                         f"num_attention_heads ({h}): otherwise a head pair reads two different value heads")
    hq = per_output * h
    logits, v = _logits_and_values(module, hidden_states, position_embeddings, mask, hq)
    first = list(range(0, hq, per_output))
    second, lam = None, None
    if per_output == 2:
        second = list(range(1, hq, 2))
        lam = torch.sigmoid(module.lambda_proj(hidden_states)).transpose(1, 2).unsqueeze(-1)  # (B, h, S, 1)

    def finish(out: torch.Tensor) -> torch.Tensor:  # (B, h, S, d) -> (B, S, D)
        return module.o_proj(out.transpose(1, 2).reshape(b, s, h * d))

    return AttentionMaps(logits=logits, allowed=mask.dense(), first=first, second=second, lambda_full=lam,
                         value=v[:, first], finish=finish)


ARCHITECTURES: dict[str, Callable[..., AttentionMaps]] = {"diffllama": diffllama_attention_maps,
                                                          "diffllama_v2": plain_attention_maps,
                                                          "llama": plain_attention_maps}


def maps_function(model) -> Callable[..., AttentionMaps]:
    """The attention-maps function for ``model``'s architecture (its ``config.model_type``; a config without that
    attribute is DiffLlama V1).

    Raises:
        ValueError: an architecture with no entry in :data:`ARCHITECTURES`.
    """
    model_type = getattr(model.config, "model_type", "diffllama")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no attention-maps function for model_type {model_type!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's ``self_attn``, bottom to top (any causal-LM or base model of this library)."""
    base = model.model if hasattr(model, "model") else model
    return [layer.self_attn for layer in base.layers]


def _layer_input(args: tuple, kwargs: dict):
    """``(hidden_states, position_embeddings, mask)`` of an attention module's call, positional or by keyword."""
    names = ("hidden_states", "position_embeddings", "mask")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return tuple(values)


@contextlib.contextmanager
def captured_maps(model, maps_fn=None) -> Iterator[list[AttentionMaps | None]]:
    """Within the block, every forward pass of ``model`` stores each layer's :class:`AttentionMaps`.

    Yields a list with one entry per layer, overwritten by each forward (so run one forward per read). The
    hooks are removed on exit. ``maps_fn`` overrides the architecture's function (tests use it to force maps).
    """
    maps_fn = maps_fn or maps_function(model)
    modules = attention_modules(model)
    found: list[AttentionMaps | None] = [None] * len(modules)
    handles = []
    for index, module in enumerate(modules):
        def hook(mod, args, kwargs, index=index):
            found[index] = maps_fn(mod, *_layer_input(args, kwargs))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def check_bits(bits) -> None:
    """Raise ValueError unless ``bits`` is an integer in [2, 16] (a quantisation width)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")


def fake_quantize(logits: torch.Tensor, allowed: torch.Tensor, bits: int) -> torch.Tensor:
    """Absmax fake quantisation to signed ``bits``-bit integers, one scale per attention map (batch row, head).

    ``scale = max|x| / (2^(bits−1) − 1)`` over the allowed entries of each (b, h) map; returns
    ``round(x / scale)·scale`` clamped to ±(2^(bits−1) − 1)·scale, same shape and dtype. Forbidden entries are
    returned unchanged (they are masked afterwards). Source: the absmax quantisation of the paper's §3.8.

    Raises:
        ValueError: ``bits`` not an integer in [2, 16] (:func:`check_bits`).
    """
    check_bits(bits)
    levels = 2 ** (bits - 1) - 1
    absmax = logits.abs().masked_fill(~allowed, 0).amax(dim=(-1, -2), keepdim=True)  # (B, H, 1, 1)
    scale = (absmax / levels).clamp_min(torch.finfo(logits.dtype).tiny)
    quantized = (logits / scale).round().clamp(-levels, levels) * scale
    return torch.where(allowed, quantized, logits)


def reference_attention(maps: AttentionMaps, bits: int | None = None) -> torch.Tensor:
    """The layer's output from :class:`AttentionMaps` by the paper's formula, (B, S, D).

    ``out = finish(combined(softmax(q_logits)) @ V)``; with ``bits`` the logits are first fake-quantised
    (:func:`fake_quantize`). With ``bits=None`` this equals the module's own output (the test checks 1e-6 in
    float64).
    """
    logits = maps.logits if bits is None else fake_quantize(maps.logits, maps.allowed, bits)
    combined = maps.combined(maps.probabilities(logits))  # (B, Hout, Sq, Sk)
    return maps.finish(torch.matmul(combined, maps.value))


@contextlib.contextmanager
def reference_attention_path(model, bits: int | None = None, maps_fn=None) -> Iterator[None]:
    """Within the block, each attention module's output is replaced by :func:`reference_attention` of its input
    (fake-quantised to ``bits`` when given). Forward passes must see the whole sequence (``use_cache=False``).

    Raises:
        ValueError: as :func:`fake_quantize` for a bad ``bits``, on entry.
    """
    if bits is not None:
        check_bits(bits)
    maps_fn = maps_fn or maps_function(model)
    handles = []
    for module in attention_modules(model):
        def hook(mod, args, kwargs, output):
            replaced = reference_attention(maps_fn(mod, *_layer_input(args, kwargs)), bits)
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
