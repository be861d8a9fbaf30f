"""The fused Triton backend against the naive two-softmax reference in float64 (:mod:`diffllama.attention.naive`):
outputs and every gradient (q, k, v, λ), at odd sizes, GQA/MQA/odd KV, padding, caches, out-of-order positions.

On a CUDA GPU every case runs (``benchmarks/gpu_tests.sh``). On CPU with Triton installed the small cases run
through Triton's interpreter (tests/conftest.py turns it on for tests marked ``triton``; fp16, since the interpreter
mishandles bf16): a few in the default run, the rest marked slow. Without Triton the module is skipped.

Bounds are relative to what this project's sdpa backend achieves in the same precision
(:func:`attention_cases.check_flash`). Every output buffer the kernels allocate starts as NaN (``poison=True``), so
an element that is never written fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_cases import (CASES, DEVICE, INTERPRET, Case, check_flash, interpreter_params, kernel_test, make_inputs,
                             run, slow_in_interpreter)

from diffllama.attention import AttentionMask, flash

# Cases small enough for the interpreter in the default run (a few seconds each on one core); the others are slow.
QUICK = {"tiny-gqa-cache-leftpad-19of37-d16", "tiny-oddkv-rightpad-29-d16", "tiny-decode-3of45-gqa-d16"}


def _params(names):
    """Each name as a test id; under the interpreter, cases too big for it are left out."""
    return interpreter_params([n for n in names if not INTERPRET or not (CASES[n].big or CASES[n].d > 128)], QUICK)


def _check_case(name, **options):
    c = CASES[name]
    dtype = torch.float16 if INTERPRET else c.dtype  # the CPU interpreter mishandles bf16
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; the seed is in any failure message
    tensors, dout, mask = make_inputs(c, torch.Generator().manual_seed(seed))
    check_flash(tensors, dout, mask, dtype, c.grad, label=f"{name} seed {seed}", **options)


@kernel_test
@pytest.mark.parametrize("name", _params(CASES))
def test_flash_matches_naive_float64(name):
    _check_case(name)


@kernel_test
@pytest.mark.parametrize("name", _params(["mha-111-d128", "gqa4-111", "left-pad-111", "cache-37of200-leftpad",
                                          "d96-77", "tiny-gqa-cache-leftpad-19of37-d16"]))
def test_flash_atomic_dq(name):
    """The same checks with dQ added by float32 atomics in the dK/dV kernel (``dq_mode="atomic"``) instead of its
    own kernel."""
    _check_case(name, dq_mode="atomic")


@kernel_test
@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("name", _params(["mha-63-d64", "gqa2-63-d128", "right-pad-111-gqa",
                                          "cache-37of200-leftpad", "tiny-gqa-cache-leftpad-19of37-d16"]))
def test_flash_backward_launch_modes(name, mode):
    """The same checks with dK/dV' from one launch (four accumulators) and from two (dK, then dV')."""
    _check_case(name, bwd_mode=mode)


@kernel_test
def test_rows_without_keys_are_zero_not_nan():
    c = Case(b=2, sq=24, d=16, padding="left")
    tensors, dout, mask = make_inputs(c, torch.Generator().manual_seed(1))
    got = run(flash.attention, tensors, dout, mask, torch.float16 if INTERPRET else torch.bfloat16, True, poison=True)
    for key, value in got.items():
        assert torch.isfinite(value).all(), key
    # Batch row 1 has 7 left-padding keys: its first 7 queries see nothing and must output exactly 0.
    assert (got["out"][1, :7] == 0).all()


def test_cpu_tensors_raise_clear_error():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the interpreter runs on CPU tensors")
    tensors, _, mask = make_inputs(Case(sq=8), torch.Generator().manual_seed(0))
    q, k, v, lam = (t.cpu().to(torch.bfloat16) for t in tensors)
    mask = AttentionMask(mask.query_positions.cpu(), None, mask.k_len)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        flash.attention(q, k, v, mask, scale=0.125, lambda_full=lam)


@kernel_test
@slow_in_interpreter
def test_training_ops_trace_under_compile_fullgraph_and_pass_opcheck():
    """The forward/backward custom ops: a compiled (fullgraph) function gives the eager values and gradients, and
    torch.library.opcheck accepts both ops (schema, fake implementation, autograd registration)."""
    c = Case(b=2, h=4, kv=2, sq=40, padding="left")
    (q, k, v, lam), dout, mask = make_inputs(c, torch.Generator().manual_seed(3))
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    leaves = [t.to(dtype) for t in (q, k, v, lam)]

    def loss(q, k, v, lam):
        out, _ = flash.attention(q, k, v, mask, scale=c.d ** -0.5, lambda_full=lam)
        return (out.float() * dout).sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, dynamic=False)):
        inputs = [t.clone().requires_grad_() for t in leaves]
        value = fn(*inputs)
        results.append([value.detach(), *torch.autograd.grad(value, inputs)])
    for got, ref in zip(*reversed(results)):
        torch.testing.assert_close(got, ref)  # the same kernels; only the loss sum may be reordered

    pad = mask.key_padding.to(torch.uint8)
    lam32 = leaves[3].float().reshape(1).requires_grad_()
    # (B, H, S, d) views of (B, S, H, d) tensors, as the model passes them: the fakes must give the real strides.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves[:3])
    docs = (torch.arange(c.sq, device=DEVICE) >= 17).to(torch.int32).expand(c.b, c.sq).contiguous()
    variant = (False, False, [16, 16], True, "atomic", "split")  # autotune, debug, blocks, poison, dQ, dK/dV'
    for doc_ids in (None, docs):  # the ops with and without packed documents
        args = (q, k, v, mask.query_positions, pad, doc_ids, lam32, c.d ** -0.5)
        torch.library.opcheck(flash._flash_attn_forward, (*args, *variant))
        with torch.no_grad():  # the backward op has no autograd formula of its own (no double backward)
            out, o2, lse = flash._flash_attn_forward(*args, *variant)
        # No input of the backward op may require grad: it has no autograd formula (no double backward).
        bwd_args = (*args[3:6], lam32.detach(), *args[7:])
        torch.library.opcheck(flash._flash_attn_backward,
                              (dout.to(dtype), *args[:3], out, o2, lse, *bwd_args, *variant))


def test_auto_picks_flash_on_cuda_for_training_and_inference(monkeypatch):
    import sys
    import types

    from diffllama.attention import resolve_implementation

    assert resolve_implementation("auto", "cpu") == "sdpa"
    assert resolve_implementation("eager", "cuda") == "eager"
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert resolve_implementation("auto", "cuda:0") == "flash"
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    assert resolve_implementation("auto", "cuda") == "sdpa"


@pytest.mark.parametrize("option, value", [("dq_mode", "dense"), ("bwd_mode", "both")])
def test_unknown_kernel_variant_is_refused_by_name(option, value):
    tensors, _, mask = make_inputs(Case(sq=8), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        flash.attention(*tensors[:3], mask, scale=0.125, lambda_full=tensors[3], **{option: value})
