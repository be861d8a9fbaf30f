"""From the model's mask arguments to an :class:`~diffllama.attention.AttentionMask`: padding, packed documents.

Packed rows hold several documents one after another; a token attends only to earlier tokens of its own document
(transformers' packed-sequence masking: ``masking_utils.find_packed_sequence_indices`` and
``DataCollatorWithFlattening``), so each document's output equals the document run alone. The arguments are
checked beforehand (:mod:`diffllama.inputs`); these functions only build tensors. Shapes: B batch, S new tokens,
Sk keys. The forms :meth:`diffllama.modeling.DiffLlamaModel.forward` takes:

- ``document_ids``: (B, S) int64/int32, the document of each token, non-decreasing along each row (any values; a
  new document starts wherever the value changes). Without ``position_ids`` the positions restart at 0 in each
  document. With an ``attention_mask`` as well, a key must be both real and of the query's document.
- ``cu_seq_lens_q``, ``cu_seq_lens_k``: as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives
  them: (N + 1,) int32/int64 cumulative document lengths over the B·S tokens taken row after row, from 0 to B·S,
  strictly increasing, with every row start (a multiple of S) among them (a document cannot span two rows); both
  equal when both are given. ``max_length_q``/``max_length_k``, optional with them: the longest document's length
  (int), only checked.
- implied by ``position_ids``, as transformers 5: when they are given without ``attention_mask``, without
  ``past_key_values`` and no cache is built (``use_cache`` False, or unset with the config's False), each place
  where a position is not the previous one plus 1 starts a new document (``[0 1 2 0 1 0 1 2 3]`` holds three). With
  a cache, as in transformers, positions are RoPE positions only and never cut a row. The check costs one device
  sync per forward; under ``torch.compile`` the documents are derived without it (as transformers when tracing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffllama.attention import AttentionMask
from diffllama.inputs import check_attention_mask


def document_starts_to_ids(starts: torch.Tensor) -> torch.Tensor:
    """(B, S) bool, True where a document starts -> (B, S) int32 document index within each row, from 0."""
    starts = starts.clone()
    starts[:, 0] = False  # the first token starts document 0 whatever the flag says
    return starts.cumsum(-1, dtype=torch.int32)


def documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' ``find_packed_sequence_indices``: (B, S) positions -> (B, S) int32 documents, a new one
    wherever a position is not the previous plus 1, or None when every row holds one document. That check syncs
    the device; under torch.compile it cannot run, and the documents are then derived unchecked (as transformers
    does when tracing)."""
    starts = F.pad(position_ids.diff(dim=-1) != 1, (1, 0), value=False)  # (B, S)
    if torch.compiler.is_compiling():
        return document_starts_to_ids(starts)
    return document_starts_to_ids(starts) if bool(starts.any()) else None


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 in each document, as transformers' ``DataCollatorWithFlattening`` makes
    them: (B, S) non-decreasing document ids (any integer dtype) -> (B, S) int64. No device sync."""
    s = document_ids.shape[-1]
    index = torch.arange(s, device=document_ids.device).expand_as(document_ids)
    starts = F.pad(document_ids.diff(dim=-1) != 0, (1, 0), value=True)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values  # each token's document start
    return index - first


def explicit_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, batch: int, seq: int,
                       device: torch.device) -> torch.Tensor | None:
    """The (B, S) int32 documents given by ``document_ids`` (B, S) or ``cu_seq_lens_q/k`` (N + 1,) (checked by
    :func:`diffllama.inputs.check_packing`); None when neither is given. No device sync."""
    if document_ids is not None:
        step = document_ids.to(device).diff(dim=-1)
        return document_starts_to_ids(F.pad(step != 0, (1, 0), value=False))
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
    if cu is None:
        return None
    starts = torch.zeros(batch * seq, dtype=torch.bool, device=device)
    starts[cu[:-1].to(device=device, dtype=torch.int64)] = True
    return document_starts_to_ids(starts.view(batch, seq))


def build_mask(attention_mask: torch.Tensor | None, cache_position: torch.Tensor, total: int, k_len: int,
               documents: torch.Tensor | None = None) -> AttentionMask:
    """The :class:`AttentionMask` of S new tokens at cache slots ``cache_position`` (S,) over ``k_len`` keys.

    ``attention_mask`` (B, ``total`` or ``k_len``) of 0/1, checked by :func:`diffllama.inputs.check_attention_mask`;
    a shorter one (a static cache's unwritten tail) is padded with False, which causality hides anyway. An
    all-ones mask becomes None (a device sync, skipped under compile) so backends keep their causal fast path.
    """
    key_padding = None
    if attention_mask is not None:
        key_padding = attention_mask.to(device=cache_position.device, dtype=torch.bool)
        if key_padding.shape[1] < k_len:
            key_padding = F.pad(key_padding, (0, k_len - key_padding.shape[1]), value=False)
        if not torch.compiler.is_compiling() and bool(key_padding.all()):
            key_padding = None
    s = cache_position.shape[0]
    plain = key_padding is None and documents is None and total == s and k_len == s
    return AttentionMask(query_positions=cache_position, key_padding=key_padding, k_len=k_len, plain_causal=plain,
                         document_ids=documents)


def packed_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, position_ids, attention_mask, cache,
                     use_cache: bool | None, default_use_cache: bool, batch: int, seq: int,
                     device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``(documents (B, S) int32 or None, use_cache)``: the explicit documents (then no cache), else those that
    ``position_ids`` imply under transformers' exact condition (see the module docstring). ``use_cache`` None
    takes ``default_use_cache`` (the config's, as transformers).

    Raises:
        ValueError: explicit documents with ``cache`` or ``use_cache=True`` (a KV cache holds one sequence a row).
    """
    documents = explicit_documents(document_ids, cu_seq_lens_q, cu_seq_lens_k, batch, seq, device)
    if documents is not None:
        if cache is not None or use_cache:
            raise ValueError("packed documents (document_ids or cu_seq_lens_q/k) cannot go with past_key_values "
                             "or use_cache=True: a KV cache holds one sequence per row; pass use_cache=False")
        return documents, False
    use_cache = default_use_cache if use_cache is None else use_cache
    if position_ids is not None and attention_mask is None and cache is None and not use_cache:
        documents = documents_from_positions(position_ids.to(device).expand(batch, seq))
    return documents, use_cache


def mask_and_slots(attention_mask, cache, cache_position, batch: int, seq: int, documents,
                   device: torch.device) -> tuple[AttentionMask, torch.Tensor]:
    """The :class:`AttentionMask` of ``seq`` new tokens over the cached and new keys, and their (S,) cache slots
    (``cache_position``, default: right after the cached tokens). ``attention_mask`` is checked here
    (:func:`diffllama.inputs.check_attention_mask`: its expected length depends on the cache)."""
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
