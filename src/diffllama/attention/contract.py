"""The contract every attention backend shares: the mask description, the input checks, the head pairing.

Every backend has the signature of :func:`diffllama.attention.eager.attention`: for each query head it computes
``softmax(q kᵀ · scale + mask) @ [v_a, v_b]`` with a 2·head_dim wide paired value (DESIGN.md §1 step 4) and returns
the differential combination ``o1 − λ·o2`` of each head pair, (B, Sq, H/2, 2d). The per-head RMSNorm and the
(1 − λ_init) scale stay in the attention module. One shared contract is what makes the backends swappable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMask:
    """Which keys each query may see: causal by position in the key axis, real (not padding) keys only, and, for
    packed rows, keys of the query's own document only.

    Attributes:
        query_positions: (Sq,) int64, the key index of each query; query i sees key j iff j <= query_positions[i].
        key_padding: (B, Sk) bool, True for real tokens, or None when every key is real.
        k_len: Sk, the number of keys (cached plus new).
        plain_causal: True when the mask is exactly the square causal mask (no padding, no documents, Sq == Sk,
            positions 0..S-1), so a backend may use its ``is_causal`` fast path instead of a dense mask.
        document_ids: (B, Sk) int32, the document of each key in a packed row (non-decreasing along the row), or
            None for one document per row. Query i sees key j only if ``document_ids[b, j] ==
            document_ids[b, query_positions[i]]`` (transformers' packed-sequence masking, as with
            ``DataCollatorWithFlattening``).
    """

    query_positions: torch.Tensor
    key_padding: torch.Tensor | None
    k_len: int
    plain_causal: bool = False
    document_ids: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """The full boolean mask, (B or 1, 1, Sq, Sk), True where attention is allowed; computed once."""
        if self._dense is None:
            keys = torch.arange(self.k_len, device=self.query_positions.device)
            allowed = keys[None, :] <= self.query_positions[:, None]  # (Sq, Sk)
            allowed = allowed[None, None]
            if self.key_padding is not None:
                allowed = allowed & self.key_padding[:, None, None, :]
            if self.document_ids is not None:
                query_docs = self.document_ids[:, self.query_positions]  # (B, Sq)
                allowed = allowed & (query_docs[:, None, :, None] == self.document_ids[:, None, None, :])
            self._dense = allowed
        return self._dense

    def query_has_keys(self) -> torch.Tensor | None:
        """(B, 1, Sq, 1) bool: False for query rows that may see no key at all (e.g. left padding), else None.

        Such rows output zeros in every backend, so padded positions never hold NaN.
        """
        if self.key_padding is None:
            return None  # a query always sees itself, also inside its own document
        return self.dense().any(dim=-1, keepdim=True)


def check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, *,
                 paired: bool = True) -> None:
    """The shape contract every backend shares (see the module docstring); cheap, no GPU sync. ``paired=False``
    checks plain attention's (the backends' ``plain_attention``), where H need not be even.

    Raises:
        ValueError: query not (B, H, Sq, d) with an H that is a multiple of KV (and even when ``paired``),
            key/value not (B, KV, Sk, d), or a mask that does not describe Sq queries over Sk keys of B rows.
        TypeError: ``mask.query_positions`` not an integer tensor, ``mask.key_padding`` not bool.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key, value must be 4-D (B, H, S, d), got {query.dim()}, {key.dim()}, {value.dim()}")
    b, h, sq, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[3] != d:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be (B={b}, KV, Sk, d={d})")
    if (paired and h % 2) or h % key.shape[1]:
        raise ValueError(f"num heads {h} must be {'even and ' if paired else ''}a multiple of the KV heads "
                         f"{key.shape[1]}")
    if mask.k_len != key.shape[2]:
        raise ValueError(f"mask.k_len {mask.k_len} != key length {key.shape[2]}")
    positions = mask.query_positions
    if positions.shape != (sq,):
        raise ValueError(f"mask.query_positions must be ({sq},), got {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"mask.query_positions must be an integer tensor (key indices), got {positions.dtype}")
    padding = mask.key_padding
    if padding is not None and padding.shape != (b, key.shape[2]):
        raise ValueError(f"mask.key_padding must be (B={b}, Sk={key.shape[2]}), got {tuple(padding.shape)}")
    if padding is not None and padding.dtype != torch.bool:
        raise TypeError(f"mask.key_padding must be a bool tensor (True = real key), got {padding.dtype}")
    docs = mask.document_ids
    if docs is not None and docs.shape != (b, key.shape[2]):
        raise ValueError(f"mask.document_ids must be (B={b}, Sk={key.shape[2]}), got {tuple(docs.shape)}")
    if docs is not None and docs.dtype != torch.int32:
        raise TypeError(f"mask.document_ids must be an int32 tensor (document index per key), got {docs.dtype}")


def pair_values(key: torch.Tensor, value: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrange K and the 2·head_dim wide paired V so that query head j reads key head ``j // (H / n)``.

    Args:
        key, value: (B, KV, Sk, d). num_heads: H, even, a multiple of KV.

    Returns:
        ``(key, value2)``: with an even KV, key is unchanged and value2 is (B, KV, Sk, 2d) with
        ``value2[m] = [v[m mod KV/2], v[m mod KV/2 + KV/2]]`` (transformers' pairing); with an odd KV (MQA
        included) both are expanded to H heads and ``value2[j] = [v_H[j mod H/2], v_H[j mod H/2 + H/2]]`` where
        v_H is v expanded to H heads: the general form of DESIGN.md §1 step 4, equal to the first when KV is even.
    """
    kv_heads = key.shape[1]
    if kv_heads % 2:
        key, value = repeat_kv(key, num_heads // kv_heads), repeat_kv(value, num_heads // kv_heads)
    first, second = value.chunk(2, dim=1)  # each (B, n/2, Sk, d)
    paired = torch.cat((first, second), dim=-1)  # (B, n/2, Sk, 2d)
    return key, paired.repeat(1, 2, 1, 1)  # (B, n, Sk, 2d)


def combine_pairs(out: torch.Tensor, lambda_full: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, 2d) per-head outputs -> (B, Sq, H/2, 2d) ``o1 − λ·o2``, head i paired with head i + H/2."""
    out1, out2 = out.transpose(1, 2).chunk(2, dim=2)  # each (B, Sq, H/2, 2d)
    return out1 - lambda_full * out2


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, S, d) -> (B, KV·n_rep, S, d), each KV head repeated n_rep times in place (GQA expansion)."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)
