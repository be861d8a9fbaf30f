"""The flash decode custom op: fake implementation, values against the naive reference in float64, and tracing
under torch.compile.

Value tests need a CUDA GPU or Triton's interpreter (on CPU tests/conftest.py turns it on for them; fp16); the
fake-implementation test runs wherever Triton imports.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import CUDA, DEVICE, interpreter_params, kernel_test, slow_in_interpreter

from diffllama.attention import AttentionMask, naive

triton = pytest.importorskip("triton")

DTYPE = torch.bfloat16 if CUDA else torch.float16  # the CPU interpreter mishandles bf16

CASES = {  # b, h, kv, d, slots (static cache length), position of the single query, padding
    "mha-d64": (2, 4, 4, 64, 300, 170, False),
    "gqa4-d32-first-slot": (1, 8, 2, 32, 64, 0, False),
    "gqa2-d128-pad": (3, 8, 4, 128, 200, 150, True),
    "mqa-d96": (2, 4, 1, 96, 100, 63, False),
}


def _inputs(b, h, kv, d, slots, position, padding, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv, slots, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, kv, slots, d, generator=gen, dtype=torch.float64)
    lam = torch.tensor(0.37, dtype=torch.float64)
    pad = None
    if padding:
        pad = torch.ones(b, slots, dtype=torch.bool)
        for row in range(1, b):
            pad[row, :7 * row] = False
        pad = pad.to(DEVICE)
    # Slots after the position hold stale (finite) entries, as a reused static cache does: they must not count.
    mask = AttentionMask(torch.tensor([position], device=DEVICE), pad, slots)
    return [t.to(DEVICE) for t in (q, k, v, lam)], mask


def _rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def test_fake_implementation_gives_the_real_output_shapes(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffllama.attention.flash_decode import decode_partials, split_plan

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # plan for the interpreter: no GPU needed to size the outputs
    with FakeTensorMode():
        q = torch.empty(2, 8, 1, 96, dtype=torch.float16)
        k = torch.empty(2, 2, 300, 96, dtype=torch.float16)
        opart, lpart = decode_partials(q, k, k, torch.empty(1, dtype=torch.int64), None, 0.1)
    splits = split_plan(2, 8, 1, 300, 128, torch.device("cpu"))[0]
    assert opart.shape == (splits, 2, 8, 1, 256) and lpart.shape == (splits, 2, 8, 1)
    assert opart.dtype == lpart.dtype == torch.float32


@kernel_test
@pytest.mark.parametrize("name", interpreter_params(CASES, quick={"gqa4-d32-first-slot", "mqa-d96"}))
def test_decode_matches_naive_float64(name):
    from diffllama.attention import flash, sdpa

    (q, k, v, lam), mask = _inputs(*CASES[name])
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        ref, _ = naive.attention(q, k, v, mask, scale=scale, lambda_full=lam)
        base, _ = sdpa.attention(*(t.to(DTYPE) for t in (q, k, v)), mask, scale=scale, lambda_full=lam.to(DTYPE))
        got, _ = flash.attention(*(t.to(DTYPE) for t in (q, k, v)), mask, scale=scale, lambda_full=lam.to(DTYPE),
                                 poison=True)  # an unwritten element of the op's outputs shows as NaN
    assert got.shape == ref.shape and got.dtype == DTYPE
    assert _rel(got, ref) <= min(2 * _rel(base, ref) + 2e-3, 2e-2), (_rel(got, ref), _rel(base, ref))


@kernel_test
@slow_in_interpreter
def test_decode_traces_under_compile_fullgraph_and_passes_opcheck():
    from diffllama.attention import flash
    from diffllama.attention.flash_decode import decode_partials

    (q, k, v, lam), mask = _inputs(*CASES["gqa2-d128-pad"])
    q, k, v, lam = (t.to(DTYPE) for t in (q, k, v, lam))
    scale = q.shape[-1] ** -0.5

    def step(q, k, v, lam, position, pad):
        return flash.attention(q, k, v, AttentionMask(position, pad, k.shape[2]), scale=scale, lambda_full=lam)[0]

    with torch.no_grad():
        expected = step(q, k, v, lam, mask.query_positions, mask.key_padding)
        got = torch.compile(step, fullgraph=True, dynamic=False)(q, k, v, lam, mask.query_positions,
                                                                 mask.key_padding)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    pad = mask.key_padding.view(torch.uint8)
    torch.library.opcheck(decode_partials, (q, k, v, mask.query_positions, pad, scale))


@kernel_test
@slow_in_interpreter
def test_compiled_flash_decode_step_matches_eager_sdpa_step():
    """The fast path a user gets with attn_implementation="auto" on CUDA: fused projections, cached λ, flash decode
    in a compiled, CUDA-graphed step; against the plain eager step with SDPA, from the same cache, in bf16. (Under
    the interpreter on CPU: "flash", fp16, compiled without a CUDA graph.)"""
    import diffllama
    from conftest import tiny_config
    from diffllama.cache import StaticCache
    from diffllama.generation import DecodeStep

    shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                 initializer_range=0.05)
    config = tiny_config(**shape, attn_implementation="auto" if CUDA else "flash")
    fast = diffllama.DiffLlamaForCausalLM(config).to(DEVICE, DTYPE).eval()
    plain = diffllama.DiffLlamaForCausalLM(tiny_config(**shape, attn_implementation="sdpa")).to(DEVICE, DTYPE).eval()
    plain.load_state_dict(fast.state_dict())
    caches = [StaticCache.from_config(config, 1, 256, DTYPE, DEVICE) for _ in range(2)]
    ids = torch.randint(1, config.vocab_size, (1, 40), device=DEVICE)
    positions = torch.arange(40, device=DEVICE)[None]
    steps = [DecodeStep(fast, caches[0], compile=True), DecodeStep(plain, caches[1])]
    assert steps[0].cuda_graph == CUDA
    with torch.inference_mode():
        for model, cache in zip((fast, plain), caches):
            model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(40, device=DEVICE))
        token = ids[:, -1:]
        for t in range(4):
            args = (token, positions[:, -1:] + 1 + t, torch.tensor([40 + t], device=DEVICE))
            got, expected = steps[0](*args).clone(), steps[1](*args)
            assert _rel(got, expected.double()) < 2e-2
            token = expected.argmax(-1, keepdim=True)
