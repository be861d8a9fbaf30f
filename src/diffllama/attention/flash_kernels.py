"""Triton kernels for fused differential flash attention (forward, split-key decode, backward).

Layouts (all strides passed explicitly; the last dimension must be contiguous):
    Q (B, H, Sq, d), K and V (B, KV, Sk, d) with an even KV (the launcher expands an odd KV to H heads),
    Out and O2 (B, Sq, H/2, 2d), LSE and R (B, H, Sq) float32, QPOS (Sq,) int64, PAD (B, Sk) uint8 (1 = real key),
    DOC (B, Sk) int32 (document of each key, non-decreasing along a row; with HAS_DOC only).

Packed documents (HAS_DOC): query i sees key j only if DOC[b, j] == DOC[b, QPOS[i]], on top of causality and padding.
Since the ids are non-decreasing, the keys a query block may see start at the first key of its smallest document:
the forward and dQ kernels start their key loop there (a binary search of DOC), and the dK/dV' kernel ends its query
loop at the first query past the key block's last document, so a packed row costs about what its documents cost
alone. Blocks inside one document on both sides skip the elementwise mask. DOC_OK (one uint8, computed on the GPU)
says whether DOC is non-decreasing; if not, no block is skipped and every block is masked (slow but right).

Head pairing (DESIGN.md §1 step 4), worked out for the kernels: with G = H / KV, pair i (query heads i and
i + H/2) reads key heads ``ka = i // G`` and ``kb = ka + KV/2`` and both of its heads use the same paired value
``V' = [V[ka], V[kb]]`` (2d wide). So one forward program owns a pair and a query block, and one dK/dV program owns
the key heads g and g + KV/2 (g < KV/2) and a key block: every one of the 2G query heads that touches them reads
``V' = [V[g], V[g+KV/2]]``, G of them read K[g] and G read K[g+KV/2]; no atomics and no reduction afterwards.

Scores are pre-scaled by ``scale · log2(e)`` so the softmax uses exp2; LSE is kept in that base-2 domain.
Rows that may see no key end with l = 0: their output is 0 and their LSE is +inf, so the backward's
``exp2(s − lse)`` is 0 there as well (never NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels take exp2: scores are scaled by scale·log2(e)


def empty(shape, dtype, device, poison: bool) -> torch.Tensor:
    """An output buffer for a kernel: uninitialised, or all NaN with ``poison`` (tests: an element that a kernel
    never writes then shows)."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _load_tile(base, offs_r, stride_r, offs_d, nrows, HEAD_DIM: tl.constexpr, DP: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """(len(offs_r), DP) tile of rows ``offs_r`` of a (rows, HEAD_DIM) matrix; zeros outside it."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if CHECK_ROWS:
        if DP != HEAD_DIM:
            tile = tl.load(ptrs, mask=(offs_r[:, None] < nrows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            tile = tl.load(ptrs, mask=offs_r[:, None] < nrows, other=0.0)
    else:
        if DP != HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, offs_r, stride_r, offs_d, nrows, value, HEAD_DIM: tl.constexpr, DP: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if DP != HEAD_DIM:
        tl.store(ptrs, value, mask=(offs_r[:, None] < nrows) & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, value, mask=offs_r[:, None] < nrows)


@triton.jit
def _heavy_first():
    """Query block of a program in a (heads, query blocks) grid, counted from the last block. Under causal
    masking a later query block sees more keys; the GPU starts programs in launch order (axis 0 fastest), so
    launching the longest ones first leaves only short ones for the final wave instead of a tail of long ones
    (the longest-first ordering FlashAttention-3 uses for causal attention)."""
    return tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _key_bounds(qpos, row_ok, Sk, BLOCK_N: tl.constexpr):
    """For a query block: ``hi`` = keys any row may see; ``full`` = keys (whole blocks) every row sees."""
    qmax = tl.max(tl.where(row_ok, qpos, -1), 0)
    qmin = tl.min(tl.where(row_ok, qpos, 2147483647), 0)
    hi = tl.minimum(qmax + 1, Sk).to(tl.int32)
    full = (tl.minimum(qmin + 1, Sk) // BLOCK_N * BLOCK_N).to(tl.int32)
    full = tl.minimum(full, hi)
    return full, hi


@triton.jit
def _doc_bounds(doc_base, qdoc, row_ok, full, sorted_docs, Sk, BLOCK_N: tl.constexpr):
    """For a query block of packed documents (``qdoc`` (BM,) the document of each query): ``lo``, the first key
    block that holds a key of the block's first document (earlier blocks are skipped), and ``ustart``, where the
    blocks inside the queries' one document begin (blocks in [ustart, full) need no mask; ``full`` when the
    queries span several documents). Without sorted ids nothing is skipped: lo = 0, ustart = full."""
    dmin = tl.min(tl.where(row_ok, qdoc, 2147483647), 0)
    dmax = tl.max(tl.where(row_ok, qdoc, -1), 0)
    lo = (_search_sorted(doc_base, Sk, dmin) // BLOCK_N * BLOCK_N).to(tl.int32)
    own = tl.cdiv(_search_sorted(doc_base, Sk, dmax), BLOCK_N) * BLOCK_N
    ustart = tl.minimum(tl.maximum(tl.where(dmin == dmax, own, full), lo), full).to(tl.int32)
    return tl.where(sorted_docs, lo, 0), tl.where(sorted_docs, ustart, full)


@triton.jit
def _query_block(QPOS, doc_base, DOC_OK, offs_m, Sq, Sk, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """A query block's rows and the key blocks they read, as the forward and dQ kernels both need them:
    ``row_ok``, positions ``qpos``, documents ``qdoc`` (``qpos`` itself without HAS_DOC, where it is unused) and
    the bounds ``lo``, ``ustart`` (_doc_bounds; both 0 without HAS_DOC), ``full``, ``hi`` (_key_bounds)."""
    row_ok = offs_m < Sq
    qpos = tl.load(QPOS + offs_m, mask=row_ok, other=0)
    full, hi = _key_bounds(qpos, row_ok, Sk, BLOCK_N)
    lo = 0
    ustart = 0
    qdoc = qpos
    if HAS_DOC:
        qdoc = tl.load(doc_base + qpos, mask=row_ok, other=0)
        lo, ustart = _doc_bounds(doc_base, qdoc, row_ok, full, tl.load(DOC_OK) != 0, Sk, BLOCK_N)
    return row_ok, qpos, qdoc, lo, ustart, full, hi


@triton.jit
def _mask_keys(x, FILL: tl.constexpr, offs_n, qpos, pad_base, doc_base, qdoc, Sk, MASKED: tl.constexpr,
               HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """``x`` (BM, BN) with ``FILL`` where a query may not see a key: a later position, past Sk or another document
    (MASKED blocks only; ``qdoc`` (BM,) the document of each query) and padding (HAS_PAD). Unmasked blocks without
    padding pass through untouched."""
    if MASKED:
        ok = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] < Sk)
        if HAS_PAD:
            keep = tl.load(pad_base + offs_n, mask=offs_n < Sk, other=0) != 0
            ok = ok & keep[None, :]
        if HAS_DOC:
            kdoc = tl.load(doc_base + offs_n, mask=offs_n < Sk, other=-1)
            ok = ok & (kdoc[None, :] == qdoc[:, None])
        x = tl.where(ok, x, FILL)
    else:
        if HAS_PAD:
            keep = tl.load(pad_base + offs_n) != 0
            x = tl.where(keep[None, :], x, FILL)
    return x


@triton.jit
def _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos,
              doc_base, qdoc, offs_n0, offs_d, lo, hi, Sk, qk_scale,
              HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """Online softmax over key blocks [lo, hi) for one query head: both halves of the 2d-wide value."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, MASKED)  # (BN, DP)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BM, BN), base-2 logits
        s = _mask_keys(s, float("-inf"), offs_n, qpos, pad_base, doc_base, qdoc, Sk, MASKED, HAS_PAD, HAS_DOC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        va = _load_tile(va_base, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        vb = _load_tile(vb_base, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        p16 = p.to(va.dtype)
        acc_a = tl.dot(p16, va, acc_a * alpha[:, None])
        acc_b = tl.dot(p16, vb, acc_b * alpha[:, None])
        m_i = m_new
    return acc_a, acc_b, m_i, l_i


@triton.jit
def _fwd_head(q, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos, doc_base, qdoc, offs_n0, offs_d,
              lo, ustart, full, hi, Sk, qk_scale,
              HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """One query head over keys [lo, hi): with HAS_DOC masked blocks up to ``ustart`` (document borders), then
    unmasked blocks up to ``full``, then masked ones (causal border). Returns the normalised halves of the output
    and the base-2 LSE (+inf for rows with no key, -inf never)."""
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DP], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DP], tl.float32)
    if HAS_DOC:
        acc_a, acc_b, m_i, l_i = _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn,
                                           stride_vn, pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, lo, ustart,
                                           Sk, qk_scale, HEAD_DIM, DP, BLOCK_N, True, HAS_PAD, HAS_DOC)
    acc_a, acc_b, m_i, l_i = _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn, stride_vn,
                                       pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, ustart, full, Sk, qk_scale,
                                       HEAD_DIM, DP, BLOCK_N, False, HAS_PAD, HAS_DOC)
    acc_a, acc_b, m_i, l_i = _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn, stride_vn,
                                       pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, tl.maximum(full, lo), hi,
                                       Sk, qk_scale, HEAD_DIM, DP, BLOCK_N, True, HAS_PAD, HAS_DOC)
    seen = l_i > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    return acc_a * inv[:, None], acc_b * inv[:, None], lse


@triton.jit
def attn_fwd(Q, K, V, Out, O2, LSE, QPOS, PAD, DOC, DOC_OK, LAM,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
             stride_ob, stride_om, stride_oh, stride_pb, stride_docb,
             H, KV_HALF, GROUP, Sq, Sk, qk_scale, SEQ_BUCKET,
             HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch · head pair, query block): head i + H/2 first (o2 saved for the backward), then
    head i, and the epilogue writes ``o1 − λ·o2``. Launched last query block first (see _heavy_first). With
    HAS_DOC the key loop starts at the query block's first document (see _doc_bounds)."""
    bp = tl.program_id(0)
    pid_m = _heavy_first()
    half_h = H // 2
    b = (bp // half_h).to(tl.int64)
    i = bp % half_h
    ka = i // GROUP
    kb = ka + KV_HALF
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    pad_base = PAD + b * stride_pb
    doc_base = DOC + b * stride_docb
    row_ok, qpos, qdoc, lo, ustart, full, hi = _query_block(QPOS, doc_base, DOC_OK, offs_m, Sq, Sk, BLOCK_N,
                                                            HAS_DOC)
    va_base = V + b * stride_vb + ka * stride_vh
    vb_base = V + b * stride_vb + kb * stride_vh
    o_rows = b * stride_ob + i * stride_oh

    # Second head of the pair: o2, kept for the backward (and re-read just below).
    q = _load_tile(Q + b * stride_qb + (i + half_h) * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    o2a, o2b, lse2 = _fwd_head(q, K + b * stride_kb + kb * stride_kh, va_base, vb_base, stride_kn, stride_vn,
                               pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, lo, ustart, full, hi, Sk, qk_scale,
                               HEAD_DIM, DP, BLOCK_M, BLOCK_N, HAS_PAD, HAS_DOC)
    _store_tile(O2 + o_rows, offs_m, stride_om, offs_d, Sq, o2a.to(O2.dtype.element_ty), HEAD_DIM, DP)
    _store_tile(O2 + o_rows + HEAD_DIM, offs_m, stride_om, offs_d, Sq, o2b.to(O2.dtype.element_ty), HEAD_DIM, DP)
    tl.store(LSE + (b * H + i + half_h) * Sq + offs_m, lse2, mask=row_ok)

    # First head, then the differential combination with the rounded o2 (the backward sees the same o2).
    q = _load_tile(Q + b * stride_qb + i * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    o1a, o1b, lse1 = _fwd_head(q, K + b * stride_kb + ka * stride_kh, va_base, vb_base, stride_kn, stride_vn,
                               pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, lo, ustart, full, hi, Sk, qk_scale,
                               HEAD_DIM, DP, BLOCK_M, BLOCK_N, HAS_PAD, HAS_DOC)
    tl.store(LSE + (b * H + i) * Sq + offs_m, lse1, mask=row_ok)
    lam = tl.load(LAM)
    tl.debug_barrier()
    o2a = _load_tile(O2 + o_rows, offs_m, stride_om, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    o2b = _load_tile(O2 + o_rows + HEAD_DIM, offs_m, stride_om, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    _store_tile(Out + o_rows, offs_m, stride_om, offs_d, Sq, (o1a - lam * o2a).to(Out.dtype.element_ty),
                HEAD_DIM, DP)
    _store_tile(Out + o_rows + HEAD_DIM, offs_m, stride_om, offs_d, Sq, (o1b - lam * o2b).to(Out.dtype.element_ty),
                HEAD_DIM, DP)


@triton.jit
def attn_fwd_split(Q, K, V, OPART, LPART, QPOS, PAD,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                   stride_vn, stride_pb,
                   B, H, KV_HALF, GROUP, Sq, Sk, chunk, qk_scale,
                   HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Decode path: one program per (key chunk, batch · head, query block) writes its chunk's normalised
    per-head output (OPART (S, B, H, Sq, 2·DP) float32) and base-2 LSE (-inf when the chunk has no visible key)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    j = bh % H
    half_h = H // 2
    pair = j % half_h
    va_h = pair // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    row_ok = offs_m < Sq
    qpos = tl.load(QPOS + offs_m, mask=row_ok, other=0)
    _, hi = _key_bounds(qpos, row_ok, Sk, BLOCK_N)
    lo = split * chunk
    hi = tl.minimum(hi, lo + chunk)
    q = _load_tile(Q + b * stride_qb + j * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    oa, ob, lse = _fwd_head(q, K + b * stride_kb + (j // GROUP) * stride_kh, V + b * stride_vb + va_h * stride_vh,
                            V + b * stride_vb + (va_h + KV_HALF) * stride_vh, stride_kn, stride_vn,
                            PAD + b * stride_pb, qpos, PAD, qpos, offs_n0, offs_d, lo, lo, lo, hi, Sk, qk_scale,
                            HEAD_DIM, DP, BLOCK_M, BLOCK_N, HAS_PAD, False)
    lse = tl.where(lse == float("inf"), float("-inf"), lse)
    row = (split * B + b) * H + j
    base = OPART + row * Sq * 2 * DP
    tl.store(base + offs_m[:, None] * 2 * DP + offs_d[None, :], oa, mask=row_ok[:, None])
    tl.store(base + offs_m[:, None] * 2 * DP + DP + offs_d[None, :], ob, mask=row_ok[:, None])
    tl.store(LPART + row * Sq + offs_m, lse, mask=row_ok)


@triton.jit
def attn_bwd_pre(Out, O2, DO, R, LAM,
                 stride_ob, stride_om, stride_oh, stride_db, stride_dm, stride_dh,
                 H, Sq, HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per row of each head: r = rowsum(dO · o_head) with o1 = out + λ·o2 (raw, before the head's ∓λ factor)."""
    pid_m = tl.program_id(0)
    bp = tl.program_id(1)
    half_h = H // 2
    b = (bp // half_h).to(tl.int64)
    i = bp % half_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    o_base = b * stride_ob + i * stride_oh
    d_base = DO + b * stride_db + i * stride_dh
    doa = _load_tile(d_base, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    dob = _load_tile(d_base + HEAD_DIM, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    oa = _load_tile(Out + o_base, offs_m, stride_om, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    ob = _load_tile(Out + o_base + HEAD_DIM, offs_m, stride_om, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    r1 = tl.sum(doa * oa + dob * ob, 1)
    oa = _load_tile(O2 + o_base, offs_m, stride_om, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    ob = _load_tile(O2 + o_base + HEAD_DIM, offs_m, stride_om, offs_d, Sq, HEAD_DIM, DP, True).to(tl.float32)
    r2 = tl.sum(doa * oa + dob * ob, 1)
    lam = tl.load(LAM)
    row_ok = offs_m < Sq
    tl.store(R + (b * H + i) * Sq + offs_m, r1 + lam * r2, mask=row_ok)
    tl.store(R + (b * H + i + half_h) * Sq + offs_m, r2, mask=row_ok)


@triton.jit
def _search_sorted(BASE, n, target):
    """Smallest index i < n with BASE[i] >= target (BASE[:n] non-decreasing); n if none."""
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + n
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(BASE + mid) < target
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _pair_probs_t(ka, kb, q1, q2, lse1, lse2, qk_scale):
    """Transposed probabilities (BN, BM) of both heads of a pair for one key block and one query block."""
    p1 = tl.math.exp2(tl.dot(ka, tl.trans(q1)) * qk_scale - lse1[None, :])
    p2 = tl.math.exp2(tl.dot(kb, tl.trans(q2)) * qk_scale - lse2[None, :])
    return p1, p2


@triton.jit
def _dkdv_loop(dka, dkb, dva, dvb, ka, kb, va, vb, q1_base, q2_base, do_base, lse1_base, lse2_base, r1_base,
               r2_base, dq1_base, dq2_base, QPOS, offs_n, col_keep, doc_base, kdoc, offs_d, stride_qm, stride_dm,
               lo, hi, Sq, qk_scale, neg_lam,
               HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               DO_DK: tl.constexpr, DO_DV: tl.constexpr, DQ_ATOMIC: tl.constexpr, HAS_DOC: tl.constexpr):
    """One head pair's contribution over query rows [lo, hi) to this key block's gradients. Both heads share dO
    and V', so ``dP = dO·V'ᵀ`` is computed once for the pair and ``dV' = (P1 − λ·P2)ᵀ·dO`` is one product: 10·d
    multiply-adds per (query, key) for the pair instead of 14·d for two separate heads.
    DO_DK: accumulate dK of both key heads (and, with DQ_ATOMIC, add c·dS·K into the float32 dQ buffers).
    DO_DV: accumulate dV' = [dV_a, dV_b]. Scores are kept transposed (BN, BM) so the accumulators stay key-major.
    MASKED blocks apply the causal mask and, with HAS_DOC, the document mask (``kdoc`` (BN,) the keys' documents)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        q1 = _load_tile(q1_base, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
        q2 = _load_tile(q2_base, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
        doa = _load_tile(do_base, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
        dob = _load_tile(do_base + HEAD_DIM, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
        lse1 = tl.load(lse1_base + offs_m, mask=row_ok, other=float("inf"))
        lse2 = tl.load(lse2_base + offs_m, mask=row_ok, other=float("inf"))
        p1, p2 = _pair_probs_t(ka, kb, q1, q2, lse1, lse2, qk_scale)
        if MASKED:
            qp = tl.load(QPOS + offs_m, mask=row_ok, other=-1)
            seen = offs_n[:, None] <= qp[None, :]
            if HAS_DOC:
                qdoc = tl.load(doc_base + qp, mask=row_ok, other=-1)
                seen = seen & (kdoc[:, None] == qdoc[None, :])
            p1 = tl.where(seen, p1, 0.0)
            p2 = tl.where(seen, p2, 0.0)
        if DQ_ATOMIC:  # padding and out-of-range keys must not reach dQ (their own dK/dV rows are zeroed later)
            p1 = tl.where(col_keep[:, None], p1, 0.0)
            p2 = tl.where(col_keep[:, None], p2, 0.0)
        if DO_DV:
            pc = (p1 + neg_lam * p2).to(q1.dtype)
            dva = tl.dot(pc, doa, dva)
            dvb = tl.dot(pc, dob, dvb)
        if DO_DK:
            r1 = tl.load(r1_base + offs_m, mask=row_ok, other=0.0)
            r2 = tl.load(r2_base + offs_m, mask=row_ok, other=0.0)
            dp = tl.dot(va, tl.trans(doa))
            dp = tl.dot(vb, tl.trans(dob), dp)
            ds1 = (p1 * (dp - r1[None, :])).to(q1.dtype)
            ds2 = (p2 * (dp - r2[None, :]) * neg_lam).to(q1.dtype)
            dka = tl.dot(ds1, q1, dka)
            dkb = tl.dot(ds2, q2, dkb)
            if DQ_ATOMIC:
                dq_ptrs = offs_m[:, None] * DP + offs_d[None, :]
                tl.atomic_add(dq1_base + dq_ptrs, tl.dot(tl.trans(ds1), ka), mask=row_ok[:, None], sem="relaxed")
                tl.atomic_add(dq2_base + dq_ptrs, tl.dot(tl.trans(ds2), kb), mask=row_ok[:, None], sem="relaxed")
    return dka, dkb, dva, dvb


@triton.jit
def _dkdv_query_range(QPOS, ORDERED, DOC, DOC_OK, b, stride_docb, offs_n, col_ok, pid_n, Sq, Sk,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr):
    """Query rows ``(lo, mid, uend, qend)`` a key block's dK/dV' program visits, its row's DOC and its keys' ids."""
    lo = _search_sorted(QPOS, Sq, pid_n * BLOCK_N)
    full = tl.maximum(_search_sorted(QPOS, Sq, pid_n * BLOCK_N + BLOCK_N - 1), lo)
    mid = lo + tl.cdiv(full - lo, BLOCK_M) * BLOCK_M  # rows [lo, mid) may see part of the block, later rows all
    ordered = tl.load(ORDERED) != 0
    lo = tl.where(ordered, lo, 0)
    mid = tl.where(ordered, mid, tl.cdiv(Sq, BLOCK_M) * BLOCK_M)
    uend = Sq
    doc_base = DOC + b * stride_docb
    qend = Sq  # read only with HAS_DOC, as is kdoc
    kdoc = offs_n
    if HAS_DOC:
        kdoc = tl.load(doc_base + offs_n, mask=col_ok, other=-2)
        first_doc = tl.load(doc_base + pid_n * BLOCK_N)
        last_doc = tl.load(doc_base + tl.minimum(pid_n * BLOCK_N + BLOCK_N, Sk) - 1)
        docs_ok = tl.load(DOC_OK) != 0
        qend = _search_sorted(QPOS, Sq, _search_sorted(doc_base, Sk, last_doc + 1))
        qend = tl.where(ordered & docs_ok, qend, Sq)
        mid = tl.where((first_doc == last_doc) & docs_ok, tl.minimum(mid, qend), qend)
        uend = mid + tl.maximum(qend - mid, 0) // BLOCK_M * BLOCK_M
    return lo, mid, uend, qend, doc_base, kdoc


@triton.jit
def _dkdv_pairs(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DO, LSE, R, DQACC, QPOS, b, g, half_h, H, GROUP, Sq,
                stride_qb, stride_qh, stride_qm, stride_db, stride_dm, stride_dh, offs_n, col_keep, doc_base, kdoc,
                offs_d, lo, mid, uend, qend, qk_scale, neg_lam,
                HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, DO_DK: tl.constexpr,
                DO_DV: tl.constexpr, DQ_ATOMIC: tl.constexpr, HAS_DOC: tl.constexpr):
    """Accumulates one key block's dK/dV' over the G head pairs that read key heads g and g + KV/2."""
    for jj in range(0, GROUP):
        h1 = g * GROUP + jj
        h2 = h1 + half_h
        q1_base = Q + b * stride_qb + h1 * stride_qh
        q2_base = Q + b * stride_qb + h2 * stride_qh
        do_base = DO + b * stride_db + h1 * stride_dh
        lse1_base = LSE + (b * H + h1) * Sq
        lse2_base = LSE + (b * H + h2) * Sq
        r1_base = R + (b * H + h1) * Sq
        r2_base = R + (b * H + h2) * Sq
        dq1_base = DQACC + (b * H + h1) * Sq * DP
        dq2_base = DQACC + (b * H + h2) * Sq * DP
        dka, dkb, dva, dvb = _dkdv_loop(dka, dkb, dva, dvb, ka, kb, va, vb, q1_base, q2_base, do_base, lse1_base,
                                        lse2_base, r1_base, r2_base, dq1_base, dq2_base, QPOS, offs_n, col_keep,
                                        doc_base, kdoc, offs_d, stride_qm, stride_dm, lo, mid, Sq, qk_scale,
                                        neg_lam, HEAD_DIM, DP, BLOCK_M, True, DO_DK, DO_DV, DQ_ATOMIC, HAS_DOC)
        dka, dkb, dva, dvb = _dkdv_loop(dka, dkb, dva, dvb, ka, kb, va, vb, q1_base, q2_base, do_base, lse1_base,
                                        lse2_base, r1_base, r2_base, dq1_base, dq2_base, QPOS, offs_n, col_keep,
                                        doc_base, kdoc, offs_d, stride_qm, stride_dm, mid, uend, Sq, qk_scale,
                                        neg_lam, HEAD_DIM, DP, BLOCK_M, False, DO_DK, DO_DV, DQ_ATOMIC, HAS_DOC)
        if HAS_DOC:  # the rows of the block's last document that do not fill a whole query block
            dka, dkb, dva, dvb = _dkdv_loop(dka, dkb, dva, dvb, ka, kb, va, vb, q1_base, q2_base, do_base,
                                            lse1_base, lse2_base, r1_base, r2_base, dq1_base, dq2_base, QPOS,
                                            offs_n, col_keep, doc_base, kdoc, offs_d, stride_qm, stride_dm, uend,
                                            qend, Sq, qk_scale, neg_lam, HEAD_DIM, DP, BLOCK_M, True, DO_DK, DO_DV,
                                            DQ_ATOMIC, HAS_DOC)
    return dka, dkb, dva, dvb


@triton.jit
def _dkdv_store(DK, DV, dka, dkb, dva, dvb, keep, b, g, kv, KV_HALF, Sk, offs_n, offs_d, scale,
                HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr, DO_DK: tl.constexpr,
                DO_DV: tl.constexpr):
    """Writes dK (times ``scale``) and dV' of key heads g and g + KV/2 for one key block, 0 at padding keys."""
    if HAS_PAD:  # padding keys got garbage probabilities (their LSE excluded them): their gradients are 0
        dka = tl.where(keep[:, None], dka, 0.0)
        dkb = tl.where(keep[:, None], dkb, 0.0)
        dva = tl.where(keep[:, None], dva, 0.0)
        dvb = tl.where(keep[:, None], dvb, 0.0)
    if DO_DK:
        _store_tile(DK + ((b * kv + g) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk,
                    (dka * scale).to(DK.dtype.element_ty), HEAD_DIM, DP)
        _store_tile(DK + ((b * kv + g + KV_HALF) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk,
                    (dkb * scale).to(DK.dtype.element_ty), HEAD_DIM, DP)
    if DO_DV:
        _store_tile(DV + ((b * kv + g) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk, dva.to(DV.dtype.element_ty),
                    HEAD_DIM, DP)
        _store_tile(DV + ((b * kv + g + KV_HALF) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk,
                    dvb.to(DV.dtype.element_ty), HEAD_DIM, DP)


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, R, QPOS, ORDERED, PAD, DOC, DOC_OK, DK, DV, DQACC, LAM,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_db, stride_dm, stride_dh, stride_pb, stride_docb,
                  H, KV_HALF, GROUP, Sq, Sk, qk_scale, scale, SEQ_BUCKET,
                  HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
                  DQ_ATOMIC: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """One program per (batch · g, key block), g < KV/2, owning key/value heads g and g + KV/2: the G head pairs
    that read them (pair i reads K[g] for head i, K[g + KV/2] for head i + H/2, and V' = [V[g], V[g + KV/2]]).
    DO_DK writes dK of both key heads, DO_DV dV of both value heads (one launch may do both, or two launches one
    each: fewer accumulators per program, at the cost of computing P twice). DK and DV have K's and V's shapes,
    contiguous. With DQ_ATOMIC (needs DO_DK), dQ/scale is accumulated too, into DQACC (B, H, Sq, DP) float32,
    zeroed by the caller. Key block 0, which every query sees, comes first: the heaviest programs start first
    without reordering (see _heavy_first). ORDERED (one uint8) says whether QPOS is non-decreasing; if not, the
    binary search for the first query that sees this key block does not apply and every query block is visited
    with the causal mask. With HAS_DOC the query loop ends at the first query after the key block's last document
    (QPOS ordered and DOC_OK only); rows [mid, uend) lie in the block's one document and skip the mask."""
    bg = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (bg // KV_HALF).to(tl.int64)
    g = bg % KV_HALF
    half_h = H // 2
    kv = 2 * KV_HALF
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    col_ok = offs_n < Sk
    lo, mid, uend, qend, doc_base, kdoc = _dkdv_query_range(QPOS, ORDERED, DOC, DOC_OK, b, stride_docb, offs_n,
                                                            col_ok, pid_n, Sq, Sk, BLOCK_M, BLOCK_N, HAS_DOC)
    ka = _load_tile(K + b * stride_kb + g * stride_kh, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, True)
    kb = _load_tile(K + b * stride_kb + (g + KV_HALF) * stride_kh, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, True)
    va = _load_tile(V + b * stride_vb + g * stride_vh, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, True)
    vb = _load_tile(V + b * stride_vb + (g + KV_HALF) * stride_vh, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP,
                    True)
    dka = tl.zeros([BLOCK_N, DP], tl.float32)
    dkb = tl.zeros([BLOCK_N, DP], tl.float32)
    dva = tl.zeros([BLOCK_N, DP], tl.float32)
    dvb = tl.zeros([BLOCK_N, DP], tl.float32)
    col_keep = col_ok
    keep = col_ok  # read only with HAS_PAD; a defined value to pass to _dkdv_store
    if HAS_PAD:
        keep = tl.load(PAD + b * stride_pb + offs_n, mask=col_ok, other=0) != 0
        col_keep = col_keep & keep
    neg_lam = -tl.load(LAM)
    dka, dkb, dva, dvb = _dkdv_pairs(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DO, LSE, R, DQACC, QPOS, b, g, half_h,
                                     H, GROUP, Sq, stride_qb, stride_qh, stride_qm, stride_db, stride_dm, stride_dh,
                                     offs_n, col_keep, doc_base, kdoc, offs_d, lo, mid, uend, qend, qk_scale,
                                     neg_lam, HEAD_DIM, DP, BLOCK_M, DO_DK, DO_DV, DQ_ATOMIC, HAS_DOC)
    _dkdv_store(DK, DV, dka, dkb, dva, dvb, keep, b, g, kv, KV_HALF, Sk, offs_n, offs_d, scale, HEAD_DIM, DP,
                HAS_PAD, DO_DK, DO_DV)


@triton.jit
def _dq_loop(dq1, dq2, q1, q2, doa, dob, lse1, lse2, r1, r2, ka_base, kb_base, va_base, vb_base, stride_kn,
             stride_vn, pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, lo, hi, Sk, qk_scale,
             HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """dQ of both heads of a pair over key blocks [lo, hi), sharing ``dP = dO·V'ᵀ`` between them."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        ka = _load_tile(ka_base, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        kb = _load_tile(kb_base, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        va = _load_tile(va_base, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        vb = _load_tile(vb_base, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        p1 = tl.math.exp2(tl.dot(q1, tl.trans(ka)) * qk_scale - lse1[:, None])
        p2 = tl.math.exp2(tl.dot(q2, tl.trans(kb)) * qk_scale - lse2[:, None])
        p1 = _mask_keys(p1, 0.0, offs_n, qpos, pad_base, doc_base, qdoc, Sk, MASKED, HAS_PAD, HAS_DOC)
        p2 = _mask_keys(p2, 0.0, offs_n, qpos, pad_base, doc_base, qdoc, Sk, MASKED, HAS_PAD, HAS_DOC)
        dp = tl.dot(doa, tl.trans(va))
        dp = tl.dot(dob, tl.trans(vb), dp)
        dq1 = tl.dot((p1 * (dp - r1[:, None])).to(ka.dtype), ka, dq1)
        dq2 = tl.dot((p2 * (dp - r2[:, None])).to(kb.dtype), kb, dq2)
    return dq1, dq2


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, R, QPOS, PAD, DOC, DOC_OK, DQ, LAM,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_db, stride_dm, stride_dh, stride_pb, stride_docb,
                H, KV_HALF, GROUP, Sq, Sk, qk_scale, scale, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch · head pair, query block): dQ of heads i and i + H/2, ``scale · c · Σ dS K`` with
    c = 1 (first head) or −λ (second). DQ has Q's shape, contiguous. Last query block first (see _heavy_first).
    With HAS_DOC the key loop skips earlier documents as the forward does."""
    bp = tl.program_id(0)
    pid_m = _heavy_first()
    half_h = H // 2
    b = (bp // half_h).to(tl.int64)
    i = bp % half_h
    ka_h = i // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    doc_base = DOC + b * stride_docb
    row_ok, qpos, qdoc, lo, ustart, full, hi = _query_block(QPOS, doc_base, DOC_OK, offs_m, Sq, Sk, BLOCK_N,
                                                            HAS_DOC)
    q1 = _load_tile(Q + b * stride_qb + i * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    q2 = _load_tile(Q + b * stride_qb + (i + half_h) * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    do_base = DO + b * stride_db + i * stride_dh
    doa = _load_tile(do_base, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
    dob = _load_tile(do_base + HEAD_DIM, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
    lse1 = tl.load(LSE + (b * H + i) * Sq + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.load(LSE + (b * H + i + half_h) * Sq + offs_m, mask=row_ok, other=float("inf"))
    r1 = tl.load(R + (b * H + i) * Sq + offs_m, mask=row_ok, other=0.0)
    r2 = tl.load(R + (b * H + i + half_h) * Sq + offs_m, mask=row_ok, other=0.0)
    ka_base = K + b * stride_kb + ka_h * stride_kh
    kb_base = K + b * stride_kb + (ka_h + KV_HALF) * stride_kh
    va_base = V + b * stride_vb + ka_h * stride_vh
    vb_base = V + b * stride_vb + (ka_h + KV_HALF) * stride_vh
    pad_base = PAD + b * stride_pb
    dq1 = tl.zeros([BLOCK_M, DP], tl.float32)
    dq2 = tl.zeros([BLOCK_M, DP], tl.float32)
    if HAS_DOC:
        dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, doa, dob, lse1, lse2, r1, r2, ka_base, kb_base, va_base, vb_base,
                            stride_kn, stride_vn, pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, lo, ustart, Sk,
                            qk_scale, HEAD_DIM, DP, BLOCK_N, True, HAS_PAD, HAS_DOC)
    dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, doa, dob, lse1, lse2, r1, r2, ka_base, kb_base, va_base, vb_base,
                        stride_kn, stride_vn, pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, ustart, full, Sk,
                        qk_scale, HEAD_DIM, DP, BLOCK_N, False, HAS_PAD, HAS_DOC)
    dq1, dq2 = _dq_loop(dq1, dq2, q1, q2, doa, dob, lse1, lse2, r1, r2, ka_base, kb_base, va_base, vb_base,
                        stride_kn, stride_vn, pad_base, qpos, doc_base, qdoc, offs_n0, offs_d, full, hi, Sk,
                        qk_scale, HEAD_DIM, DP, BLOCK_N, True, HAS_PAD, HAS_DOC)
    _store_tile(DQ + ((b * H + i) * Sq) * HEAD_DIM, offs_m, HEAD_DIM, offs_d, Sq,
                (dq1 * scale).to(DQ.dtype.element_ty), HEAD_DIM, DP)
    _store_tile(DQ + ((b * H + i + half_h) * Sq) * HEAD_DIM, offs_m, HEAD_DIM, offs_d, Sq,
                (dq2 * (-scale * tl.load(LAM))).to(DQ.dtype.element_ty), HEAD_DIM, DP)
