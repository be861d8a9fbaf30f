"""Checks of the model classes' forward arguments, run once at each public entry point before any work.

Every check names the argument and the expected value (DESIGN.md §4). Shape, dtype and type checks are host-side;
the few value checks that must read a tensor back (token ids in range, a 0/1 mask, document order, labels in
range) synchronise the device once per call and are skipped under ``torch.compile`` (a compiled decode step must
stay free of host synchronisation, :func:`diffllama.generation.decode_one_token`). Messages follow transformers'
argument names; the model classes' docstrings list them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffllama.cache import DynamicCache, StaticCache

# transformers also takes a 4-D (B, 1, S, P + S) mask of its own making; the backends here build theirs from the
# 2-D padding mask and the positions, so a 4-D one is refused by every forward and generate alike.
FOUR_D_MASK_MESSAGE = (
    "a 4-D attention_mask (batch, 1, query, key) is not supported: pass attention_mask as None (every token "
    "real) or a 2-D (batch, past + seq) tensor of 0 (padding) and 1 (real token), bool, integer or float; with a "
    "static cache also (batch, max_length); generate takes the 2-D (batch, seq) mask of the prompt")

# The index dtypes nn.Embedding takes (it refuses uint8, int16 and bool with its own error); ids, positions and
# labels all accept these and no others.
INDEX_DTYPES = (torch.int64, torch.int32)


def value_checks() -> bool:
    """Whether checks that read tensors back (a device sync) run: always, except while ``torch.compile`` traces."""
    return not torch.compiler.is_compiling()


def check_index_dtype(name: str, value) -> None:
    """TypeError naming ``name`` unless ``value`` is a tensor of one of :data:`INDEX_DTYPES`."""
    if not isinstance(value, torch.Tensor) or value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of dtype int64 or int32, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")


def input_shape(input_ids, inputs_embeds, hidden_size: int) -> tuple[int, int]:
    """``(B, S)`` of the input: exactly one of ``input_ids`` (B, S) int64/int32 or ``inputs_embeds`` (B, S, D)
    floating, B and S >= 1. Host-side only, so the heads check their label arguments against it before the
    decoder runs.

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
    check_index_dtype("input_ids", input_ids)
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must have shape (batch, seq) with batch, seq >= 1, got "
                         f"{tuple(input_ids.shape)}")
    return tuple(input_ids.shape)


def check_embedded_inputs(input_ids, inputs_embeds, vocab_size: int, weight_dtype: torch.dtype) -> None:
    """Values of the decoder input: ids in [0, vocab_size) (a device sync, skipped under compile), embeddings in
    the weights' dtype outside autocast. Call after :func:`input_shape`.

    Raises:
        ValueError: naming the argument.
    """
    if inputs_embeds is not None:
        if inputs_embeds.dtype != weight_dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
            raise ValueError(f"inputs_embeds must have the model's dtype {weight_dtype} (outside autocast), got "
                             f"{inputs_embeds.dtype}")
    elif value_checks():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in [{low}, {high}]")


def check_cache(past_key_values, cache_position, batch: int) -> None:
    """``past_key_values`` None or a diffllama cache holding ``batch`` rows; ``cache_position`` only with a cache.

    Raises:
        TypeError: a cache of another library. ValueError: ``cache_position`` without a cache, or a batch
        mismatch with a non-empty DynamicCache (a StaticCache checks its batch when updated).
    """
    if past_key_values is not None and not isinstance(past_key_values, (DynamicCache, StaticCache)):
        raise TypeError(f"past_key_values must be None or a diffllama.cache DynamicCache or StaticCache, got "
                        f"{type(past_key_values).__module__}.{type(past_key_values).__name__}")
    if cache_position is not None and past_key_values is None:  # slots of what? (eager and sdpa disagreed)
        raise ValueError("cache_position needs past_key_values (the cache whose slots it names)")
    if isinstance(past_key_values, DynamicCache) and past_key_values.keys:
        cached = past_key_values.keys[0].shape[0]
        if cached != batch:
            raise ValueError(f"past_key_values holds a batch of {cached} rows, the input has {batch}")


def check_position_ids(position_ids: torch.Tensor, batch: int, seq: int) -> None:
    """(B or 1, S) int64/int32 RoPE positions, else a TypeError/ValueError naming ``position_ids``."""
    check_index_dtype("position_ids", position_ids)
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq:
        raise ValueError(f"position_ids must be an integer tensor of shape (batch={batch} or 1, seq={seq}), "
                         f"got {tuple(position_ids.shape)} {position_ids.dtype}")


def check_attention_mask(attention_mask: torch.Tensor, batch: int, total: int, k_len: int) -> None:
    """A 2-D (B, ``total``) or (B, ``k_len``) mask of 0 and 1 (bool, integer or float); the 0/1 check syncs.

    Raises:
        TypeError: a complex dtype. ValueError: a 4-D mask (:data:`FOUR_D_MASK_MESSAGE`), another shape, values
        other than 0 and 1.
    """
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be a bool, integer or float (0/1) tensor, got {attention_mask.dtype}")
    if attention_mask.dim() == 4:
        raise ValueError(FOUR_D_MASK_MESSAGE)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (total, k_len):
        raise ValueError(f"attention_mask must have shape (batch={batch}, past + seq={total}), "
                         f"got {tuple(attention_mask.shape)}")
    if value_checks() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")


def check_packing(document_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, batch: int,
                  seq: int) -> None:
    """The packed-document arguments of :meth:`diffllama.modeling.DiffLlamaModel.forward`: one form at most,
    dtypes, shapes, and (a device sync, skipped under compile) their values.

    Raises:
        ValueError/TypeError: naming the argument, as listed in :meth:`DiffLlamaModel.forward`.
    """
    cu_given = cu_seq_lens_q is not None or cu_seq_lens_k is not None
    if document_ids is not None and cu_given:
        raise ValueError("pass packed documents one way: document_ids or cu_seq_lens_q/cu_seq_lens_k, not both")
    if not cu_given and (max_length_q is not None or max_length_k is not None):
        raise ValueError("max_length_q/max_length_k go with cu_seq_lens_q/cu_seq_lens_k, which were not given")
    if document_ids is not None:
        check_index_dtype("document_ids", document_ids)
        if document_ids.shape != (batch, seq):
            raise ValueError(f"document_ids must have shape (batch={batch}, seq={seq}), got "
                             f"{tuple(document_ids.shape)}")
        step = document_ids.diff(dim=-1)
        if value_checks() and bool((step < 0).any()):
            row, col = (int(i) for i in (step < 0).nonzero()[0])
            raise ValueError(f"document_ids must be non-decreasing along each row (documents packed one after "
                             f"another), got {int(document_ids[row, col])} then {int(document_ids[row, col + 1])} "
                             f"at row {row}, positions {col} and {col + 1}")
    if cu_given:
        _check_cu_seq_lens(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, batch, seq)


def _check_cu_seq_lens(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, batch: int, seq: int) -> None:
    total = batch * seq
    for name, value in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
        if value is None:
            continue
        check_index_dtype(name, value)
        if value.dim() != 1 or value.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D tensor (documents + 1,) of cumulative lengths from 0 to "
                             f"batch x seq = {total}, got shape {tuple(value.shape)}")
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None and (
            cu_seq_lens_q.shape != cu_seq_lens_k.shape or (value_checks() and not torch.equal(
                cu_seq_lens_q.cpu(), cu_seq_lens_k.cpu()))):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal (no cache: queries and keys are the same "
                         "tokens)")
    if not value_checks():
        return
    bounds = (cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k).tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 1:
        raise ValueError(f"cu_seq_lens_q/k must rise strictly from 0 to batch x seq = {total} (cumulative "
                         f"document lengths), got {bounds}")
    missing = sorted(set(range(seq, total, seq)) - set(bounds))
    if missing:
        raise ValueError(f"cu_seq_lens_q/k must hold every row start (multiples of seq = {seq}): a document "
                         f"cannot span two rows, but {missing[0]} is missing from {bounds}")
    longest = max(lengths)
    for name, value in (("max_length_q", max_length_q), ("max_length_k", max_length_k)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value != longest):
            raise ValueError(f"{name} must be the longest document's length {longest} (an int), got {value!r}")


def check_embedding(name: str, value, hidden_size: int) -> None:
    """TypeError unless ``value`` is an ``nn.Embedding``; ValueError unless its width is ``hidden_size``."""
    if not isinstance(value, nn.Embedding):
        raise TypeError(f"{name} must be a torch.nn.Embedding, got {type(value).__name__}")
    if value.embedding_dim != hidden_size:
        raise ValueError(f"{name} must have embedding_dim = hidden_size = {hidden_size}, got {value.embedding_dim}")


def check_logits_to_keep(value) -> None:
    """An int >= 0 or a 1-D integer tensor of positions, else a ValueError naming ``logits_to_keep``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D integer tensor of positions, got a "
                             f"{value.dim()}-D {value.dtype} tensor")
    elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps all) or a 1-D integer tensor, got {value!r}")


def check_num_items(value) -> None:
    """num_items_in_batch divides a summed loss: None, a number > 0 or a tensor (not read back: that would sync)."""
    if value is None or isinstance(value, torch.Tensor):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"num_items_in_batch must be None, a number > 0 or a tensor, got {value!r}")


def check_positions(name: str, value: torch.Tensor, batch: int) -> None:
    """Question-answering span positions: an integer tensor of shape (B,) or (B, 1), else a ValueError."""
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex \
            or value.dtype == torch.bool or value.numel() != batch or value.dim() > 2:
        raise ValueError(f"{name} must be an integer tensor of shape (batch={batch},) or ({batch}, 1), got "
                         f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")


def check_tensor(name: str, value) -> None:
    """TypeError naming ``name`` unless ``value`` is a tensor."""
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")


def check_labels(labels: torch.Tensor, shape: tuple, num_classes: int) -> torch.Tensor:
    """Class labels: shape ``shape``, int64 or int32, each in [0, num_classes) or -100 (ignored; the range check
    syncs and is skipped under compile); returned as int64 (the dtype cross-entropy needs)."""
    check_tensor("labels", labels)
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    check_index_dtype("labels", labels)
    if value_checks():
        bad = (labels != -100) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {num_classes}) or be -100 (ignored), "
                             f"got {int(labels[bad][0])}")
    return labels.long()


def check_sequence_labels(labels: torch.Tensor, problem: str, batch: int, num_labels: int) -> torch.Tensor:
    """Sequence-classification ``labels`` for ``problem`` at batch ``batch``; single-label classes come back as
    (batch,) int64 (:func:`check_labels`). ValueError naming the shape expected."""
    if problem == "single_label_classification":
        if labels.numel() != batch:  # (b,) or (b, 1); name the shape given, not its flattening
            raise ValueError(f"labels for {problem} must have shape ({batch},) or ({batch}, 1), got "
                             f"{tuple(labels.shape)}")
        return check_labels(labels.reshape(-1), (batch,), num_labels)
    if labels.numel() != batch * num_labels:
        shape = f"({batch},) or ({batch}, 1)" if num_labels == 1 else f"({batch}, {num_labels})"
        raise ValueError(f"labels for {problem} must have shape {shape}, got {tuple(labels.shape)}")
    return labels
