"""diffllama's attention backends inside transformers' own ``DiffLlama*`` models.

transformers' ``DiffLlamaAttention.forward`` runs attention as two SDPA calls (one per half of V) and combines the
halves itself, so a function registered through transformers' ``AttentionInterface`` sees one half at a time and
cannot carry the differential combination. :func:`apply` therefore changes the class of each
``DiffLlamaAttention`` module to :class:`PatchedDiffLlamaAttention`, a subclass whose ``forward`` does the whole
differential attention in one call of a diffllama backend (the fused paired-value form, DESIGN.md §1 step 4). The
parameters, their names, the module tree and ``isinstance`` checks stay as they were, so Trainer, PEFT (LoRA wraps
``q_proj`` ... ``o_proj``, which this ``forward`` calls as submodules), gradient checkpointing, ``generate`` with
transformers' caches and ``torch.compile`` keep working. Source of the computation: transformers 5.17
``modeling_diffllama.DiffLlamaAttention.forward``; the λ formula is diffllama's
:meth:`diffllama.modeling.DiffLlamaAttention.compute_lambda` (the same as transformers').

Masks: transformers hands each layer either nothing (plain causal, when ``create_causal_mask`` could skip it) or
a dense 4-D mask (bool for sdpa, additive float for eager). The plain causal case goes to the chosen backend
(flash on CUDA); a dense mask (padding, packed rows, a static cache) goes to diffllama's sdpa backend, because the
flash kernel takes a structured mask only.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from diffllama import hf_format
from diffllama.attention import AttentionMask, get_backend, resolve_implementation
from diffllama.modeling import DiffLlamaAttention as _OurAttention
from diffllama.pretrained import PreTrainedMixin

try:
    import transformers
    from transformers.models.diffllama import modeling_diffllama
except ImportError as error:  # transformers is a test dependency of diffllama, not a runtime one
    raise ImportError("diffllama.integrations.transformers needs transformers: pip install transformers") from error

__all__ = ["DiffLlamaTrainer", "PatchedDiffLlamaAttention", "apply"]


def _to_attention_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int,
                       device: torch.device) -> AttentionMask:
    """transformers' per-layer mask (None, or (B or 1, 1, Sq, Sk) bool/additive float) -> an AttentionMask."""
    positions = torch.arange(k_len - q_len, k_len, device=device)  # queries are the last Sq keys
    if attention_mask is None:
        return AttentionMask(positions, None, k_len, plain_causal=q_len == k_len)
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be transformers' 4-D per-layer mask (B, 1, Sq, Sk), got shape "
                         f"{tuple(attention_mask.shape)}; apply() sets the model to 'sdpa' masks, keep that setting")
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    # key_padding all True makes the sdpa backend zero the rows that see no key (left padding) instead of NaN.
    every_key = torch.ones(batch, k_len, dtype=torch.bool, device=device)
    return AttentionMask(positions, every_key, k_len, _dense=allowed)


class PatchedDiffLlamaAttention(modeling_diffllama.DiffLlamaAttention):
    """transformers' ``DiffLlamaAttention`` (same ``__init__``, parameters and submodules) whose ``forward`` runs
    one diffllama backend call. Made by :func:`apply` (which sets ``diffllama_backend``), not constructed directly.

    Attributes:
        diffllama_backend: "auto" (flash on a CUDA GPU where Triton imports, else sdpa), "sdpa", "flash" or
            "eager", resolved per call for the device of the inputs.
    """

    diffllama_backend = "auto"

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """(B, S, D) -> ((B, S, D) in the dtype of ``hidden_states``, None): transformers' signature and result,
        without attention probabilities. ``position_embeddings``: RoPE ``(cos, sin)``, each (B or 1, S, d);
        ``attention_mask``: None (plain causal) or transformers' (B or 1, 1, Sq, Sk) mask; ``past_key_values``: a
        transformers ``Cache`` that this layer's keys and values (B, KV, S, d) are written to. Other keyword
        arguments of transformers' call (``position_ids``, ``use_cache``, ...) are not needed here.

        Raises:
            ValueError: a mask that is not 4-D; shapes that break diffllama's attention contract
                (:func:`diffllama.attention.check_inputs`). ImportError/RuntimeError: "flash" without Triton or GPU.
        """
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, d)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KV, S, d)
        cos, sin = position_embeddings
        q, k = modeling_diffllama.apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, KV, Sk, d)
        mask = _to_attention_mask(attention_mask, b, s, k.shape[2], q.device)
        name = resolve_implementation(self.diffllama_backend, q.device)
        if name == "flash" and attention_mask is not None:  # the kernel takes structured masks only
            name = "sdpa"
        backend = get_backend(name)
        lambda_full = _OurAttention.compute_lambda(self, q.dtype)  # same parameters, same formula
        out, _ = backend(q, k, v, mask, scale=self.scaling, lambda_full=lambda_full)  # (B, S, H/2, 2d)
        out = (1 - self.lambda_init) * F.rms_norm(out, (2 * self.head_dim,), eps=self.config.rms_norm_eps)
        return self.o_proj(out.reshape(b, s, -1)), None


def apply(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run every transformers ``DiffLlamaAttention`` inside ``model`` on a diffllama backend, in place.

    Works on any of transformers' five ``DiffLlama*`` classes, also wrapped (a PEFT model, a compiled or
    accelerate-prepared module: every submodule of that type is patched). Weights, parameter names and the module
    tree do not change; the model's attention implementation is set to "sdpa" so transformers builds the masks
    this forward understands. Calling it again only changes the backend.

    Args:
        model: an ``nn.Module`` that contains transformers ``DiffLlamaAttention`` modules.
        backend: "auto" (flash on a CUDA GPU, sdpa elsewhere), "sdpa", "flash" or "eager".

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``backend`` not one of those names, or ``model`` has no transformers ``DiffLlamaAttention``.
        TypeError: ``model`` not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend != "auto":
        get_backend(backend)  # raises ValueError naming the choices; imports flash early to fail here, not mid-run
    modules = [m for m in model.modules() if isinstance(m, modeling_diffllama.DiffLlamaAttention)]
    if not modules:
        raise ValueError(f"model ({type(model).__name__}) contains no transformers DiffLlamaAttention module; "
                         "diffllama's own models use attn_implementation instead")
    for module in modules:
        module.__class__ = PatchedDiffLlamaAttention
        module.diffllama_backend = backend
    for module in model.modules():  # the config of each DiffLlama model inside, e.g. under a PEFT wrapper
        if isinstance(module, modeling_diffllama.DiffLlamaPreTrainedModel):
            module.config._attn_implementation = "sdpa"
    return model


class DiffLlamaTrainer(transformers.Trainer):
    """transformers' ``Trainer`` whose ``save_model`` and checkpoints write a diffllama model as
    :meth:`~diffllama.pretrained.PreTrainedMixin.save_pretrained` does: config.json, safetensors weights and
    generation_config.json, a folder that ``from_pretrained`` (diffllama's, and transformers' Auto classes for
    the architectures transformers knows) loads back.

    The plain ``Trainer`` writes config.json only for transformers ``PreTrainedModel``s and PEFT models, and saves
    the state dict alone for anything else. Every other model, a PEFT-wrapped diffllama model included (its adapter
    is what PEFT saves), is saved by ``Trainer`` unchanged. Resuming (``train(resume_from_checkpoint=...)``) reads
    the weights back from the folder's safetensors, as for a plain ``Trainer``.

    Under FSDP or DeepSpeed ``Trainer`` passes the gathered full ``state_dict``; it is written instead of the
    (sharded) model's own weights. Source of the folder layout: :func:`diffllama.hf_format.save_pretrained`.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PreTrainedMixin):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state, files = hf_format.pretrained_files(model, model.state_dict() if state_dict is None else state_dict)
        hf_format.save_state_dict(state, output_dir, extra_files=files)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _issue_warnings_after_load(self, load_result) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(model, PreTrainedMixin) and model.config.tie_word_embeddings:
            # A tied lm_head.weight is left out of saved folders (as transformers does) and is the embedding again
            # after loading: not a missing key. (Trainer's own check reads a PreTrainedModel attribute.)
            missing = [key for key in load_result.missing_keys if key != "lm_head.weight"]
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)
