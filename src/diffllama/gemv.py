"""Batch-1 matrix-vector products for decoding: a Triton GEMV as the custom op ``diffllama::gemv``.

Decoding one sequence is a chain of ``(1, K) @ (K, N)`` products whose cost is reading the weights once. With
coordinate-descent tuning, Inductor turns each into its own reduction kernel and fuses the neighbouring
elementwise work into it. That is usually the fastest form, but not for the fused q/k/v product of the 1.2B shape:
with the input RMSNorm fused in, Inductor's kernel reads its 12.6 MB at 1.5 TB/s on the H200, while the RMSNorm as
its own small kernel followed by this GEMV takes 4.9 instead of 8.4 us, and the whole decode step goes from 853 to
916 tokens/s (benchmarks/gemv.py and benchmarks/decode.py, benchmarks/RESULTS.md). :func:`linear` sends the chosen
one-row products to this kernel, which Inductor sees as an opaque op: every program streams a few whole rows of
the weight with wide loads and reduces them in float32 registers (the layout of gpt-fast's and vLLM's batch-1
GEMVs, written here from scratch).

Which products use it is the ``sites`` argument of :func:`linear` and :func:`call`, a subset of
``qkv, o, gate_up, down, lm_head``; its default is ``{"qkv"}`` (the only one that measured faster), or the debug
override ``DIFFLLAMA_GEMV`` (:mod:`diffllama.settings`). It only ever changes the kernel, never the result beyond float32
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffllama import settings

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None



if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """y[n] = Σ_k w[n, k]·x[k] for BLOCK_N rows n per program; float32 sums, one reduction at the end."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + k0 + cols)
                w = tl.load(w_ptrs + k0, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                col_ok = k0 + cols < K
                x = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0)
                w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)

    # (BLOCK_N, BLOCK_K, num_warps, num_stages): a few rows per program so that even N = 2048 gives hundreds of
    # programs, each keeping several wide loads in flight.
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in [(2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3),
                                   (8, 256, 4, 4), (8, 1024, 8, 3), (16, 256, 4, 3), (16, 512, 8, 3),
                                   (32, 256, 8, 3), (4, 512, 2, 4)]]
    _gemv_tuned = triton.autotune(_CONFIGS, key=["N", "K", "EVEN_K"])(_gemv_kernel)


@torch.library.custom_op("diffllama::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for one input row: x (K,) contiguous, weight (N, K) with unit column stride, both bf16,
    fp16 or float32 on CUDA (or CPU under ``TRITON_INTERPRET=1``) -> (N,) in x's dtype, float32 sums.

    Normally reached through :func:`linear`. Autotuned per (N, K) on first use (Triton's autotuner), so call it
    once outside CUDA graph capture first (``DecodeStep`` warms up before capturing).

    Raises:
        ValueError: x not 1-D and contiguous, weight not (N, x.shape[0]) with unit column stride, or the dtypes
            differ or are not floating point.
    """
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"gemv: x must be a contiguous (K,) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[0] or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be (N, {x.shape[0]}) with unit column stride, got shape "
                         f"{tuple(weight.shape)} and strides {weight.stride()}")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gemv: x and weight must share one of bf16, fp16, float32, got {x.dtype} and {weight.dtype}")
    n, k = weight.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    if settings.triton_interpreting():
        _gemv_kernel[(triton.cdiv(n, 4),)](x, weight, y, n, k, weight.stride(0), BLOCK_N=4, BLOCK_K=32,
                                           EVEN_K=k % 32 == 0)
    else:
        _gemv_tuned[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](x, weight, y, n, k, weight.stride(0),
                                                              EVEN_K=k % 1024 == 0)
    return y


@gemv.register_fake
def _gemv_fake(x, weight):
    return x.new_empty(weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: str,
           sites: frozenset[str] = settings.GEMV_SITES) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed by :func:`gemv` when it applies: ``site`` is in ``sites``,
    x holds one row (shape (..., K) with one row in all), weight is (N, K) with unit column stride, x, weight and
    bias are on CUDA (any device under ``TRITON_INTERPRET=1``) in one floating dtype, and no gradient is needed.
    Otherwise plain ``F.linear`` (which raises its own errors for mismatched inputs). The choice depends on shapes,
    devices, dtypes and grad mode only, so ``torch.compile`` makes it at trace time.

    Args:
        x: (..., K). weight: (N, K). bias: (N,) or None. site: which product this is, one of
            ``qkv, o, gate_up, down, lm_head``. sites: the products that use the kernel (default: see the module
            docstring).

    Returns:
        (..., N) in x's dtype.
    """
    if (site in sites and triton is not None and (x.is_cuda or settings.triton_interpreting()) and x.numel() == x.shape[-1]
            and weight.dim() == 2 and weight.shape[1] == x.shape[-1] and weight.stride(1) == 1
            and weight.device == x.device and x.dtype == weight.dtype
            and (bias is None or (bias.dtype == x.dtype and bias.shape == weight.shape[:1]))
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))):
        y = gemv(x.reshape(-1).contiguous(), weight).reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def call(module: nn.Module, x: torch.Tensor, site: str, sites: frozenset[str] = settings.GEMV_SITES) -> torch.Tensor:
    """``module(x)``, through :func:`linear` when ``module`` is a plain ``nn.Linear`` without hooks (a wrapped or
    subclassed layer, e.g. an adapter, or one with hooks, is called as it is).

    Args:
        module: the layer. x: (..., in_features). site, sites: as for :func:`linear`.

    Returns:
        (..., out_features).
    """
    if type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks:
        return linear(x, module.weight, module.bias, site, sites)
    return module(x)
