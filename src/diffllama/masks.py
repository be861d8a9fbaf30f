"""From the model's mask arguments to an :class:`~diffllama.attention.AttentionMask`: padding, packed documents.

Packed rows hold several documents one after another; a token attends only to earlier tokens of its own document
(transformers' packed-sequence masking: ``masking_utils.find_packed_sequence_indices`` and
``DataCollatorWithFlattening``). The arguments are checked beforehand (:mod:`diffllama.inputs`); these functions
only build tensors. Shapes: B batch, S new tokens, Sk keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffllama.attention import AttentionMask


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
