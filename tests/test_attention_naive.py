"""The eager and sdpa backends against the naive two-softmax reference (:mod:`diffllama.attention.naive`): output
and every gradient (q, k, v, λ) in float64 on CPU, over the shared cases of tests/attention_cases.py (odd sizes,
GQA/MQA/odd KV, left/right padding, caches with Sq < Sk, out-of-order positions, packed documents); and the
reference itself on hand-computed values.
"""

from __future__ import annotations

import math

import pytest
import torch
from attention_cases import CASES, make_inputs, rel, run

from diffllama.attention import AttentionMask, eager, naive, sdpa

# Small enough for float64 on CPU in well under a second each.
CPU_CASES = [n for n, c in CASES.items() if not c.big and c.sk in (None, 200, 300) and c.d <= 128]


@pytest.mark.parametrize("backend", [eager.attention, sdpa.attention], ids=["eager", "sdpa"])
@pytest.mark.parametrize("name", CPU_CASES)
def test_backend_matches_naive_reference_in_float64(name, backend):
    c = CASES[name]
    tensors, dout, mask = make_inputs(c, torch.Generator().manual_seed(len(name)))
    ref = run(naive.attention, tensors, dout, mask, torch.float64, c.grad)
    got = run(backend, tensors, dout, mask, torch.float64, c.grad)
    assert got.keys() == ref.keys() == ({"out", "dq", "dk", "dv", "dlam"} if c.grad else {"out"})
    for key, value in ref.items():
        assert got[key].shape == value.shape, key
        assert rel(got[key], value) < 1e-12, f"{name} {key}: {rel(got[key], value):.2e}"


def test_naive_reference_on_hand_computed_values():
    """One head pair, one KV head, two keys: softmax weights and o1 − λ·o2 written out by hand."""
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]], dtype=torch.float64)  # (B=1, H=2, Sq=1, d=2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # (1, KV=1, Sk=2, 2)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    mask = AttentionMask(torch.tensor([1]), None, 2)
    out, probs = naive.attention(q, k, v, mask, scale=1.0, lambda_full=torch.tensor(0.5, dtype=torch.float64),
                                 output_attentions=True)
    p1 = torch.tensor([math.e, 1.0], dtype=torch.float64) / (math.e + 1)  # scores (1, 0)
    p2 = torch.tensor([1.0, math.e ** 2], dtype=torch.float64) / (1 + math.e ** 2)  # scores (0, 2)
    paired = torch.cat((v[0, 0], v[0, 0]), -1)  # both heads read KV head 0: value [v, v], (2, 4)
    assert out.shape == (1, 1, 1, 4) and probs.shape == (1, 2, 1, 2)
    torch.testing.assert_close(out[0, 0, 0], (p1 - 0.5 * p2) @ paired, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs[0, :, 0], torch.stack((p1, p2)), rtol=1e-12, atol=1e-12)


def test_naive_reference_probabilities_match_eager():
    tensors, _, mask = make_inputs(CASES["gqa4-111"], torch.Generator().manual_seed(0))
    q, k, v, lam = tensors
    _, expected = eager.attention(q, k, v, mask, scale=0.125, lambda_full=lam, output_attentions=True)
    _, got = naive.attention(q, k, v, mask, scale=0.125, lambda_full=lam, output_attentions=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_naive_reference_refuses_dropout():
    tensors, _, mask = make_inputs(CASES["mha-63-d64"], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        naive.attention(*tensors[:3], mask, scale=0.125, lambda_full=tensors[3], dropout_p=0.1)
