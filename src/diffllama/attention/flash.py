"""Fused differential flash attention (Triton): forward, backward and a split-key decode path.

Same contract as :func:`diffllama.attention.eager.attention`. Per head pair the forward program runs both
online softmaxes (one per query head, each over the pair's 2·head_dim wide value) and writes ``o1 − λ·o2``: 1.5×
a Llama attention's FLOPs instead of the 2× of two attention calls. The backward is the FlashAttention-2 split
(Dao, arXiv 2307.08691): a row-sum preprocess, a dK/dV' kernel over key blocks and a dQ kernel over query blocks
(or, with ``dq_mode="atomic"``, dQ added with float32 atomics by the dK/dV' kernel), with ``dO1 = dO``,
``dO2 = −λ·dO`` and ``dλ = −Σ dO·o2``. Both heads of a pair share dO and V', so their ``dP = dO·V'ᵀ`` is computed
once and ``dV' = (P1 − λ·P2)ᵀ·dO`` is one product. Ideas from FlashAttention (Dao et al., arXiv 2205.14135) and
the Differential Transformer (Ye et al., arXiv 2410.05258); the code is written for this project.

Supported: bf16 and fp16 on CUDA; head_dim up to 256 (powers of two run unpadded, others such as 96 are padded to
the next power of two in registers); GQA and MQA (an odd KV is expanded to H heads first, its gradient summed back
by autograd); any Sq and Sk; causal masking by ``mask.query_positions`` (any order; when they are non-decreasing,
as they almost always are, the backward finds each key block's first query by binary search, else it visits every
query block); key padding (left or right); packed documents (``mask.document_ids``: key blocks of earlier
documents are skipped in the forward and dQ passes, query blocks of later documents in the dK/dV' pass, so a packed
row costs about what its documents cost alone). Rows that see no key give 0.
With no gradient needed and few query rows (decode), the keys are split over several programs and combined after.

Falls back to the sdpa backend (same results, slower) for: ``dropout_p > 0``, float32/float64 inputs, head_dim
> 256. Raises ValueError for ``output_attentions=True`` (use eager) and RuntimeError for CPU tensors (the kernels
need a CUDA GPU; ``TRITON_INTERPRET=1`` runs them on CPU for development only).

Untested here: head_dim other than 32/64/96/128/256; tensors over 2^31 elements per (batch, head) slice.
"""

from __future__ import annotations

import torch

from diffllama import settings
from diffllama.attention import sdpa
from diffllama.attention.contract import AttentionMask, check_inputs, repeat_kv

try:
    import triton

    from diffllama.attention import flash_kernels as kernels
    from diffllama.attention.flash_decode import decode
except ImportError as err:  # pragma: no cover - depends on the environment
    triton = None
    _IMPORT_ERROR = err


# ---- launch configurations -----------------------------------------------------------------------------------

def _configs(kind: str, dp: int):
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind and padded head_dim."""
    if kind == "fwd":
        table = {32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
                 64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
                 128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
                 256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2)]}[dp]
    elif kind == "dkdv":  # one launch for dK and dV': four BLOCK_N x d float32 accumulators per program
        table = {32: [(64, 64, 4, 3), (64, 128, 8, 2)],
                 64: [(64, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
                 128: [(64, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3)],
                 256: [(32, 32, 4, 1), (16, 32, 4, 2)]}[dp]
    elif kind == "dk":  # split backward, dK (+ dQ atomics): two accumulators per program
        table = {32: [(64, 64, 4, 3), (64, 128, 8, 2)],
                 64: [(64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 2)],
                 128: [(64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 3)],
                 256: [(32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)]}[dp]
    elif kind == "dv":  # split backward, dV': two accumulators per program
        table = {32: [(64, 64, 4, 3), (64, 128, 8, 2)],
                 64: [(64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 4, 2)],
                 128: [(64, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 3)],
                 256: [(32, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2)]}[dp]
    else:  # dq, one head pair per program: two BLOCK_M x d accumulators
        table = {32: [(128, 64, 8, 3), (64, 64, 4, 3)],
                 64: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
                 128: [(64, 32, 4, 3), (64, 64, 4, 2), (32, 64, 4, 3), (128, 32, 8, 2)],
                 256: [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 4, 2)]}[dp]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


_TUNED: dict = {}


def _launch(kind: str, kernel, grid, dp: int, variant: tuple[bool, bool, list[int]], *args, **kwargs) -> None:
    """Run ``kernel`` with a config from ``_configs(kind, dp)``. ``variant`` is ``(autotune, debug,
    interpret_blocks)`` (see :func:`attention`): autotuned (Triton's autotuner, once per kernel, head_dim, padding
    and sequence-length bucket), or only the first candidate; under the interpreter (BLOCK_M, BLOCK_N) =
    ``interpret_blocks``. Every candidate's gradients were checked on the H200 by benchmarks/tune_flash_bwd.py."""
    autotune, debug, interpret_blocks = variant
    if settings.triton_interpreting():
        meta = {"BLOCK_M": interpret_blocks[0], "BLOCK_N": interpret_blocks[1]}
        kernel[grid(meta)](*args, **kwargs, **meta)
        return
    if not autotune:
        best = _configs(kind, dp)[0]
        compiled = kernel[grid(best.kwargs)](*args, **kwargs, **best.kwargs, num_warps=best.num_warps,
                                             num_stages=best.num_stages)
    else:
        key = (kind, dp)
        if key not in _TUNED:
            # The dK launch adds dQ into DQACC: the autotuner must zero it before each trial (and the real run).
            accumulates = kind in ("dkdv", "dk")
            _TUNED[key] = triton.autotune(_configs(kind, dp),
                                          key=["HEAD_DIM", "HAS_PAD", "HAS_DOC", "SEQ_BUCKET"]
                                          + ["DQ_ATOMIC"] * accumulates,
                                          reset_to_zero=["DQACC"] if accumulates else None)(kernel)
        compiled = _TUNED[key][grid](*args, **kwargs)
        best = _TUNED[key].best_config
    if debug:
        print(f"[flash] {kind} d{dp} pad {kwargs.get('HAS_PAD')} doc {kwargs.get('HAS_DOC')} {best} "
              f"regs {getattr(compiled, 'n_regs', '?')} "
              f"spills {getattr(compiled, 'n_spills', '?')}", flush=True)


def _seq_bucket(n: int) -> int:
    return min(1 << max(n - 1, 1).bit_length(), 16384)


# ---- the autograd function ------------------------------------------------------------------------------------

def _strides(t: torch.Tensor, dims: int = 3) -> tuple[int, ...]:
    return tuple(t.stride())[:dims]


def _doc_args(docs: torch.Tensor | None, qpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(DOC, DOC_OK, stride)`` kernel arguments. DOC_OK is one uint8 on the GPU (no sync), 1 when every row of
    ``docs`` is non-decreasing: the kernels skip blocks by document only then; unsorted ids (outside
    AttentionMask's contract) are masked block by block instead, so they stay right, only slower. Without
    documents both pointers are ``qpos`` (valid, never read: HAS_DOC is off) and nothing is launched."""
    if docs is None:
        return qpos, qpos, 0
    return docs, (docs[:, 1:] >= docs[:, :-1]).all().to(torch.uint8).reshape(1), docs.stride(0)


def _forward(q, k, v, qpos, pad, docs, lam, scale, variant, poison):
    b, h, sq, d = q.shape
    kv, sk = k.shape[1], k.shape[2]
    dp = triton.next_power_of_2(d)
    out = kernels.empty((b, sq, h // 2, 2 * d), q.dtype, q.device, poison)
    o2 = kernels.empty((b, sq, h // 2, 2 * d), q.dtype, q.device, poison)
    lse = kernels.empty((b, h, sq), torch.float32, q.device, poison)
    pad_t = pad if pad is not None else qpos  # any valid pointer; unused without HAS_PAD
    docs_t, docs_ok, docs_stride = _doc_args(docs, qpos)
    grid = lambda meta: (b * h // 2, triton.cdiv(sq, meta["BLOCK_M"]))  # noqa: E731
    _launch("fwd", kernels.attn_fwd, grid, dp, variant,
            q, k, v, out, o2, lse, qpos, pad_t, docs_t, docs_ok, lam,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), pad.stride(0) if pad is not None else 0,
            docs_stride,
            h, kv // 2, h // kv, sq, sk, scale * kernels.LOG2E, _seq_bucket(sk),
            HEAD_DIM=d, DP=dp, HAS_PAD=pad is not None, HAS_DOC=docs is not None)
    return out, o2, lse


def _bwd_split(bwd_mode: str, dp: int) -> bool:
    """Whether the backward runs dK and dV' as two launches (``bwd_mode``, see :func:`attention`)."""
    return bwd_mode == "split" or (bwd_mode == "auto" and dp > 64)


def _backward(dout, q, k, v, out, o2, lse, qpos, pad, docs, lam, scale, variant, poison, dq_mode, bwd_mode):
    b, h, sq, d = q.shape
    kv, sk = k.shape[1], k.shape[2]
    dp = triton.next_power_of_2(d)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    r = kernels.empty((b, h, sq), torch.float32, q.device, poison)
    block = 64 if not settings.triton_interpreting() else 16
    kernels.attn_bwd_pre[(triton.cdiv(sq, block), b * h // 2)](
        out, o2, dout, r, lam, *_strides(out), *_strides(dout), h, sq, HEAD_DIM=d, DP=dp, BLOCK_M=block)
    dq = kernels.empty((b, h, sq, d), q.dtype, q.device, poison)
    dk = kernels.empty((b, kv, sk, d), k.dtype, k.device, poison)
    dv = kernels.empty((b, kv, sk, d), v.dtype, v.device, poison)
    pad_t = pad if pad is not None else qpos
    docs_t, docs_ok, docs_stride = _doc_args(docs, qpos)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), pad.stride(0) if pad is not None else 0,
              docs_stride,
              h, kv // 2, h // kv, sq, sk, scale * kernels.LOG2E, scale, _seq_bucket(sk))
    meta = dict(HEAD_DIM=d, DP=dp, HAS_PAD=pad is not None, HAS_DOC=docs is not None)
    atomic = dq_mode == "atomic"
    dq_acc = torch.zeros((b, h, sq, dp) if atomic else (1,), dtype=torch.float32, device=q.device)
    # Positions out of order (a static cache written out of order) are rare but legal: checked on the GPU, no sync.
    ordered = (qpos[1:] >= qpos[:-1]).all().to(torch.uint8)
    args = (q, k, v, dout, lse, r, qpos, ordered, pad_t, docs_t, docs_ok, dk, dv, dq_acc, lam, *common)
    grid = lambda m: (b * kv // 2, triton.cdiv(sk, m["BLOCK_N"]))  # noqa: E731
    if _bwd_split(bwd_mode, dp):
        _launch("dk", kernels.attn_bwd_dkdv, grid, dp, variant, *args, DQ_ATOMIC=atomic, DO_DK=True, DO_DV=False,
                **meta)
        _launch("dv", kernels.attn_bwd_dkdv, grid, dp, variant, *args, DQ_ATOMIC=False, DO_DK=False, DO_DV=True,
                **meta)
    else:
        _launch("dkdv", kernels.attn_bwd_dkdv, grid, dp, variant, *args, DQ_ATOMIC=atomic, DO_DK=True, DO_DV=True,
                **meta)
    if atomic:
        dq.copy_(dq_acc[..., :d].mul_(scale))
    else:
        _launch("dq", kernels.attn_bwd_dq, lambda m: (b * h // 2, triton.cdiv(sq, m["BLOCK_M"])), dp, variant,
                q, k, v, dout, lse, r, qpos, pad_t, docs_t, docs_ok, dq, lam, *common, **meta)
    dlam = -r[:, h // 2:].sum()
    return dq, dk, dv, dlam


# The forward and backward are torch.library custom ops with fake implementations, joined by register_autograd, so
# that torch.compile (a compiled decoder layer, fullgraph) treats each as one opaque call instead of tracing into
# the Triton launches. The kernel variants travel as plain arguments: constants to the compiler.

@torch.library.custom_op("diffllama::flash_attn_forward", mutates_args=())
def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
                       pad: torch.Tensor | None, docs: torch.Tensor | None, lam: torch.Tensor, scale: float,
                       autotune: bool, debug: bool, interpret_blocks: list[int], poison: bool,
                       dq_mode: str, bwd_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, o2, lse)``: out = o1 − λ·o2 and the second heads' o2, both (B, Sq, H/2, 2d) in q's dtype, and the
    base-2 log-sum-exp (B, H, Sq) float32 (+inf for rows that see no key). q (B, H, Sq, d), k/v (B, KV, Sk, d)
    with KV even; qpos (Sq,) int64; pad (B, Sk) uint8 or None; docs (B, Sk) int32 contiguous (document of each
    key, :attr:`AttentionMask.document_ids`) or None; lam (1,) float32; the variants as in :func:`attention`
    (``dq_mode`` and ``bwd_mode`` are kept for the backward)."""
    return _forward(q, k, v, qpos, pad, docs, lam, scale, (autotune, debug, interpret_blocks), poison)


@_flash_attn_forward.register_fake
def _flash_attn_forward_fake(q, k, v, qpos, pad, docs, lam, scale, *variant):
    b, h, sq, d = q.shape
    out = q.new_empty((b, sq, h // 2, 2 * d))
    return out, torch.empty_like(out), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("diffllama::flash_attn_backward", mutates_args=())
def _flash_attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        o2: torch.Tensor, lse: torch.Tensor, qpos: torch.Tensor, pad: torch.Tensor | None,
                        docs: torch.Tensor | None, lam: torch.Tensor, scale: float,
                        autotune: bool, debug: bool, interpret_blocks: list[int], poison: bool,
                        dq_mode: str, bwd_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dλ)`` for :func:`_flash_attn_forward`'s inputs (dλ a 0-d float32) given dout = ∂L/∂out."""
    return _backward(dout, q, k, v, out, o2, lse, qpos, pad, docs, lam, scale, (autotune, debug, interpret_blocks),
                     poison, dq_mode, bwd_mode)


@_flash_attn_backward.register_fake
def _flash_attn_backward_fake(dout, q, k, v, out, o2, lse, qpos, pad, docs, lam, scale, *variant):
    # Contiguous like the real outputs (empty_like would copy the strides of a transposed q).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(())


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, qpos, pad, docs, lam, scale, *variant = inputs
    out, o2, lse = output
    ctx.save_for_backward(q, k, v, out, o2, lse, qpos, pad, docs, lam)
    ctx.scale, ctx.variant = scale, variant


def _flash_attn_autograd(ctx, dout, _grad_o2, _grad_lse):
    q, k, v, out, o2, lse, qpos, pad, docs, lam = ctx.saved_tensors
    dq, dk, dv, dlam = _flash_attn_backward(dout, q, k, v, out, o2, lse, qpos, pad, docs, lam, ctx.scale,
                                            *ctx.variant)
    return (dq, dk, dv, None, None, None, dlam.reshape(lam.shape)) + (None,) * (1 + len(ctx.variant))


_flash_attn_forward.register_autograd(_flash_attn_autograd, setup_context=_setup_context)


def _check_runnable(query, key, value, mask: AttentionMask) -> None:
    """The shared contract, one dtype, and a device and Triton to run on; errors as :func:`attention`."""
    check_inputs(query, key, value, mask)
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key, value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if query.device.type != "cuda" and not settings.triton_interpreting():
        raise RuntimeError(f"attn_implementation='flash' needs a CUDA GPU (got {query.device.type} tensors); "
                           "use 'sdpa' or 'auto'")
    if triton is None:
        raise RuntimeError(f"attn_implementation='flash' needs Triton: {_IMPORT_ERROR}")


def _kernel_inputs(query, key, value, mask: AttentionMask):
    """``(q, k, v, qpos, pad, docs)`` as the kernels take them: an odd KV expanded to H heads (autograd sums the
    gradient back), the last dimension contiguous, positions int64, padding uint8, documents int32."""
    h, kv = query.shape[1], key.shape[1]
    if kv % 2:  # odd KV (MQA too): the kernels pair key heads ka and ka + KV/2
        key, value = repeat_kv(key, h // kv), repeat_kv(value, h // kv)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    qpos = mask.query_positions.to(device=query.device, dtype=torch.int64).contiguous()
    pad = mask.key_padding
    if pad is not None:
        pad = pad.to(device=query.device, dtype=torch.uint8).contiguous()  # a copy: Inductor cannot lower bool.view(uint8)
    docs = mask.document_ids
    if docs is not None:
        docs = docs.to(device=query.device, dtype=torch.int32).contiguous()
    return query, key, value, qpos, pad, docs


# ---- the public function --------------------------------------------------------------------------------------

def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask, *, scale: float,
              lambda_full: torch.Tensor, dropout_p: float = 0.0, output_attentions: bool = False,
              dq_mode: str = settings.FLASH_DQ_MODE, bwd_mode: str = settings.FLASH_BWD_MODE,
              autotune: bool = settings.FLASH_AUTOTUNE, debug: bool = settings.FLASH_DEBUG, poison: bool = False,
              interpret_blocks: tuple[int, int] = (16, 16)) -> tuple[torch.Tensor, None]:
    """Same contract as :func:`diffllama.attention.eager.attention`; never returns probabilities.

    The kernel variants (defaults: :mod:`diffllama.settings`, where ``DIFFLLAMA_FLASH_*`` may override them for
    debugging) only change speed, never the result beyond rounding:

    Args:
        dq_mode: how the backward gets dQ: ``"kernel"``, a separate dQ kernel that recomputes the scores
            (deterministic; the faster form on the H200 at head_dim 128, and at 64 for S >= 2048,
            benchmarks/RESULTS.md), or ``"atomic"``, added by the dK/dV' kernel with float32 atomics.
        bwd_mode: how dK/dV' are launched: ``"fused"`` (one kernel, four accumulators per program), ``"split"``
            (one kernel for dK (+ dQ atomics), one for dV', P computed twice), ``"auto"`` (split above
            head_dim 64).
        autotune: autotune each kernel (Triton's autotuner), or take each kernel's first candidate configuration.
        debug: print each kernel's chosen configuration, registers and spills.
        poison: start every output buffer as NaN, so an element a kernel never writes shows (tests).
        interpret_blocks: (BLOCK_M, BLOCK_N) under Triton's interpreter (tests set unequal ones, as the GPU
            configurations have); ignored on the GPU.

    Raises:
        ValueError: for ``output_attentions=True``, query/key/value of different dtypes, an unknown ``dq_mode`` or
            ``bwd_mode``, or shapes that break the shared contract (:func:`diffllama.attention.check_inputs`,
            which also raises TypeError for a mask of the wrong dtypes).
        RuntimeError: for CPU tensors (flash needs a CUDA GPU), or when Triton is not installed.
    """
    if output_attentions:
        raise ValueError("output_attentions=True needs attn_implementation='eager'; flash has no probabilities")
    for name, got, allowed in (("dq_mode", dq_mode, settings.FLASH_DQ_MODES),
                               ("bwd_mode", bwd_mode, settings.FLASH_BWD_MODES)):
        if got not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {got!r}")
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # Under autocast RoPE leaves q and k in float32 while v is bf16; run the kernel in the autocast dtype,
        # as SDPA does.
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    _check_runnable(query, key, value, mask)
    d = query.shape[-1]
    if dropout_p > 0.0 or query.dtype not in (torch.bfloat16, torch.float16) or d > 256:
        # documented fallback: same function, unfused
        return sdpa.attention(query, key, value, mask, scale=scale, lambda_full=lambda_full, dropout_p=dropout_p)

    query, key, value, qpos, pad, docs = _kernel_inputs(query, key, value, mask)
    lambda_full = lambda_full.reshape(())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, lambda_full))
    # decode: a custom op, so compiled and CUDA-graphed steps use it. It has no document mask (packed documents
    # come without caches), so a short packed row without gradients takes the full forward instead.
    if not needs_grad and query.shape[2] <= 64 and docs is None:
        return decode(query, key, value, qpos, pad, lambda_full, scale, poison=poison), None
    lam = lambda_full.to(torch.float32).reshape(1)  # differentiable: dλ flows back to lambda_full's dtype
    return _flash_attn_forward(query, key, value, qpos, pad, docs, lam, float(scale), autotune, debug,
                               list(interpret_blocks), poison, dq_mode, bwd_mode)[0], None
