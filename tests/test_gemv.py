"""The batch-1 decode GEMV (diffllama.gemv): values against float64, routing, and the custom op's contract.

Value tests need a CUDA GPU or Triton's interpreter (on CPU tests/conftest.py turns it on for them); the routing
tests run anywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_cases import CUDA, DEVICE, INTERPRET, kernel_test
from torch import nn

from diffllama import gemv

DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float16, torch.float32]


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(37, 100), pytest.param(64, 2048, marks=[pytest.mark.slow] * INTERPRET), (130, 96)])
def test_gemv_matches_float64(n, k, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(k, generator=gen, dtype=torch.float64)
    # A weight with padded rows (row stride > K), as a slice of a larger tensor: the stride must be honoured.
    w = torch.randn(n, k + 8, generator=gen, dtype=torch.float64)[:, :k]
    expected = w @ x
    got = gemv.gemv(x.to(DEVICE, dtype), w.to(DEVICE, dtype))
    assert got.shape == (n,) and got.dtype == dtype
    # Inputs rounded to dtype; float32 sums: the error is the inputs' rounding, about 2**-8 relative for bf16.
    bound = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert ((got.double().cpu() - expected).norm() / expected.norm()).item() < bound


@kernel_test
def test_gemv_passes_opcheck():
    x = torch.randn(96, device=DEVICE, dtype=torch.float16)
    w = torch.randn(40, 96, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(gemv.gemv, (x, w))


@kernel_test
def test_linear_routes_one_row_without_grad_to_the_kernel(monkeypatch):
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda x, w: calls.append(x.shape) or real(x, w))
    sites = frozenset({"down"})
    dtype = torch.float32
    w = torch.randn(24, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, device=DEVICE, dtype=dtype)
    one = torch.randn(1, 1, 64, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        got = gemv.linear(one, w, bias, "down", sites)
        torch.testing.assert_close(got, F.linear(one, w, bias), rtol=1e-5, atol=1e-5)
        assert got.shape == (1, 1, 24) and calls == [(64,)]
        gemv.linear(one, w, None, "lm_head", sites)  # a site not chosen
        gemv.linear(torch.randn(2, 1, 64, device=DEVICE, dtype=dtype), w, None, "down", sites)  # two rows
        assert len(calls) == 1
    # A gradient is needed: F.linear, so autograd reaches the weight.
    gemv.linear(one, w, None, "down", sites).sum().backward()
    assert len(calls) == 1 and torch.allclose(w.grad, one.reshape(1, 64).expand(24, 64))


def test_call_keeps_wrapped_and_hooked_layers_as_they_are(monkeypatch):
    routed = []
    monkeypatch.setattr(gemv, "linear", lambda x, w, b, site, sites: routed.append((site, sites)) or F.linear(x, w, b))
    x = torch.randn(1, 1, 8)
    plain = nn.Linear(8, 4, bias=False)
    torch.testing.assert_close(gemv.call(plain, x, "down", frozenset({"down"})), plain(x), rtol=0, atol=0)
    assert routed == [("down", frozenset({"down"}))]

    seen = []
    hooked = nn.Linear(8, 4)
    hooked.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    gemv.call(hooked, x, "down")

    class Adapter(nn.Linear):  # e.g. a low-rank adapter: its own forward must run
        def forward(self, x):
            return super().forward(x) + 1

    adapter = Adapter(8, 4)
    torch.testing.assert_close(gemv.call(adapter, x, "down"), F.linear(x, adapter.weight, adapter.bias) + 1)
    assert len(routed) == 1 and seen == [(1, 1, 4)]


@kernel_test
def test_gemv_refuses_mismatched_inputs():
    x = torch.randn(64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(8, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"weight must be \(N, 64\)"):
        gemv.gemv(x, w[:, :32])
    with pytest.raises(ValueError, match=r"x must be a contiguous \(K,\) tensor, got shape \(1, 64\)"):
        gemv.gemv(x[None], w)
    with pytest.raises(ValueError, match="share one of bf16, fp16, float32, got torch.float16 and torch.float32"):
        gemv.gemv(x, w.float())
    # Through linear, a mismatched weight is F.linear's error, never an out-of-bounds read.
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            gemv.linear(x[None], w[:, :32], None, "qkv")
