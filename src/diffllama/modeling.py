"""DiffLlama: Llama with differential attention, weight for weight transformers' ``DiffLlama*`` classes.

Reads top to bottom: RMSNorm, MLP, differential attention, decoder layer, the base model, then the causal LM and
the three task heads. Source: Ye et al., "Differential Transformer", arXiv 2410.05258 (§2.1 differential
attention, §2.2 multi-head with GroupNorm and the (1 − λ_init) scale); the exact tensor recipe is DESIGN.md §1.
Shapes: B batch, S new tokens, H query heads, KV key/value heads, d head_dim, D hidden_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffllama.attention import AttentionMask, get_backend, resolve_implementation
from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import DiffLlamaConfig
from diffllama.inputs import (check_attention_mask, check_cache, check_embedded_inputs, check_labels,
                              check_logits_to_keep, check_num_items, check_packing, check_position_ids,
                              check_positions, check_tensor, input_shape)
from diffllama.masks import build_mask, document_position_ids, documents_from_positions, explicit_documents
from diffllama.outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                               SequenceClassifierOutputWithPast, TokenClassifierOutput, can_return_tuple)
from diffllama.pretrained import PreTrainedMixin
from diffllama.rope import RotaryEmbedding, apply_rotary_pos_emb

class _Activation(nn.Module):
    """A stateless activation given as a function (for those torch has no module of)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _gelu_tanh_form(x: torch.Tensor) -> torch.Tensor:  # transformers' gelu_accurate
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:  # transformers' gelu_fast
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# transformers' ACT2FN names (config.ACTIVATIONS) -> module factories, each the same formula as transformers'.
ACT_FNS = {
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu_new": lambda: nn.GELU(approximate="tanh"), "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_accurate": lambda: _Activation(_gelu_tanh_form), "gelu_fast": lambda: _Activation(_gelu_fast),
    "quick_gelu": lambda: _Activation(lambda x: x * torch.sigmoid(1.702 * x)),
    "relu2": lambda: _Activation(lambda x: torch.square(F.relu(x))), "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU, "mish": nn.Mish, "hardswish": nn.Hardswish, "linear": nn.Identity,
}


# ---- building blocks --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32, scaled by ``weight`` in the input dtype.

    Source: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019), without the bias; the float32
    recipe is transformers' ``LlamaRMSNorm`` (which ``DiffLlamaRMSNorm`` copies), matched weight for weight.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) floating -> (..., D): normalised in float32, cast back to ``x``'s dtype, then times ``weight``
        (so the result has the promoted dtype of ``x`` and ``weight``, as in transformers)."""
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class DiffLlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``, no biases; ``act`` is ``config.hidden_act`` (SiLU by
    default).

    Source: Shazeer, "GLU Variants Improve Transformer" (2020), the SwiGLU FFN; the module is transformers'
    ``LlamaMLP`` (``DiffLlamaMLP``), same parameter names ``gate_proj``/``up_proj``/``down_proj``.
    """

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT_FNS[config.hidden_act]()

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) -> gate and up projections, each (B, S, intermediate_size) (one matmul after
        :func:`diffllama.decode.prepare_for_decode`)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S, D), in the dtype of ``x`` and the weights (they must agree outside autocast)."""
        gate, up = self.gate_up(x)
        return self.down_proj(self.act_fn(gate) * up)

def lambda_init_fn(layer_idx: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·l) for 0-based layer l (paper §2.1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffLlamaAttention(nn.Module):
    """Differential multi-head attention (paper §2.1-2.2): ``(softmax(Q1K1ᵀ) − λ·softmax(Q2K2ᵀ))·V`` per head pair.

    Query heads i and i + H/2 form pair i; each attends with its own softmax over a 2d-wide paired value, and the
    pair's outputs combine as ``o1 − λ·o2``, then a weightless RMSNorm over 2d and the (1 − λ_init) scale.
    ``λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init`` is one scalar per layer. The backend (eager, sdpa, flash) is
    chosen once from ``config.attn_implementation``; all share one signature. Decode speed-ups (fused q/k/v, a
    fixed λ) are applied from outside by :func:`diffllama.decode.prepare_for_decode`.
    """

    def __init__(self, config: DiffLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.lambda_init = lambda_init_fn(layer_idx)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.lambda_q1 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_k1 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_q2 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_k2 = nn.Parameter(torch.zeros(self.head_dim))

    def lambda_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(lambda_q1, lambda_k1, lambda_q2, lambda_k2)``, each (d,)."""
        return self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2

    def compute_lambda(self, dtype: torch.dtype) -> torch.Tensor:
        """The scalar λ: products in the parameter dtype, sums and exp in float32, cast to ``dtype``."""
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
        return lambda_1 - lambda_2 + self.lambda_init

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S, D) -> q (B, S, H·d), k and v (B, S, KV·d) (one matmul after
        :func:`diffllama.decode.prepare_for_decode`)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        past_key_values: DynamicCache | StaticCache | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) -> (B, S, D), plus the attention probabilities (B, H, S, Sk) when asked (eager only).

        Args:
            hidden_states: (B, S, D) in the weights' dtype (or any floating dtype under autocast); the output has
                the same dtype.
            position_embeddings: RoPE ``(cos, sin)``, each (B or 1, S, d) in the dtype of ``hidden_states``
                (:class:`diffllama.rope.RotaryEmbedding`).
            mask: causal + padding mask over the Sk keys (:class:`diffllama.attention.AttentionMask`).
            past_key_values: a cache this layer's keys and values (B, KV, S, d) are written to and read from.
            cache_position: (S,) int64 cache slots of the new tokens (a static cache's; a dynamic one appends).
            output_attentions: also return the probabilities, (B, H, S, Sk) in the activation dtype.

        Raises:
            ValueError: a mask or cache that does not match the keys (:func:`diffllama.attention.check_inputs`,
                :meth:`diffllama.cache.StaticCache.update`). ImportError/RuntimeError: the flash backend without
                Triton or a GPU (:func:`diffllama.attention.get_backend`).
        """
        b, s, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, d)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, d)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(self.layer_idx, k, v, cache_position)

        implementation = resolve_implementation(self.config.attn_implementation, q.device)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        out, probs = get_backend(implementation)(  # out: (B, S, H/2, 2d) = o1 − λ·o2
            q, k, v, mask, scale=self.scaling, lambda_full=self.compute_lambda(q.dtype), dropout_p=dropout_p,
            output_attentions=output_attentions)
        out = (1 - self.lambda_init) * F.rms_norm(out, (2 * self.head_dim,), eps=self.config.rms_norm_eps)
        return self.o_proj(out.reshape(b, s, -1)), probs


class DiffLlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h))`` (transformers'
    ``DiffLlamaDecoderLayer``)."""

    def __init__(self, config: DiffLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DiffLlamaAttention(config, layer_idx)
        self.mlp = DiffLlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        past_key_values: DynamicCache | StaticCache | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) -> ((B, S, D), attention probabilities (B, H, S, Sk) or None), in the dtype of
        ``hidden_states``; arguments and errors as :meth:`DiffLlamaAttention.forward`."""
        attn_out, probs = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask,
                                         past_key_values, cache_position, output_attentions)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs


# ---- base model ---------------------------------------------------------------------------------------------------

class DiffLlamaPreTrainedModel(PreTrainedMixin, nn.Module):
    """Base of the model classes: config and weight init (transformers' scheme); the transformers-style API
    (checkpoint I/O, resizing, gradient checkpointing, ...) comes from :class:`diffllama.pretrained.PreTrainedMixin`.
    """

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # transformers' Trainer passes num_items_in_batch (the label count of the whole accumulated batch) only to
    # models that declare this; without it each micro-batch's mean is averaged and accumulation changes the loss.
    accepts_loss_kwargs = True

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, DiffLlamaConfig):
            raise TypeError(f"config must be a DiffLlamaConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """Linear/Embedding ~ N(0, initializer_range), biases 0, pad row 0, λ ~ N(0, lambda_std_dev), norms 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, DiffLlamaAttention):
                for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                    nn.init.normal_(p, 0.0, self.config.lambda_std_dev)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.tie_weights()

class DiffLlamaModel(DiffLlamaPreTrainedModel):
    """The decoder stack: token embedding, L differential-attention layers, final RMSNorm.

    Source: transformers ``DiffLlamaModel``; same parameter names, same outputs.
    """

    base_model_prefix = ""

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DiffLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs = {"use_reentrant": False}
        self.init_weights()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | StaticCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
    ) -> BaseModelOutputWithPast:
        """Run the decoder.

        Args:
            input_ids: (B, S) int64 or int32 token ids in [0, vocab_size), or ``inputs_embeds`` (B, S, D) floating.
            attention_mask: (B, P + S) with 1/True for real tokens and 0/False for padding (P cached tokens), of
                a bool, integer or floating dtype holding only 0 and 1; a static cache also accepts (B, max_length).
                4-D masks (transformers' custom masks) are refused with a ValueError naming these forms.
            position_ids: (B, S) or (1, S) int64 or int32 RoPE positions; default P, P+1, ... (as transformers).
            past_key_values: a diffllama KV cache (:mod:`diffllama.cache`: DynamicCache or StaticCache) to read and
                extend.
            use_cache: return the cache in ``past_key_values`` (a new DynamicCache when none is given); None takes
                ``config.use_cache`` (True by default, as transformers), False under gradient checkpointing in
                training.
            output_attentions: return per-layer probabilities (eager backend only).
            output_hidden_states: return the embedding output and every layer's output (the last one normed).
            cache_position: (S,) int64 slots of the new tokens in the cache; default P .. P+S-1.
            document_ids: packed rows, explicitly: (B, S) int64/int32, the document of each token, non-decreasing
                along each row (any values; a new document starts wherever the value changes). A token attends only
                to earlier tokens of its own document, so each document's output equals the document run alone.
                Without ``position_ids`` the positions restart at 0 in each document. With an ``attention_mask`` as
                well, a key must be both real and of the query's document.
            cu_seq_lens_q, cu_seq_lens_k: packed rows as transformers' ``DataCollatorWithFlattening(
                return_flash_attn_kwargs=True)`` gives them: (N + 1,) int32/int64 cumulative document lengths over
                the B·S tokens taken row after row, from 0 to B·S, strictly increasing, with every row start
                (a multiple of S) among them (a document cannot span two rows). Both equal when both are given
                (there is no cache). The alternative to ``document_ids``, with the same meaning.
            max_length_q, max_length_k: optional with ``cu_seq_lens_*``: the longest document's length (int); it
                carries no information here and is only checked.

        Packed rows without the explicit forms: as transformers 5 (``masking_utils.find_packed_sequence_indices``),
        when ``position_ids`` are given without ``attention_mask`` and without ``past_key_values``, each place
        where a position is not the previous one plus 1 starts a new document (e.g. ``[0 1 2 0 1 0 1 2 3]`` holds
        three), at any batch size, and only when no cache is built (``use_cache`` False, or unset with the
        config's ``use_cache`` False): with a cache, as in transformers, ``position_ids`` are RoPE positions only,
        so gaps in them (e.g. custom positions at inference) never cut a row into documents. The check costs one
        device sync per forward; under ``torch.compile`` the documents are derived without it (as transformers
        does when tracing).

        Returns:
            BaseModelOutputWithPast with ``last_hidden_state`` (B, S, D); its tuple with ``return_dict=False``
            (:func:`diffllama.outputs.can_return_tuple`, as every model class's forward).

        Raises:
            ValueError/TypeError: naming the argument, for both or neither of input_ids/inputs_embeds, wrong
            dtypes or shapes, token ids out of range, a mask of the wrong shape or with values other than 0 and 1,
            a cache of another library (e.g. transformers' DynamicCache); explicit packed documents with
            ``past_key_values`` or ``use_cache=True`` (a cache cannot hold documents),
            ``document_ids`` with ``cu_seq_lens_*``, bad ``document_ids``/``cu_seq_lens_*``/``max_length_*``
            (dtype, shape, order, total length, a document across rows, a wrong longest length).
        """
        b, s = input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        check_embedded_inputs(input_ids, inputs_embeds, self.config.vocab_size, self.embed_tokens.weight.dtype)
        check_cache(past_key_values, cache_position, b)
        check_packing(document_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, b, s)
        if position_ids is not None:
            check_position_ids(position_ids, b, s)
        inputs_embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        device = inputs_embeds.device
        if self.gradient_checkpointing and self.training:  # as transformers: recomputed layers cannot fill a cache
            use_cache = False
        documents = explicit_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, b, s, device)
        if documents is not None:
            if past_key_values is not None or use_cache:
                raise ValueError("packed documents (document_ids or cu_seq_lens_q/k) cannot go with past_key_values "
                                 "or use_cache=True: a KV cache holds one sequence per row; pass use_cache=False")
            use_cache = False
        if use_cache is None:  # as transformers: the config's use_cache
            use_cache = self.config.use_cache
        if documents is None and position_ids is not None and attention_mask is None and past_key_values is None \
                and not use_cache:  # transformers' condition exactly: with a cache built it does not look
            documents = documents_from_positions(position_ids.to(device).expand(b, s))
        if documents is not None and position_ids is None:  # each document as if run alone
            position_ids = document_position_ids(documents)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        mask, cache_position = self._mask(attention_mask, past_key_values, cache_position, b, s, documents, device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden, all_attn = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            args = (hidden_states, position_embeddings, mask, past_key_values, cache_position, output_attentions)
            if self.gradient_checkpointing and self.training:
                hidden_states, probs = checkpoint(layer, *args, **self.checkpoint_kwargs)
            else:
                hidden_states, probs = layer(*args)
            if output_attentions:
                all_attn.append(probs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )

    @staticmethod
    def _mask(attention_mask, cache, cache_position, batch: int, seq: int, documents,
              device: torch.device) -> tuple[AttentionMask, torch.Tensor]:
        """The attention mask and the (S,) cache slots of the new tokens (default: after the cached ones)."""
        max_length = getattr(cache, "max_length", None)
        if cache_position is not None and max_length is not None:
            past = None  # a static cache with explicit slots: its length is not needed (reading it may sync)
        else:
            past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + seq, device=device)
        k_len = max_length if max_length is not None else past + seq
        total = k_len if past is None else past + seq
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, total, k_len)
        return build_mask(attention_mask, cache_position, total, k_len, documents), cache_position


class DiffLlamaForCausalLM(DiffLlamaPreTrainedModel):
    """Decoder + ``lm_head``; next-token cross-entropy when ``labels`` are given (transformers' ForCausalLM)."""

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.model = DiffLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, 0.0, config.initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | StaticCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **packing,
    ) -> CausalLMOutputWithPast:
        """Logits (B, S_kept, vocab) in the model dtype, and the loss when ``labels`` (B, S) are given
        (transformers' ``DiffLlamaForCausalLM.forward``).

        Args:
            labels: (B, S) int64 or int32, the input ids themselves (shifted inside: position t predicts t+1), each
                in [0, vocab_size) or -100 (ignored). The loss is the float32 0-d mean over non-ignored targets,
                or their sum / ``num_items_in_batch`` when that is given (for gradient accumulation).
            logits_to_keep: an int keeps the last n positions (0 = all), a 1-D integer tensor keeps those indices.
            num_items_in_batch: None, a number > 0 or a 0-d tensor (whose value is not checked: reading
                it back would synchronise the device).
            packing: ``document_ids``, ``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``, passed
                to the decoder (packed rows, see :meth:`DiffLlamaModel.forward`); any other name is a TypeError.
            Other arguments as :meth:`DiffLlamaModel.forward`.

        Returns:
            CausalLMOutputWithPast (:mod:`diffllama.outputs`); its tuple with ``return_dict=False``.

        Raises:
            ValueError: naming the argument, before the decoder runs: ``labels`` not of shape (B, S) or out of
                range, ``logits_to_keep`` not an int >= 0 or 1-D integer tensor, ``num_items_in_batch`` not None, a
                number > 0 or a tensor; and as :meth:`DiffLlamaModel.forward`. TypeError: ``labels`` of another
                dtype than int64/int32.
        """
        check_logits_to_keep(logits_to_keep)
        check_num_items(num_items_in_batch)
        if labels is not None:
            labels = check_labels(labels, input_shape(input_ids, inputs_embeds, self.config.hidden_size),
                                   self.config.vocab_size)
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             cache_position=cache_position, **packing)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits if logits.shape[1] == hidden.shape[1] else self.lm_head(hidden),
                                  labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss, logits, outputs.past_key_values, outputs.hidden_states,
                                      outputs.attentions)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Continue left-padded prompts (B, S) -> (B, S + n) int64, or (B, n) for ``inputs_embeds`` alone; see
        :func:`diffllama.generation.generate`."""
        from diffllama.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Shifted next-token cross-entropy in float32, ignore index -100 (transformers' ``ForCausalLMLoss``).

    logits (B, S, V), labels (B, S) int64. Mean over counted targets, or sum / ``num_items_in_batch``.
    """
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


class DiffLlamaForSequenceClassification(DiffLlamaPreTrainedModel):
    """Decoder + ``score`` (no bias), pooled at each row's rightmost non-pad token (transformers' Generic head).

    Loss by ``config.problem_type`` (inferred as transformers does when unset): regression (MSE),
    single_label_classification (cross-entropy), multi_label_classification (BCE with logits).
    """

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.model = DiffLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        nn.init.normal_(self.score.weight, 0.0, config.initializer_range)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | StaticCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        **packing,
    ) -> SequenceClassifierOutputWithPast:
        """Pooled logits (B, num_labels) in the model dtype, and the loss when ``labels`` are given
        (transformers' ``GenericForSequenceClassification.forward``).

        Each row is pooled at its rightmost token that is not ``config.pad_token_id`` (the last position with
        ``inputs_embeds``, or without a pad id at batch 1).

        Args:
            labels: by ``config.problem_type`` (inferred when unset, as in transformers, and then kept in the
                config): single_label_classification: (B,) or (B, 1) int64/int32 classes in [0, num_labels) or
                -100 (ignored), cross-entropy; regression: B·num_labels numbers, MSE; multi_label_classification:
                (B, num_labels) targets in [0, 1] of any dtype (cast to the logits'), BCE with logits. The loss is a
                0-d tensor.
            num_items_in_batch: accepted and checked as by :class:`DiffLlamaForCausalLM` but, as in transformers,
                it does not change this head's loss.
            packing: ``document_ids``, ``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``, passed
                to the decoder (packed rows, see :meth:`DiffLlamaModel.forward`); any other name is a TypeError.
            Other arguments as :meth:`DiffLlamaModel.forward`.

        Returns:
            SequenceClassifierOutputWithPast (:mod:`diffllama.outputs`); its tuple with ``return_dict=False``.

        Raises:
            ValueError: before the decoder runs: batch > 1 without ``config.pad_token_id`` (the pooled position is
                undefined); ``labels`` of the wrong shape or out of range; ``num_items_in_batch`` not None, a number
                > 0 or a tensor; and as :meth:`DiffLlamaModel.forward`. TypeError: ``labels`` not a tensor, or
                single-label classes not int64/int32.
        """
        check_num_items(num_items_in_batch)
        b, _ = input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        pad = self.config.pad_token_id
        if pad is None and b != 1:
            raise ValueError("sequence classification of batch size > 1 needs config.pad_token_id to find the last "
                             "token")
        problem = None if labels is None else self._problem_type(labels)
        if labels is not None:
            labels = self._checked_labels(labels, problem, b)
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             **packing)
        logits = self.score(outputs.last_hidden_state)  # (B, S, num_labels)
        if pad is None or input_ids is None:
            last = torch.full((b,), -1, device=logits.device)
        else:
            positions = torch.arange(input_ids.shape[1], device=logits.device)
            last = (positions * (input_ids != pad).to(logits.device)).argmax(-1)
        pooled = logits[torch.arange(b, device=logits.device), last]
        loss = None if labels is None else self._loss(pooled, labels, problem)
        return SequenceClassifierOutputWithPast(loss, pooled, outputs.past_key_values, outputs.hidden_states,
                                                outputs.attentions)

    def _problem_type(self, labels: torch.Tensor) -> str:
        """``config.problem_type``, or the one transformers infers from ``num_labels`` and the labels' dtype."""
        check_tensor("labels", labels)
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.config.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def _checked_labels(self, labels: torch.Tensor, problem: str, b: int) -> torch.Tensor:
        """``labels`` checked for ``problem`` at batch ``b``; single-label classes come back as (b,) int64."""
        n = self.config.num_labels
        if problem == "single_label_classification":
            if labels.numel() != b:  # (b,) or (b, 1); name the shape given, not its flattening
                raise ValueError(f"labels for {problem} must have shape ({b},) or ({b}, 1), got {tuple(labels.shape)}")
            return check_labels(labels.reshape(-1), (b,), n)
        if labels.numel() != b * n:
            shape = f"({b},) or ({b}, 1)" if n == 1 else f"({b}, {n})"
            raise ValueError(f"labels for {problem} must have shape {shape}, got {tuple(labels.shape)}")
        return labels

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor, problem: str) -> torch.Tensor:
        self.config.problem_type = problem  # as transformers: an inferred type is kept for later calls
        n = self.config.num_labels
        labels = labels.to(pooled.device)
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, n), labels, ignore_index=-100)
        labels = labels.to(pooled.dtype).view(pooled.shape[0], n)
        if problem == "regression":
            return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
        return F.binary_cross_entropy_with_logits(pooled, labels)


class DiffLlamaForTokenClassification(DiffLlamaPreTrainedModel):
    """Decoder + dropout + ``score`` (with bias): per-token logits (transformers' Generic head).

    Dropout is ``config.classifier_dropout``, else ``extra['hidden_dropout']``, else 0.1.
    """

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.model = DiffLlamaModel(config)
        p = config.classifier_dropout
        if p is None:
            p = config.extra.get("hidden_dropout")
        self.dropout = nn.Dropout(0.1 if p is None else p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        nn.init.normal_(self.score.weight, 0.0, config.initializer_range)
        nn.init.zeros_(self.score.bias)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | StaticCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        **packing,
    ) -> TokenClassifierOutput:
        """Logits (B, S, num_labels) in the model dtype, and the loss when ``labels`` are given (transformers'
        ``GenericForTokenClassification.forward``).

        Args:
            labels: (B, S) int64 or int32 classes in [0, num_labels) or -100 (ignored); the loss is the float32 0-d
                mean cross-entropy over the counted tokens.
            use_cache: the output has no cache, so none is built unless ``use_cache=True``.
            num_items_in_batch: accepted and checked as by :class:`DiffLlamaForCausalLM` but, as in transformers,
                it does not change this head's loss.
            packing: ``document_ids``, ``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``, passed
                to the decoder (packed rows, see :meth:`DiffLlamaModel.forward`); any other name is a TypeError.
            Other arguments as :meth:`DiffLlamaModel.forward`.

        Returns:
            TokenClassifierOutput (:mod:`diffllama.outputs`); its tuple with ``return_dict=False``.

        Raises:
            ValueError: before the decoder runs: ``labels`` not (B, S) or out of range, ``num_items_in_batch`` not
                None, a number > 0 or a tensor; and as :meth:`DiffLlamaModel.forward`. TypeError: ``labels`` of
                another dtype than int64/int32.
        """
        check_num_items(num_items_in_batch)
        if labels is not None:
            labels = check_labels(labels, input_shape(input_ids, inputs_embeds, self.config.hidden_size),
                                   self.config.num_labels)
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                             bool(use_cache), output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, **packing)
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1).to(logits.device),
                                   ignore_index=-100)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DiffLlamaForQuestionAnswering(DiffLlamaPreTrainedModel):
    """Decoder (under ``transformer.``, as transformers) + ``qa_outputs``: start and end logits per token.

    Loss: mean of the start and end cross-entropies; positions are clamped to [0, S] and S is ignored.
    """

    base_model_prefix = "transformer"

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.transformer = DiffLlamaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, 0.0, config.initializer_range)
        nn.init.zeros_(self.qa_outputs.bias)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | StaticCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        *,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        **packing,
    ) -> QuestionAnsweringModelOutput:
        """``start_logits``, ``end_logits`` (B, S) in the model dtype, and the loss when both positions are given
        (transformers' ``GenericForQuestionAnswering.forward`` and ``ForQuestionAnsweringLoss``).

        Args:
            start_positions, end_positions: (B,) or (B, 1) tensors of an integer dtype (any but bool), token
                indices; clamped to [0, S], and S is ignored. The loss, a 0-d tensor in the logits' dtype, is the
                mean of the start and end cross-entropies, each the mean over counted rows, or their sum /
                ``num_items_in_batch`` when that is given.
            use_cache: the output has no cache, so none is built unless ``use_cache=True``.
            num_items_in_batch: None, a number > 0 or a 0-d tensor (whose value is not checked: reading
                it back would synchronise the device).
            packing: ``document_ids``, ``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``, passed
                to the decoder (packed rows, see :meth:`DiffLlamaModel.forward`); any other name is a TypeError.
            Other arguments as :meth:`DiffLlamaModel.forward`.

        Returns:
            QuestionAnsweringModelOutput (:mod:`diffllama.outputs`); its tuple with ``return_dict=False``.

        Raises:
            ValueError: naming the argument, before the decoder runs: a position tensor that is not of an integer
                dtype or not (B,)/(B, 1), ``num_items_in_batch`` not None, a number > 0 or a tensor; and as
                :meth:`DiffLlamaModel.forward`.
        """
        check_num_items(num_items_in_batch)
        batch, _ = input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        for name, value in (("start_positions", start_positions), ("end_positions", end_positions)):
            if value is not None:
                check_positions(name, value, batch)
        outputs = self.transformer(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                   bool(use_cache), output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, **packing)
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            s = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, s).to(logits.device)
            end = end_positions.reshape(-1).clamp(0, s).to(logits.device)
            # No float32 upcast here, as in transformers: the QA loss keeps the logits' dtype.
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = (F.cross_entropy(start_logits, start, ignore_index=s, reduction=reduction)
                    + F.cross_entropy(end_logits, end, ignore_index=s, reduction=reduction)) / 2
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits, outputs.hidden_states,
                                            outputs.attentions)
