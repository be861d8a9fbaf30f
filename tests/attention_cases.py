"""Shared attention test cases and checks: inputs for every mask family, a runner that collects the output and all
gradients (q, k, v, λ), and the flash check against the naive two-softmax reference
(:mod:`diffllama.attention.naive`) in float64, bounded relative to this project's sdpa backend in the same precision.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

from diffllama.attention import AttentionMask, naive, sdpa

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Triton's interpreter (CPU): on when tests/conftest.py turned it on for this test (marker ``triton``) or by hand.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernel_test(test):
    """Mark ``test`` as one that runs the Triton kernels (markers ``gpu`` and ``triton``), skipped without Triton
    or without both a GPU and the interpreter."""
    skip = pytest.mark.skipif(not HAS_TRITON or not (CUDA or INTERPRET),
                              reason="needs Triton and a CUDA GPU (or Triton's interpreter)")
    return pytest.mark.gpu(pytest.mark.triton(skip(test)))


def slow_in_interpreter(test):
    """Mark ``test`` slow under Triton's interpreter (it stays in the default run on a GPU)."""
    return pytest.mark.slow(test) if INTERPRET else test


def interpreter_params(names, quick=()) -> list:
    """``names`` as pytest parameters; under Triton's interpreter only those in ``quick`` stay in the default run,
    the others are marked slow (a few seconds each on one core)."""
    return [pytest.param(n, marks=[pytest.mark.slow] * (INTERPRET and n not in quick)) for n in names]


@dataclass
class Case:
    b: int = 2
    h: int = 4
    kv: int = 4
    sq: int = 63
    sk: int | None = None  # keys (cache + new); default sq
    d: int = 64
    padding: str | None = None  # "left" | "right" | "empty" (one batch row all padding)
    start: int | None = None  # first query position; default sk - sq (decode/cache); static caches give less
    dtype: torch.dtype = torch.bfloat16
    order: str | None = None  # query positions "rotated" (last third first) or "reversed"; default increasing
    grad: bool = True
    big: bool = False  # too slow for the interpreter
    documents: tuple[tuple[int, ...], ...] | None = None  # packed rows: document lengths per row (sum = sk = sq)


CASES = {
    "mha-63-d64": Case(),
    "mha-111-d128": Case(sq=111, d=128),
    "mha-1000-d128": Case(b=1, sq=1000, d=128, big=True),
    "mha-1000-d64": Case(b=1, h=2, kv=2, sq=1000, d=64, big=True),
    "gqa4-111": Case(h=8, kv=2, sq=111),
    "gqa2-63-d128": Case(h=8, kv=4, sq=63, d=128),
    "mqa-63": Case(h=8, kv=1, sq=63),
    "oddkv3-47": Case(h=6, kv=3, sq=47),
    "left-pad-111": Case(b=3, sq=111, padding="left"),
    "right-pad-111-gqa": Case(b=3, h=8, kv=2, sq=111, padding="right"),
    "empty-row-33": Case(b=2, sq=33, padding="empty"),
    "cache-37of200": Case(sq=37, sk=200),
    "cache-37of200-leftpad": Case(b=3, sq=37, sk=200, padding="left"),
    "static-cache-20at100of300": Case(sq=20, sk=300, start=100),
    "decode-1of1000": Case(sq=1, sk=1000, grad=False),
    "decode-4of513-gqa": Case(h=8, kv=2, sq=4, sk=513, grad=False, padding="left"),
    "decode-1of300-grad": Case(sq=1, sk=300),
    "fp16-111": Case(sq=111, dtype=torch.float16),
    "d32-77": Case(sq=77, d=32),
    "d96-77": Case(sq=77, d=96),
    "d256-65": Case(b=1, sq=65, d=256),
    "rotated-positions-48": Case(sq=48, order="rotated"),  # a static cache written out of order
    "reversed-positions-40-gqa": Case(h=8, kv=2, sq=40, order="reversed"),
    "long-4096-d128": Case(b=1, h=4, kv=2, sq=4096, d=128, big=True),
    # tiny heads: quick enough for Triton's interpreter in the default CPU run
    "tiny-gqa-cache-leftpad-19of37-d16": Case(b=2, h=4, kv=2, sq=19, sk=37, d=16, padding="left"),
    "tiny-oddkv-rightpad-29-d16": Case(b=2, h=6, kv=3, sq=29, d=16, padding="right"),
    "tiny-decode-3of45-gqa-d16": Case(b=2, h=4, kv=2, sq=3, sk=45, d=16, grad=False),
    "packed-3docs-53-d32": Case(b=2, h=2, kv=2, sq=53, d=32, documents=((5, 37, 11), (20, 20, 13))),
    "packed-gqa-45-leftpad": Case(b=2, h=4, kv=2, sq=45, d=16, padding="left", documents=((16, 16, 13), (1, 43, 1))),
}


def document_ids(lengths_per_row) -> torch.Tensor:
    """(B, S) int32 document ids from each row's document lengths (each row's lengths sum to S)."""
    rows = [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row]
    return torch.stack(rows).to(torch.int32)


def make_inputs(c: Case, gen: torch.Generator):
    """``((q, k, v, λ), dout, mask)`` in float64 on DEVICE for case ``c``: q (B, H, Sq, d), k/v (B, KV, Sk, d),
    λ 0-d in [0.1, 0.9), dout (B, Sq, H/2, 2d). Rows 1, 2, ... of a padded batch lose 7, Sk/3, 0, ... keys (all of
    them for "empty")."""
    sk = c.sk or c.sq
    start = sk - c.sq if c.start is None else c.start
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    q, k, v = mk(c.b, c.h, c.sq, c.d), mk(c.b, c.kv, sk, c.d), mk(c.b, c.kv, sk, c.d)
    lam = torch.rand((), generator=gen, dtype=torch.float64).to(DEVICE) * 0.8 + 0.1
    dout = mk(c.b, c.sq, c.h // 2, 2 * c.d)
    pad = None
    if c.padding:
        pad = torch.ones(c.b, sk, dtype=torch.bool)
        for row in range(1, c.b):
            n = [0, 7, sk // 3][row % 3] if c.padding != "empty" else sk
            if c.padding == "right":
                pad[row, sk - n:] = False
            else:
                pad[row, :n] = False
        pad = pad.to(DEVICE)
    positions = torch.arange(start, start + c.sq, device=DEVICE)
    if c.order == "rotated":
        positions = positions.roll(c.sq // 3)
    elif c.order == "reversed":
        positions = positions.flip(0)
    docs = document_ids(c.documents).to(DEVICE) if c.documents else None
    mask = AttentionMask(query_positions=positions, key_padding=pad, k_len=sk, document_ids=docs,
                         plain_causal=pad is None and docs is None and sk == c.sq and start == 0 and c.order is None)
    return (q, k, v, lam), dout, mask


def run(backend, tensors, dout, mask, dtype, grad: bool, **options) -> dict[str, torch.Tensor]:
    """``backend``'s output and, with ``grad``, its gradients dq, dk, dv, dλ (for ``out.backward(dout)``), computed
    on copies of ``tensors`` cast to ``dtype``; ``options`` are passed to the backend (flash's kernel variants)."""
    leaves = [t.detach().to(dtype).requires_grad_(grad) for t in tensors]
    q, k, v, lam = leaves
    with torch.set_grad_enabled(grad):
        out, _ = backend(q, k, v, mask, scale=q.shape[-1] ** -0.5, lambda_full=lam, **options)
    results = {"out": out.detach()}
    if grad:
        out.backward(dout.to(dtype))
        results.update(dq=q.grad, dk=k.grad, dv=v.grad, dlam=lam.grad.reshape(1))
    return results


def rel(x: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """``‖x − ref‖ / ‖ref‖`` (or ``/ scale``) in float64; inf when x holds a NaN or an infinity."""
    x = x.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / (scale if scale is not None else ref.norm().clamp_min(1e-30))).item()


def dlam_scale(tensors, dout, mask, ref_out: torch.Tensor) -> float:
    """The scale of dλ = −Σ dO·o2's rounding errors: the root-sum-square of its terms (o2 = (o1 − out) / λ, with o1
    from a λ = 0 call). dλ is one number, often a large cancelling sum: measured against ‖dλ‖ its error means
    little."""
    q, k, v, lam = tensors
    o1, _ = naive.attention(q, k, v, mask, scale=q.shape[-1] ** -0.5, lambda_full=torch.zeros_like(lam))
    return (dout * (o1 - ref_out) / lam).norm().item()


def check_flash(tensors, dout, mask, dtype, grad: bool = True, label: str = "", **options) -> dict:
    """The flash backend (every buffer poisoned with NaN first) against the naive reference in float64, output and
    all gradients: ``‖flash − ref‖ / ‖ref‖ <= 2·(the same for sdpa in dtype) + 2e-3`` and under 2e-2 outright (dλ:
    under 2e-2 of :func:`dlam_scale`; sdpa's own dλ error ranged from 1e-4 to 1.4e-2 over seeds on the H200).
    Returns flash's results; prints one line of errors."""
    from diffllama.attention import flash

    ref = run(naive.attention, tensors, dout, mask, torch.float64, grad)
    base = run(sdpa.attention, tensors, dout, mask, dtype, grad)
    got = run(flash.attention, tensors, dout, mask, dtype, grad, poison=True, **options)
    scales = {"dlam": dlam_scale(tensors, dout, mask, ref["out"])} if grad else {}
    report = []
    for key in ref:
        err, err_base = rel(got[key], ref[key], scales.get(key)), rel(base[key], ref[key], scales.get(key))
        report.append(f"{key}: flash {err:.2e} sdpa {err_base:.2e}")
        bound = 2e-2 if key == "dlam" else min(2 * err_base + 2e-3, 2e-2)
        assert err <= bound, f"{label} {key}: flash {err:.3e} vs sdpa {err_base:.3e}"
    print(label, "; ".join(report))
    return got
