"""Llama -> DiffLlama conversion: start a differential model from pretrained Llama weights (DESIGN.md §2).

- :func:`llama_to_v2` is function-preserving. Each Llama query head i becomes V2's query heads 2i and 2i + 1 (same
  weights, so both read Llama's KV head ``i // (H/KV)``, which is V2's ``2i // (2H/KV)``), ``lambda_proj`` is zero
  so λ = σ(0) = 1/2 and ``o_i = a − a/2 = a/2``, and ``o_proj`` doubled restores ``a``. Every step is exact in
  binary floating point (halving, doubling, ``a − a/2``), so the logits equal the Llama's up to the summation order
  of the attention kernel over 2H instead of H heads.
- :func:`llama_to_v1` cannot preserve the function: V1 normalises each head pair's output (a per-head RMSNorm and
  the (1 − λ_init) scale) and gives one attention pattern to a 2d-wide value. It is the usual initialisation:
  the positive half (query heads 0 .. H/2 − 1) gets Llama's query heads 0 .. H/2 − 1, the negative half and the λ
  vectors are zero (so Q2 attends uniformly over the visible keys and λ = λ_init). Preserved exactly: the
  embedding, MLPs, norms and head, K and V, and ``o_proj``'s weights, with its columns reordered so that pair i's
  2d-wide output ``[value of Llama head i, value of Llama head i + H/2]`` meets the columns those two Llama heads
  had. What changes: head i + H/2's value is read with head i's attention pattern, the uniform negative term is
  subtracted, and each pair's output is RMS-normalised and scaled. Continued training repairs this.

:func:`convert` applies either to a Llama checkpoint folder and writes a complete checkpoint folder. The Python API
works on state dicts keyed as transformers' (any prefix: ``model.``, ``transformer.`` or none).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffllama.config import LLAMA_ONLY_KEYS, DiffLlamaConfig
from diffllama.hub import resolve_checkpoint_dir
from diffllama.io import default_permissions, new_folder, read_json_object
from diffllama.modeling import DiffLlamaForCausalLM

CONVERSION_ARCHES = ("diffllama", "diffllama-v2")  # the --arch values a Llama converts to
# Files carried over from the source folder beside the weights and config.json (tokenizer, chat template);
# generation_config.json is carried by save_pretrained (the loaded model's generation config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def llama_to_v2(state: dict[str, torch.Tensor], config: DiffLlamaConfig
                ) -> tuple[dict[str, torch.Tensor], DiffLlamaConfig]:
    """A Llama's weights and config -> DiffLlama V2's, computing the same function (module docstring).

    Args:
        state: parameter name -> tensor, transformers' Llama names (any prefix); not modified.
        config: the Llama's config (``model_type`` "llama").

    Returns:
        ``(state, config)``: new tensors for ``q_proj`` (2H·d rows: each Llama head twice, adjacent; bias alike),
        ``o_proj.weight`` (doubled), a zero ``lambda_proj.weight`` (H, D) per layer in ``q_proj``'s dtype; every
        other tensor is the same object. The config is ``model_type`` "diffllama_v2" with the same fields.

    Raises:
        ValueError: ``config.model_type`` not "llama" (naming it).
    """
    new_config = _target_config(config, "diffllama_v2")
    heads, d = config.num_attention_heads, config.head_dim
    out = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            tensor = tensor.view(heads, d, -1).repeat_interleave(2, dim=0).reshape(2 * heads * d, -1)
            out[name.removesuffix("q_proj.weight") + "lambda_proj.weight"] = tensor.new_zeros(heads, tensor.shape[1])
        elif name.endswith("self_attn.q_proj.bias"):
            tensor = tensor.view(heads, d).repeat_interleave(2, dim=0).reshape(-1)
        elif name.endswith("self_attn.o_proj.weight"):
            tensor = tensor * 2
        out[name] = tensor
    return out, new_config


def llama_to_v1(state: dict[str, torch.Tensor], config: DiffLlamaConfig
                ) -> tuple[dict[str, torch.Tensor], DiffLlamaConfig]:
    """A Llama's weights and config -> DiffLlama V1's initialisation of the module docstring (not
    function-preserving; what it keeps is listed there).

    Args:
        state, config: as :func:`llama_to_v2`; ``num_attention_heads`` must be even (V1 pairs heads).

    Returns:
        ``(state, config)``: ``q_proj`` with query heads H/2 .. H − 1 zero (bias alike), ``o_proj.weight`` with its
        per-head column blocks reordered to (0, H/2, 1, H/2 + 1, ...), zero ``lambda_{q1,k1,q2,k2}`` (d,) per layer
        in ``q_proj``'s dtype; every other tensor the same object. The config is ``model_type`` "diffllama".

    Raises:
        ValueError: ``config.model_type`` not "llama", or an odd ``num_attention_heads`` (naming them).
    """
    new_config = _target_config(config, "diffllama")
    heads, d = config.num_attention_heads, config.head_dim
    half = heads // 2
    # o_proj's input block 2i is pair i's first half (Llama head i's value), block 2i + 1 its second (head i + H/2's)
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    out = {}
    for name, tensor in state.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            tensor = tensor.clone()
            tensor[half * d:] = 0  # the negative half: uniform attention, subtracted with λ = λ_init
        if name.endswith("self_attn.q_proj.weight"):
            for suffix in ("q1", "k1", "q2", "k2"):
                out[name.removesuffix("q_proj.weight") + f"lambda_{suffix}"] = tensor.new_zeros(d)
        elif name.endswith("self_attn.o_proj.weight"):
            tensor = tensor.view(tensor.shape[0], heads, d)[:, order].reshape(tensor.shape[0], heads * d)
        out[name] = tensor
    return out, new_config


def convert(src_dir: str | os.PathLike, out_dir: str | os.PathLike, arch: str) -> Path:
    """Convert the Llama checkpoint ``src_dir`` (a folder or hub repo id, transformers' layout) to ``arch`` and
    write a complete checkpoint folder ``out_dir``: config.json, weights (the source's dtype), generation_config.json
    and the tokenizer files present in the source (:data:`TOKENIZER_FILES`). The decoder and ``lm_head`` are
    converted (a checkpoint of another head loads as transformers does: its head dropped, ``lm_head`` new).

    Everything is checked before anything is written, and the folder is built under a temporary name beside
    ``out_dir`` and renamed into place when complete: a failure leaves no ``out_dir`` (nor the folders above it
    that this call created).

    Args:
        src_dir: the Llama checkpoint; its config.json must say ``model_type`` "llama".
        out_dir: a folder that does not exist yet, or an empty one.
        arch: ``"diffllama-v2"`` (:func:`llama_to_v2`, exact) or ``"diffllama"`` (:func:`llama_to_v1`).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: naming the argument: ``arch`` not in :data:`CONVERSION_ARCHES`; a source whose model_type is
            not "llama" (naming it); V1 from an odd head count; ``out_dir`` a non-empty folder or a file.
        FileNotFoundError: no checkpoint (config.json, weights) at ``src_dir``.
    """
    if not isinstance(arch, str) or arch not in CONVERSION_ARCHES:
        raise ValueError(f"arch must be one of {CONVERSION_ARCHES} (what a Llama converts to), got {arch!r}")
    target = Path(os.path.abspath(out_dir))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"out_dir must be a new or empty folder, got {str(target)!r}, which "
                         f"{'is not empty' if target.is_dir() else 'is a file'}")
    source = resolve_checkpoint_dir(src_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in src_dir {str(source)!r}")
    source_config = read_json_object(source / "config.json")
    model_type, heads = source_config.get("model_type"), source_config.get("num_attention_heads")
    if model_type != "llama":
        raise ValueError(f"src_dir must be a Llama checkpoint (model_type 'llama'), {str(source)!r} has model_type "
                         f"{model_type!r}")
    if arch == "diffllama" and isinstance(heads, int) and heads % 2:
        raise ValueError(f"arch 'diffllama' (V1) uses query heads in pairs, so it needs an even "
                         f"num_attention_heads; {str(source)!r} has {heads}: convert to 'diffllama-v2' instead")
    llama = DiffLlamaForCausalLM.from_pretrained(source)
    to_arch = {"diffllama-v2": llama_to_v2, "diffllama": llama_to_v1}[arch]
    state, config = to_arch(llama.state_dict(), llama.config)
    with torch.device("meta"):  # shapes only: the weights are assigned below
        model = DiffLlamaForCausalLM(config)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.generation_config = llama.generation_config
    with new_folder(target.parent) as parent:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.convert-", dir=parent))
        try:
            default_permissions(staging)
            model.save_pretrained(staging)
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, staging / name)
            if target.exists():
                target.rmdir()  # empty (checked above): the rename needs the name free
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _target_config(config: DiffLlamaConfig, model_type: str) -> DiffLlamaConfig:
    """``config`` (a llama's) as ``model_type``'s: the same fields, Llama-only keys dropped."""
    if config.model_type != "llama":
        raise ValueError(f"config.model_type must be 'llama' (a conversion starts from a Llama), got "
                         f"{config.model_type!r}")
    fields = {k: v for k, v in config.to_dict().items() if k not in LLAMA_ONLY_KEYS}
    return DiffLlamaConfig.from_dict({**fields, "model_type": model_type},
                                     attn_implementation=config.attn_implementation)
