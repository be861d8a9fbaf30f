"""The transformers-style API shell of the model classes: checkpoint I/O, embeddings, resizing, gradient
checkpointing, parameter counts, device and dtype.

:class:`PreTrainedMixin` is mixed into :class:`diffllama.modeling.DiffLlamaPreTrainedModel`; each method keeps the
name, arguments and behaviour of transformers' ``PreTrainedModel`` method of the same name (its source of truth).
It relies on what every model class has: ``config``, ``base_model_prefix`` and a decoder stack with
``embed_tokens``, ``layers``, ``gradient_checkpointing`` and ``checkpoint_kwargs``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffllama import decode, hf_format
from diffllama.config import DiffLlamaConfig
from diffllama.inputs import check_embedding


class PreTrainedMixin:
    """transformers' ``PreTrainedModel`` API for the ``nn.Module`` model classes (see the module docstring)."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # transformers' Trainer passes num_items_in_batch (the label count of the whole accumulated batch) only to
    # models that declare this; without it each micro-batch's mean is averaged and accumulation changes the loss.
    accepts_loss_kwargs = True

    def __init__(self, config: DiffLlamaConfig) -> None:
        """Keep ``config``. Raises TypeError unless it is a DiffLlamaConfig."""
        super().__init__()
        if not isinstance(config, DiffLlamaConfig):
            raise TypeError(f"config must be a DiffLlamaConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """transformers' scheme: Linear/Embedding ~ N(0, initializer_range), biases 0, pad row 0, each attention
        module's λ vectors (its ``lambda_parameters()``) ~ N(0, lambda_std_dev), norms 1 (their
        ``reset_parameters``)."""
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
            elif hasattr(module, "lambda_parameters"):
                for p in module.lambda_parameters():
                    nn.init.normal_(p, 0.0, self.config.lambda_std_dev)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Point ``lm_head.weight`` at the input embedding when ``config.tie_word_embeddings`` (causal LM only)."""

    @property
    def base_model(self) -> nn.Module:
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
        check_embedding("value", value, self.config.hidden_size)
        if value.num_embeddings != self.config.vocab_size:  # lm_head and the config would disagree with it
            raise ValueError(f"value must have vocab_size = {self.config.vocab_size} rows, got "
                             f"{value.num_embeddings}; resize_token_embeddings changes the vocabulary")
        self.base_model.embed_tokens = value
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear | None:
        """``lm_head`` (weight (vocab_size, hidden_size)) for the causal LM; None for the other classes."""
        return getattr(self, "lm_head", None)

    def get_decoder(self) -> nn.Module:
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

    def fuse_projections(self) -> PreTrainedMixin:
        """Prepare the model for fast decoding: :func:`diffllama.decode.prepare_for_decode` (fused q/k/v and
        gate/up projections, a fixed λ; the state dict unchanged). Returns ``self``."""
        return decode.prepare_for_decode(self)

    def unfuse_projections(self) -> PreTrainedMixin:
        """Undo :meth:`fuse_projections` (:func:`diffllama.decode.undo_prepare_for_decode`). Returns ``self``."""
        return decode.undo_prepare_for_decode(self)

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
        dtype, device = hf_format.parse_dtype(dtype), hf_format.parse_device(device)
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
            several devices. (Source: :func:`diffllama.hf_format.load_pretrained`.)
        """
        return hf_format.load_pretrained(cls, path_or_repo_id, dtype=dtype, device=device,
                                          attn_implementation=attn_implementation, torch_dtype=torch_dtype,
                                          device_map=device_map, **config_overrides)

    def save_pretrained(self, directory, *, max_shard_size: int | str = "5GB") -> None:
        """Write config.json, safetensors weights (sharded above ``max_shard_size``) and, for the causal LM,
        generation_config.json, in transformers' layout.

        Tied ``lm_head.weight`` is left out, as transformers does. Each file is written atomically: all are staged
        and moved into place only when all are complete, so a failure before the moves leaves the directory as it
        was; during the moves a reader may see the new weights with the old config.json
        (:func:`diffllama.hf_format.save_state_dict` gives the details).

        Raises:
            ValueError: a bad ``max_shard_size`` (see :func:`diffllama.hf_format.parse_size`), before anything is
                written. NotADirectoryError: ``directory``, or a folder above it, is a file.
        """
        hf_format.save_pretrained(self, directory, max_shard_size=max_shard_size)


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
