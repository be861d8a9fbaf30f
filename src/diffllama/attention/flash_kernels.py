"""Triton kernels for fused differential flash attention (forward, split-key decode, backward).

Layouts (all strides passed explicitly; the last dimension must be contiguous):
    Q (B, H, Sq, d), K and V (B, KV, Sk, d) with an even KV (the launcher expands an odd KV to H heads),
    Out and O2 (B, Sq, H/2, 2d), LSE and R (B, H, Sq) float32, QPOS (Sq,) int64, PAD (B, Sk) uint8 (1 = real key).

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

import triton
import triton.language as tl


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
def _key_bounds(qpos, row_ok, Sk, BLOCK_N: tl.constexpr):
    """For a query block: ``hi`` = keys any row may see; ``full`` = keys (whole blocks) every row sees."""
    qmax = tl.max(tl.where(row_ok, qpos, -1), 0)
    qmin = tl.min(tl.where(row_ok, qpos, 2147483647), 0)
    hi = tl.minimum(qmax + 1, Sk).to(tl.int32)
    full = (tl.minimum(qmin + 1, Sk) // BLOCK_N * BLOCK_N).to(tl.int32)
    full = tl.minimum(full, hi)
    return full, hi


@triton.jit
def _mask_keys(x, FILL: tl.constexpr, offs_n, qpos, pad_base, Sk, MASKED: tl.constexpr, HAS_PAD: tl.constexpr):
    """``x`` (BM, BN) with ``FILL`` where a query may not see a key: a later position or past Sk (MASKED blocks
    only) and padding (HAS_PAD). Unmasked blocks without padding pass through untouched."""
    if MASKED:
        ok = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] < Sk)
        if HAS_PAD:
            keep = tl.load(pad_base + offs_n, mask=offs_n < Sk, other=0) != 0
            ok = ok & keep[None, :]
        x = tl.where(ok, x, FILL)
    else:
        if HAS_PAD:
            keep = tl.load(pad_base + offs_n) != 0
            x = tl.where(keep[None, :], x, FILL)
    return x


@triton.jit
def _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos,
              offs_n0, offs_d, lo, hi, Sk, qk_scale,
              HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_PAD: tl.constexpr):
    """Online softmax over key blocks [lo, hi) for one query head: both halves of the 2d-wide value."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, MASKED)  # (BN, DP)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BM, BN), base-2 logits
        s = _mask_keys(s, float("-inf"), offs_n, qpos, pad_base, Sk, MASKED, HAS_PAD)
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
def _fwd_head(q, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos, offs_n0, offs_d,
              lo, full, hi, Sk, qk_scale,
              HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_PAD: tl.constexpr):
    """One query head over keys [lo, hi): unmasked blocks up to ``full``, then masked ones. Returns the
    normalised halves of the output and the base-2 LSE (+inf for rows with no key, -inf never)."""
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DP], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DP], tl.float32)
    acc_a, acc_b, m_i, l_i = _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn, stride_vn,
                                       pad_base, qpos, offs_n0, offs_d, lo, full, Sk, qk_scale,
                                       HEAD_DIM, DP, BLOCK_N, False, HAS_PAD)
    acc_a, acc_b, m_i, l_i = _fwd_loop(acc_a, acc_b, m_i, l_i, q, k_base, va_base, vb_base, stride_kn, stride_vn,
                                       pad_base, qpos, offs_n0, offs_d, tl.maximum(full, lo), hi, Sk, qk_scale,
                                       HEAD_DIM, DP, BLOCK_N, True, HAS_PAD)
    seen = l_i > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    return acc_a * inv[:, None], acc_b * inv[:, None], lse


@triton.jit
def attn_fwd(Q, K, V, Out, O2, LSE, QPOS, PAD, LAM,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
             stride_ob, stride_om, stride_oh, stride_pb,
             H, KV_HALF, GROUP, Sq, Sk, qk_scale, SEQ_BUCKET,
             HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, batch · head pair): head i + H/2 first (o2 saved for the backward), then
    head i, and the epilogue writes ``o1 − λ·o2``."""
    pid_m = tl.program_id(0)
    bp = tl.program_id(1)
    half_h = H // 2
    b = (bp // half_h).to(tl.int64)
    i = bp % half_h
    ka = i // GROUP
    kb = ka + KV_HALF
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    row_ok = offs_m < Sq
    qpos = tl.load(QPOS + offs_m, mask=row_ok, other=0)
    full, hi = _key_bounds(qpos, row_ok, Sk, BLOCK_N)
    pad_base = PAD + b * stride_pb
    va_base = V + b * stride_vb + ka * stride_vh
    vb_base = V + b * stride_vb + kb * stride_vh
    o_rows = b * stride_ob + i * stride_oh

    # Second head of the pair: o2, kept for the backward (and re-read just below).
    q = _load_tile(Q + b * stride_qb + (i + half_h) * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    o2a, o2b, lse2 = _fwd_head(q, K + b * stride_kb + kb * stride_kh, va_base, vb_base, stride_kn, stride_vn,
                               pad_base, qpos, offs_n0, offs_d, 0, full, hi, Sk, qk_scale,
                               HEAD_DIM, DP, BLOCK_M, BLOCK_N, HAS_PAD)
    _store_tile(O2 + o_rows, offs_m, stride_om, offs_d, Sq, o2a.to(O2.dtype.element_ty), HEAD_DIM, DP)
    _store_tile(O2 + o_rows + HEAD_DIM, offs_m, stride_om, offs_d, Sq, o2b.to(O2.dtype.element_ty), HEAD_DIM, DP)
    tl.store(LSE + (b * H + i + half_h) * Sq + offs_m, lse2, mask=row_ok)

    # First head, then the differential combination with the rounded o2 (the backward sees the same o2).
    q = _load_tile(Q + b * stride_qb + i * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    o1a, o1b, lse1 = _fwd_head(q, K + b * stride_kb + ka * stride_kh, va_base, vb_base, stride_kn, stride_vn,
                               pad_base, qpos, offs_n0, offs_d, 0, full, hi, Sk, qk_scale,
                               HEAD_DIM, DP, BLOCK_M, BLOCK_N, HAS_PAD)
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
                            PAD + b * stride_pb, qpos, offs_n0, offs_d, lo, lo, hi, Sk, qk_scale,
                            HEAD_DIM, DP, BLOCK_M, BLOCK_N, HAS_PAD)
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
def _first_query(QPOS, Sq, target):
    """Smallest row index whose position is >= target (QPOS non-decreasing); Sq if none."""
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + Sq
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(QPOS + mid) < target
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _dkdv_loop(dk, dva, dvb, k, va, vb, q_base, do_base, lse_base, r_base, dq_base, QPOS, offs_n, col_keep, offs_d,
               stride_qm, stride_dm, lo, hi, Sq, qk_scale, c,
               HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               SCALED: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Accumulate one query head's contribution over query rows [lo, hi) into dK (this head's key head) and dV'.
    Works on transposed scores (BN, BM) so the accumulators stay key-major. With DQ_ATOMIC, also adds this key
    block's share of dQ/scale (c·dS·K) into the float32 (rows, DP) buffer at ``dq_base`` (relaxed atomics)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        q = _load_tile(q_base, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
        doa = _load_tile(do_base, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
        dob = _load_tile(do_base + HEAD_DIM, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        r = tl.load(r_base + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BN, BM)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            qp = tl.load(QPOS + offs_m, mask=row_ok, other=-1)
            p_t = tl.where(offs_n[:, None] <= qp[None, :], p_t, 0.0)
        if DQ_ATOMIC:  # padding and out-of-range keys must not reach dQ (their own dK/dV rows are zeroed later)
            p_t = tl.where(col_keep[:, None], p_t, 0.0)
        dp_t = tl.dot(va, tl.trans(doa))
        dp_t = tl.dot(vb, tl.trans(dob), dp_t)
        ds_t = p_t * (dp_t - r[None, :])
        if SCALED:
            p_t = p_t * c
            ds_t = ds_t * c
        p16 = p_t.to(q.dtype)
        dva = tl.dot(p16, doa, dva)
        dvb = tl.dot(p16, dob, dvb)
        ds16 = ds_t.to(q.dtype)
        dk = tl.dot(ds16, q, dk)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(ds16), k)  # (BM, DP)
            tl.atomic_add(dq_base + offs_m[:, None] * DP + offs_d[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
    return dk, dva, dvb


@triton.jit
def _dkdv_head(dk, dva, dvb, k, va, vb, q_base, do_base, lse_base, r_base, dq_base, QPOS, offs_n, col_keep, offs_d,
               stride_qm, stride_dm, lo, full, Sq, qk_scale, c,
               HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, SCALED: tl.constexpr,
               DQ_ATOMIC: tl.constexpr):
    # Rows [lo, full) may see only part of the key block; rows from there on see all of it.
    n_masked = tl.cdiv(full - lo, BLOCK_M)
    mid = lo + n_masked * BLOCK_M
    dk, dva, dvb = _dkdv_loop(dk, dva, dvb, k, va, vb, q_base, do_base, lse_base, r_base, dq_base, QPOS, offs_n,
                              col_keep, offs_d, stride_qm, stride_dm, lo, mid, Sq, qk_scale, c, HEAD_DIM, DP, BLOCK_M, True,
                              SCALED, DQ_ATOMIC)
    dk, dva, dvb = _dkdv_loop(dk, dva, dvb, k, va, vb, q_base, do_base, lse_base, r_base, dq_base, QPOS, offs_n,
                              col_keep, offs_d, stride_qm, stride_dm, mid, Sq, Sq, qk_scale, c, HEAD_DIM, DP, BLOCK_M, False,
                              SCALED, DQ_ATOMIC)
    return dk, dva, dvb


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, R, QPOS, PAD, DK, DV, DQACC, LAM,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_db, stride_dm, stride_dh, stride_pb,
                  H, KV_HALF, GROUP, Sq, Sk, qk_scale, scale, SEQ_BUCKET,
                  HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key block, batch · g), g < KV/2: dK of key heads g and g + KV/2, dV of value heads g and
    g + KV/2, summed over the 2G query heads that use them. DK and DV have K's and V's shapes, contiguous.
    With DQ_ATOMIC, dQ/scale is accumulated too, into DQACC (B, H, Sq, DP) float32, zeroed by the caller."""
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // KV_HALF).to(tl.int64)
    g = bg % KV_HALF
    half_h = H // 2
    kv = 2 * KV_HALF
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    col_ok = offs_n < Sk
    lo = _first_query(QPOS, Sq, pid_n * BLOCK_N)
    full = tl.maximum(_first_query(QPOS, Sq, pid_n * BLOCK_N + BLOCK_N - 1), lo)
    va = _load_tile(V + b * stride_vb + g * stride_vh, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, True)
    vb = _load_tile(V + b * stride_vb + (g + KV_HALF) * stride_vh, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP,
                    True)
    dva = tl.zeros([BLOCK_N, DP], tl.float32)
    dvb = tl.zeros([BLOCK_N, DP], tl.float32)
    col_keep = col_ok
    if HAS_PAD:
        keep = tl.load(PAD + b * stride_pb + offs_n, mask=col_ok, other=0) != 0
        col_keep = col_keep & keep
    neg_lam = -tl.load(LAM)

    # Heads g·G .. g·G+G-1 read K[g]; heads H/2 + the same read K[g + KV/2]; all of them read V' = [V[g], V[g+KV/2]].
    k = _load_tile(K + b * stride_kb + g * stride_kh, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, True)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    for jj in range(0, GROUP):
        pair = g * GROUP + jj
        dk, dva, dvb = _dkdv_head(dk, dva, dvb, k, va, vb, Q + b * stride_qb + pair * stride_qh,
                                  DO + b * stride_db + pair * stride_dh, LSE + (b * H + pair) * Sq,
                                  R + (b * H + pair) * Sq, DQACC + (b * H + pair) * Sq * DP, QPOS, offs_n, col_keep, offs_d,
                                  stride_qm, stride_dm, lo, full, Sq, qk_scale, 1.0, HEAD_DIM, DP, BLOCK_M, False,
                                  DQ_ATOMIC)
    dk = dk * scale
    if HAS_PAD:
        dk = tl.where(keep[:, None], dk, 0.0)
    _store_tile(DK + ((b * kv + g) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk, dk.to(DK.dtype.element_ty),
                HEAD_DIM, DP)

    k = _load_tile(K + b * stride_kb + (g + KV_HALF) * stride_kh, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, True)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    for jj in range(0, GROUP):
        pair = g * GROUP + jj
        dk, dva, dvb = _dkdv_head(dk, dva, dvb, k, va, vb, Q + b * stride_qb + (pair + half_h) * stride_qh,
                                  DO + b * stride_db + pair * stride_dh, LSE + (b * H + pair + half_h) * Sq,
                                  R + (b * H + pair + half_h) * Sq, DQACC + (b * H + pair + half_h) * Sq * DP, QPOS,
                                  offs_n, col_keep, offs_d, stride_qm, stride_dm, lo, full, Sq, qk_scale, neg_lam, HEAD_DIM, DP,
                                  BLOCK_M, True, DQ_ATOMIC)
    dk = dk * scale
    if HAS_PAD:
        dk = tl.where(keep[:, None], dk, 0.0)
        dva = tl.where(keep[:, None], dva, 0.0)
        dvb = tl.where(keep[:, None], dvb, 0.0)
    _store_tile(DK + ((b * kv + g + KV_HALF) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk,
                dk.to(DK.dtype.element_ty), HEAD_DIM, DP)
    _store_tile(DV + ((b * kv + g) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk, dva.to(DV.dtype.element_ty),
                HEAD_DIM, DP)
    _store_tile(DV + ((b * kv + g + KV_HALF) * Sk) * HEAD_DIM, offs_n, HEAD_DIM, offs_d, Sk,
                dvb.to(DV.dtype.element_ty), HEAD_DIM, DP)


@triton.jit
def _dq_loop(dq, q, doa, dob, lse, r, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos,
             offs_n0, offs_d, lo, hi, Sk, qk_scale,
             HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             HAS_PAD: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, stride_kn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        va = _load_tile(va_base, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        vb = _load_tile(vb_base, offs_n, stride_vn, offs_d, Sk, HEAD_DIM, DP, MASKED)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = _mask_keys(p, 0.0, offs_n, qpos, pad_base, Sk, MASKED, HAS_PAD)
        dp = tl.dot(doa, tl.trans(va))
        dp = tl.dot(dob, tl.trans(vb), dp)
        ds = p * (dp - r[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, R, QPOS, PAD, DQ, LAM,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_db, stride_dm, stride_dh, stride_pb,
                H, KV_HALF, GROUP, Sq, Sk, qk_scale, scale, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, batch · head): dQ = scale · c · Σ dS K, c = 1 (first head) or −λ (second).
    DQ has Q's shape, contiguous."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
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
    full, hi = _key_bounds(qpos, row_ok, Sk, BLOCK_N)
    q = _load_tile(Q + b * stride_qb + j * stride_qh, offs_m, stride_qm, offs_d, Sq, HEAD_DIM, DP, True)
    do_base = DO + b * stride_db + pair * stride_dh
    doa = _load_tile(do_base, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
    dob = _load_tile(do_base + HEAD_DIM, offs_m, stride_dm, offs_d, Sq, HEAD_DIM, DP, True)
    lse = tl.load(LSE + (b * H + j) * Sq + offs_m, mask=row_ok, other=float("inf"))
    r = tl.load(R + (b * H + j) * Sq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + (j // GROUP) * stride_kh
    va_base = V + b * stride_vb + va_h * stride_vh
    vb_base = V + b * stride_vb + (va_h + KV_HALF) * stride_vh
    pad_base = PAD + b * stride_pb
    dq = tl.zeros([BLOCK_M, DP], tl.float32)
    dq = _dq_loop(dq, q, doa, dob, lse, r, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos,
                  offs_n0, offs_d, 0, full, Sk, qk_scale, HEAD_DIM, DP, BLOCK_N, False, HAS_PAD)
    dq = _dq_loop(dq, q, doa, dob, lse, r, k_base, va_base, vb_base, stride_kn, stride_vn, pad_base, qpos,
                  offs_n0, offs_d, full, hi, Sk, qk_scale, HEAD_DIM, DP, BLOCK_N, True, HAS_PAD)
    c = tl.where(j >= half_h, -tl.load(LAM), 1.0)
    dq = dq * (scale * c)
    _store_tile(DQ + ((b * H + j) * Sq) * HEAD_DIM, offs_m, HEAD_DIM, offs_d, Sq, dq.to(DQ.dtype.element_ty),
                HEAD_DIM, DP)
