"""DiffLlama: Llama with differential attention, weight for weight transformers' ``DiffLlama*`` classes, top to
bottom: RMSNorm, MLP, differential attention, decoder layer, base model, causal LM, three task heads. Source: Ye et
al., "Differential Transformer", arXiv 2410.05258 (§2.1, §2.2: GroupNorm, the (1 − λ_init) scale); the tensor
recipe is DESIGN.md §1. ``config.model_type`` picks the layers' attention (V1 here; Llama and V2 in
:mod:`diffllama.attention_variants`). Shapes: B batch, S new tokens, H query heads, KV key/value heads, d head_dim.

Every ``forward`` takes :meth:`DiffLlamaModel.forward`'s arguments in transformers' order; a head also takes
``num_items_in_batch`` (None, a number > 0 or a tensor) and the packed-row arguments as ``**packing``. Arguments
are checked (:mod:`diffllama.inputs`) first; the output is a :mod:`diffllama.outputs` dataclass or its tuple.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffllama import generation
from diffllama.activations import ACT_FNS
from diffllama.attention import AttentionMask, ChosenBackend
from diffllama.attention_variants import DiffLlamaV2Attention, LlamaAttention, rotated_heads
from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import DiffLlamaConfig
from diffllama.hf_format import GenerationConfig
from diffllama.inputs import (check_cache, check_embedded_inputs, check_labels, check_logits_to_keep, check_num_items,
                              check_packing, check_position_ids, check_positions, check_sequence_labels, input_shape)
from diffllama.losses import causal_lm_loss, problem_type, question_answering_loss, sequence_classification_loss
from diffllama.masks import document_position_ids, mask_and_slots, packed_documents
from diffllama.outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                               SequenceClassifierOutputWithPast, TokenClassifierOutput, can_return_tuple)
from diffllama.pretrained import PreTrainedMixin
from diffllama.rope import RotaryEmbedding

# ---- building blocks --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim in float32, scaled by ``weight`` (Zhang & Sennrich, 2019, no bias;
    the float32 recipe of transformers' ``LlamaRMSNorm``, which ``DiffLlamaRMSNorm`` copies)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def reset_parameters(self) -> None:
        """``weight`` to ones (the identity scale)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D), normalised in float32, cast back, times ``weight`` (promoted dtype, as transformers)."""
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class DiffLlamaMLP(nn.Module):
    """SwiGLU feed-forward ``down(act(gate(x)) * up(x))``, no biases, ``act`` = ``config.hidden_act`` (Shazeer,
    "GLU Variants Improve Transformer", 2020); transformers' ``LlamaMLP``, same parameter names."""

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
        self.backend = ChosenBackend(config)  # the attention function, chosen on first use per device type
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.lambda_init = lambda_init_fn(layer_idx)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (  # registered in this order
            nn.Parameter(torch.zeros(self.head_dim)) for _ in range(4))

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
            self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
            mask: AttentionMask, past_key_values: DynamicCache | StaticCache | None = None,
            cache_position: torch.Tensor | None = None,
            output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) -> (B, S, D) in the dtype of ``hidden_states``, plus the probabilities (B, H, S, Sk) with
        ``output_attentions`` (eager only). ``position_embeddings``: RoPE ``(cos, sin)``, each (B or 1, S, d);
        ``mask`` over the Sk keys; ``past_key_values``: the cache this layer's keys and values (B, KV, S, d) are
        written to and read from, at slots ``cache_position`` (S,) int64 (a static cache's; a dynamic one appends).

        Raises:
            ValueError: a mask or cache that does not match the keys (:func:`diffllama.attention.check_inputs`,
                :meth:`diffllama.cache.StaticCache.update`). ImportError/RuntimeError: the flash backend without
                Triton or a GPU (:class:`diffllama.attention.ChosenBackend`).
        """
        b, s, _ = hidden_states.shape
        q, k, v = rotated_heads(self, hidden_states, position_embeddings, past_key_values, cache_position)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        out, probs = self.backend(q.device)(  # out: (B, S, H/2, 2d) = o1 − λ·o2
            q, k, v, mask, scale=self.scaling, lambda_full=self.compute_lambda(q.dtype), dropout_p=dropout_p,
            output_attentions=output_attentions)
        out = (1 - self.lambda_init) * F.rms_norm(out, (2 * self.head_dim,), eps=self.config.rms_norm_eps)
        return self.o_proj(out.reshape(b, s, -1)), probs


# The attention module of each architecture (DESIGN.md §2), by config.model_type: the only place that branches.
ATTENTION_CLASSES = {"diffllama": DiffLlamaAttention, "diffllama_v2": DiffLlamaV2Attention, "llama": LlamaAttention}


class DiffLlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h))`` (transformers'
    ``DiffLlamaDecoderLayer``; ``Attn`` by ``config.model_type``: :data:`ATTENTION_CLASSES`)."""

    def __init__(self, config: DiffLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[config.model_type](config, layer_idx)
        self.mlp = DiffLlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
            self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
            mask: AttentionMask, past_key_values: DynamicCache | StaticCache | None = None,
            cache_position: torch.Tensor | None = None,
            output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) -> ((B, S, D), attention probabilities (B, H, S, Sk) or None), in the dtype of
        ``hidden_states``; arguments and errors as :meth:`DiffLlamaAttention.forward`."""
        attn_out, probs = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask,
                                         past_key_values, cache_position, output_attentions)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs


# ---- models -------------------------------------------------------------------------------------------------------

class DiffLlamaPreTrainedModel(PreTrainedMixin, nn.Module):
    """Base of the model classes: ``nn.Module`` plus transformers' ``PreTrainedModel`` API (config, weight init,
    checkpoint I/O, resizing, gradient checkpointing, ...: :class:`diffllama.pretrained.PreTrainedMixin`)."""


class DiffLlamaModel(DiffLlamaPreTrainedModel):
    """The decoder stack: token embedding, L differential-attention layers, final RMSNorm (transformers'
    ``DiffLlamaModel``: same parameter names, same outputs)."""

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
            self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | StaticCache | None = None,
            inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, *,
            output_attentions: bool = False, output_hidden_states: bool = False,
            cache_position: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
            cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
            max_length_q: int | None = None, max_length_k: int | None = None) -> BaseModelOutputWithPast:
        """Run the decoder: ``last_hidden_state`` (B, S, D) in the model dtype (transformers' ``DiffLlamaModel``).

        Args:
            input_ids: (B, S) int64/int32 token ids in [0, vocab_size), or ``inputs_embeds`` (B, S, D) floating.
            attention_mask: (B, P + S), 1/True for real tokens and 0/False for padding (P cached tokens), bool,
                integer or floating holding only 0 and 1; a static cache also takes (B, max_length). 4-D masks
                (transformers' custom masks) are refused.
            position_ids: (B or 1, S) int64/int32 RoPE positions; default P, P+1, ... (as transformers).
            past_key_values: a :mod:`diffllama.cache` DynamicCache or StaticCache to read and extend.
            use_cache: return the cache (a new DynamicCache when none is given); None takes ``config.use_cache``;
                False under gradient checkpointing in training.
            output_attentions: per-layer probabilities (eager only). output_hidden_states: the embedding output
                and every layer's output (the last one normed). cache_position: (S,) int64 cache slots of the new
                tokens; default P .. P+S-1.
            document_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k: packed rows (each document
                attends only to itself; never with a cache), in the forms :mod:`diffllama.masks` describes.

        Raises:
            ValueError/TypeError: naming the argument, for both or neither of input_ids/inputs_embeds, a wrong
            dtype or shape, ids out of range, a mask of another shape or with values other than 0 and 1, a cache
            of another library, packed documents with a cache, or bad packed-document arguments.
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
        documents, use_cache = packed_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, position_ids,
                                                attention_mask, past_key_values, use_cache, self.config.use_cache,
                                                b, s, device)
        if documents is not None and position_ids is None:  # each document as if run alone
            position_ids = document_position_ids(documents)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        mask, cache_position = mask_and_slots(attention_mask, past_key_values, cache_position, b, s, documents, device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states, all_hidden, all_attn = self._layers(inputs_embeds, position_embeddings, mask, past_key_values,
                                                           cache_position, output_attentions)
        return BaseModelOutputWithPast(hidden_states, past_key_values if use_cache else None,
                                       all_hidden if output_hidden_states else None,
                                       all_attn if output_attentions else None)

    def _layers(self, hidden_states, position_embeddings, mask, cache, cache_position, output_attentions: bool):
        """Every layer, then the final norm: ((B, S, D), the L + 1 hidden states, the L probabilities or Nones)."""
        all_hidden, all_attn = [], []
        for layer in self.layers:
            all_hidden.append(hidden_states)
            args = (hidden_states, position_embeddings, mask, cache, cache_position, output_attentions)
            if self.gradient_checkpointing and self.training:
                hidden_states, probs = checkpoint(layer, *args, **self.checkpoint_kwargs)
            else:
                hidden_states, probs = layer(*args)
            all_attn.append(probs)
        hidden_states = self.norm(hidden_states)
        return hidden_states, (*all_hidden, hidden_states), tuple(all_attn)


class DiffLlamaForCausalLM(generation.GenerationMixin, DiffLlamaPreTrainedModel):
    """Decoder + ``lm_head``; next-token cross-entropy when ``labels`` are given (transformers' ForCausalLM)."""

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.model = DiffLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, 0.0, config.initializer_range)
        self.tie_weights()
        self.generation_config = GenerationConfig()  # from_pretrained fills it; Trainer and PEFT read it

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @can_return_tuple
    def forward(
            self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | StaticCache | None = None,
            inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, *,
            output_attentions: bool = False, output_hidden_states: bool = False,
            cache_position: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
            **packing) -> CausalLMOutputWithPast:
        """Logits (B, S_kept, vocab) in the model dtype, and the loss when ``labels`` are given (transformers'
        ``DiffLlamaForCausalLM.forward``; conventions of every head in the module docstring).

        Args:
            labels: (B, S) int64/int32, the input ids themselves (shifted inside: position t predicts t+1), each in
                [0, vocab_size) or -100 (ignored). Loss: the float32 0-d mean over counted targets, or their sum /
                ``num_items_in_batch`` when that is given (gradient accumulation).
            logits_to_keep: an int keeps the last n positions (0 = all), a 1-D integer tensor keeps those indices.

        Raises:
            ValueError/TypeError: ``labels`` not (B, S), of another dtype or out of range, ``logits_to_keep`` not
            an int >= 0 or a 1-D integer tensor; and as :meth:`DiffLlamaModel.forward`.
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


class DiffLlamaForSequenceClassification(DiffLlamaPreTrainedModel):
    """Decoder + ``score`` (no bias), pooled at each row's rightmost non-pad token (transformers' Generic head);
    the loss by ``config.problem_type``: regression, single- or multi-label classification."""

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.model = DiffLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        nn.init.normal_(self.score.weight, 0.0, config.initializer_range)

    @can_return_tuple
    def forward(
            self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | StaticCache | None = None,
            inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            use_cache: bool | None = None, *, output_attentions: bool = False, output_hidden_states: bool = False,
            num_items_in_batch: int | torch.Tensor | None = None, **packing) -> SequenceClassifierOutputWithPast:
        """Pooled logits (B, num_labels) in the model dtype, and the loss when ``labels`` are given (transformers'
        ``GenericForSequenceClassification.forward``), pooled at each row's rightmost token that is not
        ``config.pad_token_id`` (the last position with ``inputs_embeds``, or without a pad id at batch 1).

        Args:
            labels: by ``config.problem_type`` (inferred when unset, as transformers, then kept in the config):
                single_label_classification: (B,) or (B, 1) int64/int32 classes in [0, num_labels) or -100,
                cross-entropy; regression: B·num_labels numbers, MSE; multi_label_classification: (B, num_labels)
                targets in [0, 1] (cast to the logits' dtype), BCE with logits. ``num_items_in_batch`` does not
                change this loss (as transformers).

        Raises:
            ValueError/TypeError: batch > 1 without ``config.pad_token_id``; ``labels`` not a tensor, of the wrong
            shape or dtype, out of range; and as :meth:`DiffLlamaModel.forward`.
        """
        check_num_items(num_items_in_batch)
        b, _ = input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        pad = self.config.pad_token_id
        if pad is None and b != 1:
            raise ValueError("sequence classification of batch size > 1 needs config.pad_token_id to find the last "
                             "token")
        problem = None if labels is None else problem_type(labels, self.config.problem_type, self.config.num_labels)
        if labels is not None:
            labels = check_sequence_labels(labels, problem, b, self.config.num_labels)
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
        loss = None
        if labels is not None:
            self.config.problem_type = problem  # as transformers: an inferred type is kept for later calls
            loss = sequence_classification_loss(pooled, labels, problem)
        return SequenceClassifierOutputWithPast(loss, pooled, outputs.past_key_values, outputs.hidden_states,
                                                outputs.attentions)


class DiffLlamaForTokenClassification(DiffLlamaPreTrainedModel):
    """Decoder + dropout (``config.classifier_dropout``, else ``extra['hidden_dropout']``, else 0.1) + ``score``
    (with bias): per-token logits (transformers' Generic head)."""

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.model = DiffLlamaModel(config)
        p = config.extra.get("hidden_dropout") if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(0.1 if p is None else p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        nn.init.normal_(self.score.weight, 0.0, config.initializer_range)
        nn.init.zeros_(self.score.bias)

    @can_return_tuple
    def forward(
            self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | StaticCache | None = None,
            inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            use_cache: bool | None = None, *, output_attentions: bool = False, output_hidden_states: bool = False,
            num_items_in_batch: int | torch.Tensor | None = None, **packing) -> TokenClassifierOutput:
        """Logits (B, S, num_labels) in the model dtype, and the loss when ``labels`` are given (transformers'
        ``GenericForTokenClassification.forward``). No cache is built unless ``use_cache=True``.

        Args:
            labels: (B, S) int64/int32 classes in [0, num_labels) or -100 (ignored); the loss is the float32 0-d
                mean cross-entropy over counted tokens (``num_items_in_batch`` does not change it, as transformers).

        Raises:
            ValueError/TypeError: ``labels`` not (B, S), of another dtype or out of range; and as
            :meth:`DiffLlamaModel.forward`.
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
    """Decoder (under ``transformer.``, as transformers) + ``qa_outputs``: start and end logits per token."""

    base_model_prefix = "transformer"

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__(config)
        self.transformer = DiffLlamaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, 0.0, config.initializer_range)
        nn.init.zeros_(self.qa_outputs.bias)

    @can_return_tuple
    def forward(
            self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | StaticCache | None = None,
            inputs_embeds: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
            end_positions: torch.Tensor | None = None, *, use_cache: bool | None = None,
            output_attentions: bool = False, output_hidden_states: bool = False,
            num_items_in_batch: int | torch.Tensor | None = None, **packing) -> QuestionAnsweringModelOutput:
        """``start_logits``, ``end_logits`` (B, S) in the model dtype, and the loss when both positions are given
        (transformers' ``GenericForQuestionAnswering.forward``; :func:`diffllama.losses.question_answering_loss`).
        No cache is built unless ``use_cache=True``.

        Args:
            start_positions, end_positions: (B,) or (B, 1) tensors of an integer dtype (not bool), token indices.

        Raises:
            ValueError: a position tensor not of an integer dtype or not (B,)/(B, 1); and as
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
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions,
                                           num_items_in_batch)
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits, outputs.hidden_states,
                                            outputs.attentions)
