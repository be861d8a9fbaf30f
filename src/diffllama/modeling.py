"""DiffLlama: Llama with differential attention, weight for weight transformers' ``DiffLlama*`` classes.

Reads top to bottom: RMSNorm, MLP, differential attention, decoder layer, the base model, then the causal LM and
the three task heads. Source: Ye et al., "Differential Transformer", arXiv 2410.05258 (§2.1 differential
attention, §2.2 multi-head with GroupNorm and the (1 − λ_init) scale); the exact tensor recipe is DESIGN.md §1.
Shapes: B batch, S new tokens, H query heads, KV key/value heads, d head_dim, D hidden_size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffllama.attention import AttentionMask, ChosenBackend
from diffllama.cache import DynamicCache, StaticCache
from diffllama import gemv, settings
from diffllama.config import DiffLlamaConfig
from diffllama.fusion import FusedLinear, TrustSwitch
from diffllama.outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                               SequenceClassifierOutputWithPast, TokenClassifierOutput, can_return_tuple)
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

    After :meth:`DiffLlamaPreTrainedModel.fuse_projections`, gate and up run as one matmul at inference.
    """

    def __init__(self, config: DiffLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT_FNS[config.hidden_act]()
        self.fused: FusedLinear | None = None  # gate_proj + up_proj, see fuse_projections()
        self.trust = TrustSwitch()  # on inside DiffLlamaPreTrainedModel.inference_caches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S, D), in the dtype of ``x`` and the weights (they must agree outside autocast)."""
        if self.fused is not None and self.fused.active(self.trust.on):
            gate, up = self.fused(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return gemv.call(self.down_proj, self.act_fn(gate) * up, "down")

    def fuse(self) -> None:
        """Build (or rebuild, when its parameters were replaced) the fused gate/up projection."""
        if self.fused is None or not self.fused.valid():
            self.fused = FusedLinear([self.gate_proj, self.up_proj], site="gate_up")

    def refresh_caches(self) -> None:
        """Drop a fusion whose parameters were replaced (it would be stale, and it holds their old memory)."""
        if self.fused is not None and not self.fused.valid():
            self.fused = None


def lambda_init_fn(layer_idx: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·l) for 0-based layer l (paper §2.1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffLlamaAttention(nn.Module):
    """Differential multi-head attention (paper §2.1-2.2): ``(softmax(Q1K1ᵀ) − λ·softmax(Q2K2ᵀ))·V`` per head pair.

    Query heads i and i + H/2 form pair i; each attends with its own softmax over a 2d-wide paired value, and the
    pair's outputs combine as ``o1 − λ·o2``, then a weightless RMSNorm over 2d and the (1 − λ_init) scale.
    ``λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init`` is one scalar per layer. The backend (eager, sdpa, flash) is
    chosen once from ``config.attn_implementation``; all share one signature.

    Inside :meth:`DiffLlamaPreTrainedModel.inference_caches` (decode steps; it checks the caches on entry) λ
    comes from a cache when no gradient is needed; elsewhere it is computed. After
    :meth:`DiffLlamaPreTrainedModel.fuse_projections` q, k and v run as one matmul: eager code checks the fusion
    against the parameters on every use, compiled code uses it only inside ``inference_caches``.
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
        self.lambda_q1 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_k1 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_q2 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_k2 = nn.Parameter(torch.zeros(self.head_dim))
        self.fused: FusedLinear | None = None  # q_proj + k_proj + v_proj, see fuse_projections()
        self.trust = TrustSwitch()  # on inside DiffLlamaPreTrainedModel.inference_caches()
        self._lambda_cache: torch.Tensor | None = None
        self._lambda_key: tuple | None = None

    def lambda_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(lambda_q1, lambda_k1, lambda_q2, lambda_k2)``, each (d,)."""
        return self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2

    def compute_lambda(self, dtype: torch.dtype) -> torch.Tensor:
        """The scalar λ: products in the parameter dtype, sums and exp in float32, cast to ``dtype``."""
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
        return lambda_1 - lambda_2 + self.lambda_init

    def lambda_full(self, dtype: torch.dtype) -> torch.Tensor:
        """λ as a 0-d tensor of ``dtype`` (:meth:`compute_lambda`), from the inference cache while ``trust.on``.

        λ is constant at inference, yet computing it costs two tiny kernels per layer and step, which matters in a
        decode loop. Inside :meth:`DiffLlamaPreTrainedModel.inference_caches` (which refreshes the cache on entry)
        the cached value is used when no gradient is needed; everywhere else λ is computed from the parameters, so
        any change to them, even through ``.data`` (which bumps no version counter), is seen.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.lambda_parameters()):
            return self.compute_lambda(dtype)
        cache = self._lambda_cache
        if self.trust.on and cache is not None and cache.dtype == dtype:
            return cache
        return self.compute_lambda(dtype)

    def _cached_lambda(self, dtype: torch.dtype) -> torch.Tensor:
        params = self.lambda_parameters()
        key = (dtype, params[0].device, *(p.data_ptr() for p in params), *(p._version for p in params))
        if key != self._lambda_key:
            with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, updatable outside inference mode
                value = self.compute_lambda(dtype)
                cache = self._lambda_cache
                if cache is not None and cache.dtype == value.dtype and cache.device == value.device:
                    cache.copy_(value)  # same address: a captured CUDA graph reads the new value
                else:
                    self._lambda_cache = value
            self._lambda_key = key
        return self._lambda_cache

    def fuse(self) -> None:
        """Build (or rebuild, when its parameters were replaced) the fused q/k/v projection."""
        if self.fused is None or not self.fused.valid():
            self.fused = FusedLinear([self.q_proj, self.k_proj, self.v_proj], site="qkv")

    def refresh_caches(self, dtype: torch.dtype, force: bool = False) -> None:
        """Bring the inference caches up to date for activations of ``dtype``: recompute λ if its parameters
        changed (their addresses or version counters; always with ``force``); drop a fusion whose parameters were
        replaced (stale, and holding their old memory)."""
        if self.fused is not None and not self.fused.valid():
            self.fused = None
        if force:
            self._lambda_key = None
        if not self.lambda_q1.is_inference():
            self._cached_lambda(dtype)

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
                Triton or a GPU (:class:`diffllama.attention.ChosenBackend`).
        """
        b, s, _ = hidden_states.shape
        if self.fused is not None and self.fused.active(self.trust.on):
            q, k, v = self.fused(hidden_states)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, d)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, d)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(self.layer_idx, k, v, cache_position)

        dropout_p = self.config.attention_dropout if self.training else 0.0
        out, probs = self.backend(q.device)(  # out: (B, S, H/2, 2d) = o1 − λ·o2
            q, k, v, mask, scale=self.scaling, lambda_full=self.lambda_full(q.dtype), dropout_p=dropout_p,
            output_attentions=output_attentions)
        out = (1 - self.lambda_init) * F.rms_norm(out, (2 * self.head_dim,), eps=self.config.rms_norm_eps)
        return gemv.call(self.o_proj, out.reshape(b, s, -1), "o"), probs


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

class DiffLlamaPreTrainedModel(nn.Module):
    """Shared plumbing: config, weight init (transformers' scheme), checkpoint I/O, gradient checkpointing."""

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
        settings.check()  # a bad DIFFLLAMA_* kernel setting is refused before any weight is made
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

    def tie_weights(self) -> None:
        """Point ``lm_head.weight`` at the input embedding when ``config.tie_word_embeddings`` (causal LM only)."""

    @property
    def base_model(self) -> DiffLlamaModel:
        """The decoder stack, whatever the head's attribute name (``model`` or ``transformer``)."""
        return getattr(self, self.base_model_prefix) if self.base_model_prefix else self

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``embed_tokens``, weight (vocab_size, hidden_size)."""
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding (``lm_head`` follows it when ``config.tie_word_embeddings``).

        Raises:
            TypeError: ``value`` not an ``nn.Embedding``. ValueError: its embedding_dim is not hidden_size, or its
            rows are not ``config.vocab_size``.
        """
        _check_embedding("value", value, self.config.hidden_size)
        if value.num_embeddings != self.config.vocab_size:  # lm_head and the config would disagree with it
            raise ValueError(f"value must have vocab_size = {self.config.vocab_size} rows, got "
                             f"{value.num_embeddings}; resize_token_embeddings changes the vocabulary")
        self.base_model.embed_tokens = value
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear | None:
        """``lm_head`` (weight (vocab_size, hidden_size)) for the causal LM; None for the other classes."""
        return getattr(self, "lm_head", None)

    def get_decoder(self) -> DiffLlamaModel:
        """The decoder stack (:attr:`base_model`), as transformers' ``get_decoder``."""
        return self.base_model

    @classmethod
    def can_generate(cls) -> bool:
        """Whether this class has ``generate`` (the causal LM only)."""
        return callable(getattr(cls, "generate", None))

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the vocabulary to ``new_num_tokens`` (rounded up to a multiple of ``pad_to_multiple_of``), as
        transformers' method of the same name: existing rows are kept, the embedding (and an untied ``lm_head``)
        get new rows, ``config.vocab_size`` follows. New rows are the mean of the old rows with ``mean_resizing``
        (transformers samples them around that mean with a 1e-9-scaled covariance, so they differ from it by
        ~1e-5), else drawn from N(0, initializer_range). None (with no ``pad_to_multiple_of``) changes nothing.

        Returns:
            the (new) input embedding.

        Raises:
            ValueError: ``new_num_tokens``/``pad_to_multiple_of`` not None or an int >= 1, or a size that would
            drop ``pad_token_id``/``bos_token_id``/``eos_token_id`` of the config.
        """
        old = self.get_input_embeddings()
        for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        size = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        special = [i for name in ("pad_token_id", "bos_token_id", "eos_token_id")
                   for i in _as_list(getattr(self.config, name)) if i >= 0]
        if special and max(special) >= size:
            raise ValueError(f"new_num_tokens={size} would drop special token id {max(special)} of the config "
                             f"(pad/bos/eos): it must be > {max(special)}")
        if size == old.num_embeddings:
            return old
        new = nn.Embedding(size, old.embedding_dim, old.padding_idx, device=old.weight.device, dtype=old.weight.dtype)
        _resized_rows(new.weight, old.weight, mean_resizing, self.config.initializer_range)
        new.weight.requires_grad_(old.weight.requires_grad)  # frozen stays frozen (e.g. adapter fine-tuning)
        self.base_model.embed_tokens = new
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = nn.Linear(head.in_features, size, bias=False, device=head.weight.device, dtype=head.weight.dtype)
            _resized_rows(new_head.weight, head.weight, mean_resizing, self.config.initializer_range)
            new_head.weight.requires_grad_(head.weight.requires_grad)
            self.lm_head = new_head
        self.config.vocab_size = size
        self.tie_weights()
        return new

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer's activations in backward (``torch.utils.checkpoint``), as transformers'
        method: ``gradient_checkpointing_kwargs`` go to ``checkpoint`` (default ``{"use_reentrant": False}``).

        Raises:
            TypeError: ``gradient_checkpointing_kwargs`` not None or a dict.
        """
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(f"gradient_checkpointing_kwargs must be None or a dict, got "
                            f"{gradient_checkpointing_kwargs!r}")
        self.base_model.gradient_checkpointing = True
        self.base_model.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if self.base_model.checkpoint_kwargs["use_reentrant"]:
            # Reentrant checkpointing gives no gradient to a layer whose input needs none, as happens when the
            # embeddings are frozen (LoRA, adapters); transformers does the same for PEFT models.
            self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        """Turn activation recomputation off again."""
        self.base_model.gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad even when the embedding weights are frozen, so that
        reentrant activation checkpointing still back-propagates into the layers (transformers' method)."""
        def require_grad(module, inputs, output):
            if torch.is_grad_enabled():  # generation (inference mode) must not mark its tensors
                output.requires_grad_(True)

        self.disable_input_require_grads()
        self._input_grad_hook = self.get_input_embeddings().register_forward_hook(require_grad)

    def disable_input_require_grads(self) -> None:
        """Undo :meth:`enable_input_require_grads`."""
        hook = getattr(self, "_input_grad_hook", None)
        if hook is not None:
            hook.remove()
            self._input_grad_hook = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether :meth:`gradient_checkpointing_enable` is in effect (transformers' attribute)."""
        return self.base_model.gradient_checkpointing

    def fuse_projections(self) -> DiffLlamaPreTrainedModel:
        """Compute each layer's q/k/v with one matmul, and gate/up with one, whenever no gradient is needed.

        For fast decoding (:class:`diffllama.generation.DecodeStep` calls it when compiling): at batch 1 fewer,
        larger matrix-vector products stream the weights faster. Each layer's ``q_proj``/``k_proj``/``v_proj``
        weights (and biases) become views of one concatenated tensor, as do ``gate_proj``/``up_proj``'s
        (:class:`diffllama.fusion.FusedLinear`): parameter names, values, the state dict and the checkpoint layout
        do not change, and no memory is added. In-place updates (training steps, ``load_state_dict``) stay
        visible to the fused matmul, and whenever a gradient is needed the separate projections run, so training a
        fused model is correct. Replacing parameters (``.to(dtype)``, ``load_state_dict(assign=True)``) ends the
        fusion of those layers (eager code notices, compiled code inside :meth:`inference_caches` too); call this
        again to re-fuse, or :meth:`unfuse_projections`. Idempotent. Returns ``self``.
        """
        for layer in self.base_model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def unfuse_projections(self) -> DiffLlamaPreTrainedModel:
        """Go back to separate projection matmuls (the weights keep their values). Returns ``self``."""
        for layer in self.base_model.layers:
            layer.self_attn.fused = None
            layer.mlp.fused = None
        return self

    def refresh_inference_caches(self, force: bool = False) -> None:
        """Bring every layer's inference caches up to date (host-side checks, no GPU synchronisation): λ is
        recomputed, in place, where its parameters changed (everywhere with ``force``: a write through ``.data``
        changes no version counter); a fusion whose parameters were replaced is dropped."""
        dtype = self.base_model.embed_tokens.weight.dtype  # the activation dtype outside autocast
        for layer in self.base_model.layers:
            layer.self_attn.refresh_caches(dtype, force)
            layer.mlp.refresh_caches()

    @contextmanager
    def inference_caches(self) -> Iterator[None]:
        """Let compiled code use the cached λ and fused projections while the context is open.

        Compiled code cannot check the caches against the parameters (version counters and addresses are host
        state that ``torch.compile(fullgraph=True)`` cannot branch on), so outside this context it computes λ and
        runs separate projections. On entry the caches are refreshed (:meth:`refresh_inference_caches`); do not
        change parameters while the context is open. :class:`diffllama.generation.DecodeStep` enters it around
        its compiled calls.
        """
        self.refresh_inference_caches()
        switches = [module.trust for layer in self.base_model.layers for module in (layer.self_attn, layer.mlp)]
        for switch in switches:
            switch.on = True
        try:
            yield
        finally:
            for switch in switches:
                switch.on = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter (the token embedding; all parameters share it unless cast apart), as
        transformers' ``PreTrainedModel.dtype``."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (the token embedding), as transformers' ``PreTrainedModel.device``."""
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once), in transformers' argument order: optionally only those that require
        grad, optionally without the token embedding (and a tied ``lm_head``, the same tensor)."""
        embedding = self.base_model.embed_tokens.weight
        params = {id(p): p for p in self.parameters()
                  if (p.requires_grad or not only_trainable) and not (exclude_embeddings and p is embedding)}
        return sum(p.numel() for p in params.values())

    @classmethod
    def from_config(cls, config: DiffLlamaConfig, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None):
        """A freshly initialised model of this class on ``device`` in ``dtype`` (transformers'
        ``from_config``).

        The weights are drawn in float32 on the CPU and then cast and moved, so a seed gives the same values
        whatever the dtype and device.

        Args:
            config: the model's hyper-parameters.
            dtype: a torch dtype or its name, as :meth:`from_pretrained` takes them ("float32", "float", "bfloat16",
                "float16", "half", "float64", "double"); None: float32.
            device: a torch device or its name ("cpu", "cuda", "cuda:1"); None: the CPU.

        Raises:
            ValueError: naming ``dtype`` or ``device``, for a bad value (or CUDA asked for without CUDA), before
                the model is built. TypeError: ``config`` not a ``DiffLlamaConfig``.
        """
        from diffllama.checkpoint import parse_device, parse_dtype

        dtype, device = parse_dtype(dtype), parse_device(device)
        return cls(config).to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, dtype=None, device=None, attn_implementation=None, torch_dtype=None,
                        device_map=None, **config_overrides):
        """Load a checkpoint directory or hub repo id written by transformers or by this library.

        Args:
            path_or_repo_id: local directory (config.json + safetensors) or a hub repo id (the local cache first,
                then downloaded unless ``HF_HUB_OFFLINE=1``).
            dtype: torch dtype or its name ("float32", "bfloat16", "float16", "float64"), or None / "auto" (the
                default): the checkpoint's ``dtype``/``torch_dtype`` entry, else its first floating weight's dtype,
                else float32 (as transformers). torch_dtype: transformers' deprecated name for ``dtype``.
            device: where to put the weights (default CPU). device_map: transformers' alternative for one device
                (a device, its name or index, ``{"": device}``, or "auto": the first GPU if any, else CPU).
            attn_implementation: "eager", "sdpa", "flash" or "auto".
            revision, local_files_only: for a hub repo id: a branch, tag or commit; search only the local cache.
            config_overrides: config fields to replace (or ``num_labels``).
            ``generation_config.json``, when present, is read into ``model.generation_config`` (a dict).

        Raises:
            FileNotFoundError: no such directory / cached repo, or no weights. ValueError: wrong model_type,
            missing or unexpected keys, shape mismatches, corrupt safetensors files, a bad dtype, both ``dtype``
            and ``torch_dtype`` or ``device`` and ``device_map``. NotImplementedError: a ``device_map`` over
            several devices. (Source: :func:`diffllama.checkpoint.load_pretrained`.)
        """
        from diffllama.checkpoint import load_pretrained

        return load_pretrained(cls, path_or_repo_id, dtype=dtype, device=device,
                               attn_implementation=attn_implementation, torch_dtype=torch_dtype,
                               device_map=device_map, **config_overrides)

    def save_pretrained(self, directory, *, max_shard_size: int | str = "5GB") -> None:
        """Write config.json, safetensors weights (sharded above ``max_shard_size``) and, for the causal LM,
        generation_config.json, in transformers' layout.

        Tied ``lm_head.weight`` is left out, as transformers does. Each file is written atomically: all are staged
        and moved into place only when all are complete, so a failure before the moves leaves the directory as it
        was; during the moves a reader may see the new weights with the old config.json
        (:func:`diffllama.checkpoint.save_state_dict` gives the details).

        Raises:
            ValueError: a bad ``max_shard_size`` (see :func:`diffllama.checkpoint.parse_size`), before anything is
                written. NotADirectoryError: ``directory``, or a folder above it, is a file.
        """
        from diffllama.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)


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
        if past_key_values is not None and not isinstance(past_key_values, (DynamicCache, StaticCache)):
            raise TypeError(f"past_key_values must be None or a diffllama.cache DynamicCache or StaticCache, got "
                            f"{type(past_key_values).__module__}.{type(past_key_values).__name__}")
        if cache_position is not None and past_key_values is None:  # slots of what? (eager and sdpa disagreed)
            raise ValueError("cache_position needs past_key_values (the cache whose slots it names)")
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        b, s, _ = inputs_embeds.shape
        cached = _cache_batch(past_key_values)
        if cached is not None and cached != b:
            raise ValueError(f"past_key_values holds a batch of {cached} rows, the input has {b}")
        if self.gradient_checkpointing and self.training:  # as transformers: recomputed layers cannot fill a cache
            use_cache = False
        documents = _explicit_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                                        b, s, inputs_embeds.device)
        if documents is not None:
            if past_key_values is not None or use_cache:
                raise ValueError("packed documents (document_ids or cu_seq_lens_q/k) cannot go with past_key_values "
                                 "or use_cache=True: a KV cache holds one sequence per row; pass use_cache=False")
            use_cache = False
        if use_cache is None:  # as transformers: the config's use_cache
            use_cache = self.config.use_cache
        if documents is None and position_ids is not None and attention_mask is None and past_key_values is None \
                and not use_cache:  # transformers' condition exactly: with a cache built it does not look
            _check_position_ids(position_ids, b, s)
            documents = _documents_from_positions(position_ids.to(inputs_embeds.device).expand(b, s))
        if documents is not None and position_ids is None:  # each document as if run alone
            position_ids = document_position_ids(documents)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        max_length = getattr(past_key_values, "max_length", None)
        if cache_position is not None and max_length is not None:
            past = None  # a static cache with explicit slots: its length is not needed (reading it may sync)
        else:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + s, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        _check_position_ids(position_ids, b, s)
        k_len = max_length if max_length is not None else past + s
        mask = self._build_mask(attention_mask, cache_position, b, k_len if past is None else past + s, k_len,
                                documents)

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

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        _input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        if inputs_embeds is not None:
            weight = self.embed_tokens.weight.dtype
            if inputs_embeds.dtype != weight and not torch.is_autocast_enabled(inputs_embeds.device.type):
                raise ValueError(f"inputs_embeds must have the model's dtype {weight} (outside autocast), got "
                                 f"{inputs_embeds.dtype}")
            return inputs_embeds
        if not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                                 f"got values in [{low}, {high}]")
        return self.embed_tokens(input_ids)

    @staticmethod
    def _build_mask(attention_mask, cache_position, batch: int, total: int, k_len: int,
                    documents: torch.Tensor | None = None) -> AttentionMask:
        key_padding = None
        if attention_mask is not None:
            if attention_mask.dtype.is_complex:
                raise TypeError(f"attention_mask must be a bool, integer or float (0/1) tensor, got "
                                f"{attention_mask.dtype}")
            if attention_mask.dim() == 4:
                raise ValueError(FOUR_D_MASK_MESSAGE)
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch \
                    or attention_mask.shape[1] not in (total, k_len):
                raise ValueError(f"attention_mask must have shape (batch={batch}, past + seq={total}), "
                                 f"got {tuple(attention_mask.shape)}")
            if not torch.compiler.is_compiling() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
            key_padding = attention_mask.to(device=cache_position.device, dtype=torch.bool)
            if key_padding.shape[1] < k_len:  # a static cache's unwritten tail; causality hides it anyway
                key_padding = F.pad(key_padding, (0, k_len - key_padding.shape[1]), value=False)
            if not torch.compiler.is_compiling() and bool(key_padding.all()):
                key_padding = None
        s = cache_position.shape[0]
        plain = key_padding is None and documents is None and total == s and k_len == s
        return AttentionMask(query_positions=cache_position, key_padding=key_padding, k_len=k_len, plain_causal=plain,
                             document_ids=documents)


# ---- packed documents (several documents in one row) ---------------------------------------------------------------

def _document_starts_to_ids(starts: torch.Tensor) -> torch.Tensor:
    """(B, S) bool, True where a document starts -> (B, S) int32 document index within each row, from 0."""
    starts = starts.clone()
    starts[:, 0] = False  # the first token starts document 0 whatever the flag says
    return starts.cumsum(-1, dtype=torch.int32)


def _documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' ``find_packed_sequence_indices``: (B, S) positions -> (B, S) int32 documents, a new one
    wherever a position is not the previous plus 1, or None when every row holds one document. That check syncs
    the device; under torch.compile it cannot run, and the documents are then derived unchecked (as transformers
    does when tracing)."""
    starts = F.pad(position_ids.diff(dim=-1) != 1, (1, 0), value=False)  # (B, S)
    if torch.compiler.is_compiling():
        return _document_starts_to_ids(starts)
    return _document_starts_to_ids(starts) if bool(starts.any()) else None


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 in each document, as transformers' ``DataCollatorWithFlattening`` makes
    them: (B, S) non-decreasing document ids (any integer dtype) -> (B, S) int64. No device sync."""
    s = document_ids.shape[-1]
    index = torch.arange(s, device=document_ids.device).expand_as(document_ids)
    starts = F.pad(document_ids.diff(dim=-1) != 0, (1, 0), value=True)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values  # each token's document start
    return index - first


def _explicit_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, batch: int,
                        seq: int, device: torch.device) -> torch.Tensor | None:
    """The (B, S) int32 documents given by ``document_ids`` or ``cu_seq_lens_q/k`` (see
    :meth:`DiffLlamaModel.forward`), checked; None when neither is given. Value checks sync the device and are
    skipped under torch.compile.

    Raises:
        ValueError/TypeError: naming the argument, as listed in :meth:`DiffLlamaModel.forward`.
    """
    cu_given = cu_seq_lens_q is not None or cu_seq_lens_k is not None
    if document_ids is not None and cu_given:
        raise ValueError("pass packed documents one way: document_ids or cu_seq_lens_q/cu_seq_lens_k, not both")
    if not cu_given and (max_length_q is not None or max_length_k is not None):
        raise ValueError("max_length_q/max_length_k go with cu_seq_lens_q/cu_seq_lens_k, which were not given")
    checking = not torch.compiler.is_compiling()
    if document_ids is not None:
        _check_index_dtype("document_ids", document_ids)
        if document_ids.shape != (batch, seq):
            raise ValueError(f"document_ids must have shape (batch={batch}, seq={seq}), got "
                             f"{tuple(document_ids.shape)}")
        document_ids = document_ids.to(device)
        step = document_ids.diff(dim=-1)
        if checking and bool((step < 0).any()):
            row, col = (int(i) for i in (step < 0).nonzero()[0])
            raise ValueError(f"document_ids must be non-decreasing along each row (documents packed one after "
                             f"another), got {int(document_ids[row, col])} then {int(document_ids[row, col + 1])} "
                             f"at row {row}, positions {col} and {col + 1}")
        return _document_starts_to_ids(F.pad(step != 0, (1, 0), value=False))
    if not cu_given:
        return None
    total = batch * seq
    for name, value in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
        if value is None:
            continue
        _check_index_dtype(name, value)
        if value.dim() != 1 or value.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D tensor (documents + 1,) of cumulative lengths from 0 to "
                             f"batch x seq = {total}, got shape {tuple(value.shape)}")
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None and (
            cu_seq_lens_q.shape != cu_seq_lens_k.shape or (checking and not torch.equal(
                cu_seq_lens_q.cpu(), cu_seq_lens_k.cpu()))):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal (no cache: queries and keys are the same "
                         "tokens)")
    cu = (cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k).to(device=device, dtype=torch.int64)
    lengths = cu.diff()
    if checking:
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != total or min(lengths.tolist()) < 1:
            raise ValueError(f"cu_seq_lens_q/k must rise strictly from 0 to batch x seq = {total} (cumulative "
                             f"document lengths), got {bounds}")
        missing = sorted(set(range(seq, total, seq)) - set(bounds))
        if missing:
            raise ValueError(f"cu_seq_lens_q/k must hold every row start (multiples of seq = {seq}): a document "
                             f"cannot span two rows, but {missing[0]} is missing from {bounds}")
        longest = int(lengths.max())
        for name, value in (("max_length_q", max_length_q), ("max_length_k", max_length_k)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value != longest):
                raise ValueError(f"{name} must be the longest document's length {longest} (an int), got {value!r}")
    starts = torch.zeros(total, dtype=torch.bool, device=device)
    starts[cu[:-1]] = True
    return _document_starts_to_ids(starts.view(batch, seq))


# transformers also takes a 4-D (B, 1, S, P + S) mask of its own making; the backends here build theirs from the
# 2-D padding mask and the positions, so a 4-D one is refused by every forward and generate alike.
FOUR_D_MASK_MESSAGE = (
    "a 4-D attention_mask (batch, 1, query, key) is not supported: pass attention_mask as None (every token "
    "real) or a 2-D (batch, past + seq) tensor of 0 (padding) and 1 (real token), bool, integer or float; with a "
    "static cache also (batch, max_length); generate takes the 2-D (batch, seq) mask of the prompt")


# The index dtypes nn.Embedding takes (it refuses uint8, int16 and bool with its own error); ids, positions and
# labels all accept these and no others.
INDEX_DTYPES = (torch.int64, torch.int32)


def _input_shape(input_ids, inputs_embeds, hidden_size: int) -> tuple[int, int]:
    """``(B, S)`` of the input: exactly one of ``input_ids`` (B, S) int64/int32 or ``inputs_embeds`` (B, S, D)
    floating, B and S >= 1. Host-side checks only (no device sync), so the heads check their label arguments
    against it before the decoder runs; :meth:`DiffLlamaModel._embed` adds the value checks.

    Raises:
        ValueError/TypeError: naming the argument, for both or neither given, a wrong shape or dtype.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is not None:
        if not inputs_embeds.is_floating_point() or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != hidden_size or 0 in inputs_embeds.shape:
            raise ValueError(
                f"inputs_embeds must be a floating tensor of shape (batch, seq, {hidden_size}) with "
                f"batch, seq >= 1, got {tuple(inputs_embeds.shape)} {inputs_embeds.dtype}")
        return tuple(inputs_embeds.shape[:2])
    _check_index_dtype("input_ids", input_ids)
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must have shape (batch, seq) with batch, seq >= 1, got "
                         f"{tuple(input_ids.shape)}")
    return tuple(input_ids.shape)


def _check_embedding(name: str, value, hidden_size: int) -> None:
    if not isinstance(value, nn.Embedding):
        raise TypeError(f"{name} must be a torch.nn.Embedding, got {type(value).__name__}")
    if value.embedding_dim != hidden_size:
        raise ValueError(f"{name} must have embedding_dim = hidden_size = {hidden_size}, got {value.embedding_dim}")


def _as_list(ids) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


@torch.no_grad()
def _resized_rows(new: torch.Tensor, old: torch.Tensor, mean_resizing: bool, std: float) -> None:
    """Fill ``new`` (N, D): its first min(N, M) rows from ``old`` (M, D); later rows the mean of ``old``'s rows
    (summed in float64) or N(0, std)."""
    kept = min(new.shape[0], old.shape[0])
    new[:kept] = old[:kept]
    if new.shape[0] > kept:
        if mean_resizing:
            new[kept:] = old.double().mean(0).to(new.dtype)
        else:
            nn.init.normal_(new[kept:], 0.0, std)


def _check_logits_to_keep(value) -> None:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D integer tensor of positions, got a "
                             f"{value.dim()}-D {value.dtype} tensor")
    elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps all) or a 1-D integer tensor, got {value!r}")


def _check_num_items(value) -> None:
    """num_items_in_batch divides a summed loss: None, a number > 0 or a tensor (not read back: that would sync)."""
    if value is None or isinstance(value, torch.Tensor):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"num_items_in_batch must be None, a number > 0 or a tensor, got {value!r}")


def _check_positions(name: str, value: torch.Tensor, batch: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex \
            or value.dtype == torch.bool or value.numel() != batch or value.dim() > 2:
        raise ValueError(f"{name} must be an integer tensor of shape (batch={batch},) or ({batch}, 1), got "
                         f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")


def _cache_batch(cache) -> int | None:
    """Rows held by a non-empty DynamicCache (None otherwise: a StaticCache checks its batch when updated)."""
    if isinstance(cache, DynamicCache) and cache.keys:
        return cache.keys[0].shape[0]
    return None


def _check_index_dtype(name: str, value) -> None:
    """TypeError naming ``name`` unless ``value`` is a tensor of one of :data:`INDEX_DTYPES`."""
    if not isinstance(value, torch.Tensor) or value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of dtype int64 or int32, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")


def _check_position_ids(position_ids: torch.Tensor, batch: int, seq: int) -> None:
    _check_index_dtype("position_ids", position_ids)
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq:
        raise ValueError(f"position_ids must be an integer tensor of shape (batch={batch} or 1, seq={seq}), "
                         f"got {tuple(position_ids.shape)} {position_ids.dtype}")


# ---- heads ------------------------------------------------------------------------------------------------------

def _check_tensor(name: str, value) -> None:
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")


def _check_labels(labels: torch.Tensor, shape: tuple, num_classes: int) -> torch.Tensor:
    """Class labels: shape ``shape``, int64 or int32, each in [0, num_classes) or -100 (ignored); returned as int64
    (the dtype cross-entropy needs)."""
    _check_tensor("labels", labels)
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    _check_index_dtype("labels", labels)
    if not torch.compiler.is_compiling():
        bad = (labels != -100) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {num_classes}) or be -100 (ignored), "
                             f"got {int(labels[bad][0])}")
    return labels.long()


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
        _check_logits_to_keep(logits_to_keep)
        _check_num_items(num_items_in_batch)
        if labels is not None:
            labels = _check_labels(labels, _input_shape(input_ids, inputs_embeds, self.config.hidden_size),
                                   self.config.vocab_size)
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             cache_position=cache_position, **packing)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = gemv.call(self.lm_head, hidden[:, keep, :], "lm_head")
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
        _check_num_items(num_items_in_batch)
        b, _ = _input_shape(input_ids, inputs_embeds, self.config.hidden_size)
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
        _check_tensor("labels", labels)
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
            return _check_labels(labels.reshape(-1), (b,), n)
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
        _check_num_items(num_items_in_batch)
        if labels is not None:
            labels = _check_labels(labels, _input_shape(input_ids, inputs_embeds, self.config.hidden_size),
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
        _check_num_items(num_items_in_batch)
        batch, _ = _input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        for name, value in (("start_positions", start_positions), ("end_positions", end_positions)):
            if value is not None:
                _check_positions(name, value, batch)
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
