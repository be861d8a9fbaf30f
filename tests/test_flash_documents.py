"""The flash kernels with packed documents (``AttentionMask.document_ids``, issue 14): output and every gradient
(q, k, v, λ) against the naive two-softmax reference in float64, with bounds relative to this project's sdpa
backend in the same precision (:func:`attention_cases.check_flash`).

The small cases run on CPU through Triton's interpreter (tests/conftest.py; fp16: the interpreter mishandles bf16;
blocks of 16, so documents of 5-37 tokens cross, fill and share blocks); the bf16 cases at real sizes need a CUDA
GPU (``benchmarks/gpu_tests.sh``). Every output buffer starts as NaN (``poison=True``). Under the interpreter on a
shared 2-core machine a case takes 2-25 s: all but one small case are marked slow there.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_cases import CUDA, DEVICE, INTERPRET, check_flash, document_ids, interpreter_params, kernel_test

from diffllama.attention import AttentionMask

cuda_only = pytest.mark.skipif(not CUDA, reason="bf16 at real sizes needs a CUDA GPU")
DTYPE = torch.bfloat16 if CUDA else torch.float16


def _inputs(b, h, kv, d, lengths, padding=None, seed=0):
    s = sum(lengths[0])
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    q, k, v = mk(b, h, s, d), mk(b, kv, s, d), mk(b, kv, s, d)
    lam = (torch.rand((), generator=gen, dtype=torch.float64) * 0.8 + 0.1).to(DEVICE)
    dout = mk(b, s, h // 2, 2 * d)
    pad = None
    if padding is not None:  # the first `padding[row]` keys of each row are padding (left padding)
        pad = torch.ones(b, s, dtype=torch.bool)
        for row, n in enumerate(padding):
            pad[row, :n] = False
        pad = pad.to(DEVICE)
    mask = AttentionMask(torch.arange(s, device=DEVICE), pad, s, document_ids=document_ids(lengths).to(DEVICE))
    return (q, k, v, lam), dout, mask


# b, h, kv, d, document lengths per row (blocks of 16 under the interpreter), left padding per row
SMALL = {
    "mha-d32-53": (2, 2, 2, 32, [[5, 37, 11], [20, 20, 13]], None),
    "gqa-d16-45": (2, 4, 2, 16, [[16, 16, 13], [1, 43, 1]], None),
    "gqa-d16-41-leftpad": (2, 4, 2, 16, [[9, 20, 12], [3, 30, 8]], [0, 11]),
}


@kernel_test
@pytest.mark.parametrize("name", interpreter_params(SMALL, quick={"gqa-d16-45"}))
def test_flash_documents_match_naive_float64(name):
    b, h, kv, d, lengths, padding = SMALL[name]
    tensors, dout, mask = _inputs(b, h, kv, d, lengths, padding)
    got = check_flash(tensors, dout, mask, torch.float16 if INTERPRET else DTYPE, label=name)
    if padding is not None:  # queries on padding keys see nothing (their own key is padding): exactly 0, no NaN
        for row, n in enumerate(padding):
            assert (got["out"][row, :n] == 0).all()


@kernel_test
@pytest.mark.slow
def test_flash_documents_atomic_dq_and_split_backward():
    """dQ by float32 atomics from the dK/dV' kernel, dK and dV' as two launches: both honour the documents."""
    tensors, dout, mask = _inputs(1, 4, 2, 16, [[7, 30, 10]])
    check_flash(tensors, dout, mask, torch.float16 if INTERPRET else DTYPE, label="atomic-split", dq_mode="atomic",
                bwd_mode="split")


@kernel_test
@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="the interpreter's block shapes (the GPU runs its own configs)")
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_flash_documents_with_unequal_blocks(blocks):
    """Query and key blocks of different sizes, as the GPU configs have (fwd 128 x 64, dK/dV' 64 x 128): the
    block bounds from the documents must not assume BLOCK_M == BLOCK_N."""
    tensors, dout, mask = _inputs(1, 4, 2, 16, [[3, 40, 6, 21]], [5])
    check_flash(tensors, dout, mask, torch.float16, label=f"blocks {blocks}", interpret_blocks=blocks)


@kernel_test
def test_short_packed_row_without_gradients_keeps_documents_apart():
    """Few rows and no gradient take the decode kernel, which has no document mask: a packed row must not."""
    tensors, dout, mask = _inputs(1, 2, 2, 16, [[10, 12, 11]])
    check_flash(tensors, dout, mask, torch.float16 if INTERPRET else DTYPE, grad=False, label="no-grad")


@kernel_test
def test_unsorted_document_ids_skip_nothing_and_stay_right():
    """Ids that decrease along a row are outside the contract but still honoured elementwise (no block skipping)."""
    tensors, dout, mask = _inputs(1, 2, 2, 16, [[20, 20]])
    mask.document_ids = torch.tensor([[1] * 20 + [0] * 20], dtype=torch.int32, device=DEVICE)
    check_flash(tensors, dout, mask, torch.float16 if INTERPRET else DTYPE, label="unsorted")


# b, h, kv, d, document lengths per row, left padding: bf16 at the sizes the model trains on
LARGE = {
    "mha-d128-2048": (1, 8, 8, 128, [[1000, 37, 600, 411]], None),
    "gqa-d64-3000-pad": (2, 8, 2, 64, [[1, 1500, 1499], [700, 700, 700, 900]], [0, 100]),
    "gqa-d128-4096-8docs": (1, 16, 4, 128, [[512] * 8], None),
}


@kernel_test
@cuda_only
@pytest.mark.parametrize("name", list(LARGE))
def test_flash_documents_bf16_real_sizes(name):
    b, h, kv, d, lengths, padding = LARGE[name]
    tensors, dout, mask = _inputs(b, h, kv, d, lengths, padding, seed=int.from_bytes(os.urandom(4), "little"))
    check_flash(tensors, dout, mask, torch.bfloat16, label=name)
