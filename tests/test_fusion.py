"""Inference caches: fused q/k/v and gate/up projections, and the cached λ, against the plain computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffllama
from conftest import padded_batch, tiny_config
from diffllama.cache import StaticCache
from diffllama.fusion import FusedLinear
from diffllama.generation import DecodeStep


def _model(**overrides) -> diffllama.DiffLlamaForCausalLM:
    config = tiny_config(initializer_range=0.15, **overrides)
    return diffllama.DiffLlamaForCausalLM(config).double().eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("overrides", [dict(), dict(num_key_value_heads=2), dict(attention_bias=True),
                                       dict(num_key_value_heads=1)], ids=["mha", "gqa", "bias", "mqa"])
def test_fused_logits_equal_unfused(overrides):
    model = _model(**overrides)
    ids, mask = padded_batch(96, "left")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model, ids, mask)
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.fused is not None and attn.fused.valid() and mlp.fused.valid()
    # The parameters are views of the fused tensor: the fused matmul is the one that runs.
    assert attn.k_proj.weight.data_ptr() == attn.fused.weight[attn.q_proj.out_features].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.fused.weight[mlp.gate_proj.out_features].data_ptr()
    got = _logits(model, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Same state dict: names, shapes and values.
    after = model.state_dict()
    assert list(after) == list(state)
    for name, value in state.items():
        assert torch.equal(after[name], value), name
    model.unfuse_projections()
    assert attn.fused is None
    torch.testing.assert_close(_logits(model, ids, mask), expected, rtol=1e-12, atol=1e-12)


def test_fused_model_saves_and_loads_the_same_checkpoint(tmp_path):
    model = _model(num_key_value_heads=2).fuse_projections()
    model.save_pretrained(tmp_path)
    loaded = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    ids, mask = padded_batch(96, "left")
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), rtol=0, atol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_training_a_fused_model_matches_unfused():
    """With gradients the separate projections run (same gradients), and the update reaches the fused matmul."""
    ids, mask = padded_batch(96, "left")
    models = [_model(num_key_value_heads=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[1].fuse_projections()
    for model in models:
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        model.eval()
    plain, fused = models
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14, msg=name)
    assert fused.model.layers[1].mlp.fused.valid()
    torch.testing.assert_close(_logits(fused, ids, mask), _logits(plain, ids, mask), rtol=1e-12, atol=1e-12)


def test_replaced_parameters_end_the_fusion():
    model = _model().fuse_projections()
    other = _model()
    ids, mask = padded_batch(96, "left")
    model.load_state_dict(other.state_dict(), assign=True)  # new parameter objects: the views are gone
    assert not model.model.layers[0].self_attn.fused.valid()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(other, ids, mask), rtol=1e-12, atol=1e-12)
    with model.inference_caches():  # entering drops the stale fusions (and the memory they hold)
        assert model.model.layers[0].self_attn.fused is None and model.model.layers[0].mlp.fused is None
    model.fuse_projections()
    assert model.model.layers[0].self_attn.fused.valid()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(other, ids, mask), rtol=1e-12, atol=1e-12)


def test_fused_linear_refuses_layers_that_cannot_share_a_matmul():
    with pytest.raises(ValueError, match="in_features"):
        FusedLinear([nn.Linear(4, 3), nn.Linear(5, 3)], site="qkv")
    with pytest.raises(ValueError, match="bias"):
        FusedLinear([nn.Linear(4, 3), nn.Linear(4, 3, bias=False)], site="qkv")


# ---- λ --------------------------------------------------------------------------------------------------------

def test_cached_lambda_equals_recomputed_and_follows_the_parameters():
    model = _model()
    attn = model.model.layers[2].self_attn
    with torch.no_grad():
        with model.inference_caches():
            first = attn.lambda_full(torch.float64)
            assert torch.equal(first, attn.compute_lambda(torch.float64))
            assert attn.lambda_full(torch.float64) is first  # reused, not recomputed
        before = first.item()
        attn.lambda_q1.add_(0.25)  # in place: bumps the version counter
        with model.inference_caches():
            second = attn.lambda_full(torch.float64)
        assert second is first  # refreshed in place: a captured CUDA graph reads the new value
        assert second.item() != before
        assert torch.equal(second, attn.compute_lambda(torch.float64))
        attn.lambda_k2.data = attn.lambda_k2.data * 2  # replaced storage: a new address
        with model.inference_caches():
            assert torch.equal(attn.lambda_full(torch.float64), attn.compute_lambda(torch.float64))
        model.to(torch.float32)
        with model.inference_caches():
            half = attn.lambda_full(torch.float32)
        assert half.dtype == torch.float32 and torch.equal(half, attn.compute_lambda(torch.float32))


def test_writes_through_data_are_seen_outside_the_cache_context_and_by_generate():
    """``p.data.fill_`` bumps no version counter: forward outside ``inference_caches`` computes λ, and generate
    refreshes the cache unconditionally, so both match a fresh model holding the new values."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        model(ids)
        model.generate(ids, max_new_tokens=3)
        for layer in model.model.layers:
            layer.self_attn.lambda_q1.data.fill_(0.7)
        fresh = type(model)(model.config).to(torch.float64).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)
        assert torch.equal(model.generate(ids, max_new_tokens=6), fresh.generate(ids, max_new_tokens=6))
        assert torch.equal(model.model.layers[0].self_attn._lambda_cache,
                           model.model.layers[0].self_attn.compute_lambda(torch.float64))


def test_lambda_with_gradient_is_computed_and_differentiable():
    attn = _model().model.layers[1].self_attn
    with torch.no_grad():
        attn.lambda_full(torch.float64)  # a cache exists
    lam = attn.lambda_full(torch.float64)
    assert lam.requires_grad
    lam.backward()
    assert attn.lambda_q1.grad is not None and attn.lambda_q1.grad.abs().sum() > 0


def test_lambda_cache_made_in_inference_mode_is_a_normal_tensor():
    model = _model()
    attn = model.model.layers[0].self_attn
    with torch.inference_mode(), model.inference_caches():
        lam = attn.lambda_full(torch.float64)
    assert not lam.is_inference()
    with torch.no_grad():
        attn.lambda_q2.mul_(0.5)
        with model.inference_caches():
            assert torch.equal(attn.lambda_full(torch.float64), attn.compute_lambda(torch.float64))


def test_compiled_code_uses_the_lambda_cache_only_inside_inference_caches():
    """Compiled code cannot see version counters: it must compute λ outside the context, and inside it read the
    cache that the context refreshed on entry."""
    model = _model(num_hidden_layers=1)
    attn = model.model.layers[0].self_attn
    step = torch.compile(lambda: attn.lambda_full(torch.float64) * 1, fullgraph=True, backend="eager")
    with torch.no_grad():
        attn.lambda_full(torch.float64)
        attn.lambda_q1.add_(0.5)  # the cache is now stale
        true = attn.compute_lambda(torch.float64)
        assert torch.equal(step(), true)  # outside: computed
        with model.inference_caches():
            assert torch.equal(step(), true)  # refreshed on entry
            attn._lambda_cache.fill_(123.0)  # white box: prove that compiled code reads the cache here
            assert step().item() == 123.0
        assert torch.equal(step(), true)
        assert not attn.trust.on


@pytest.mark.slow
def test_compiled_decode_step_with_caches_matches_plain_eager():
    """The compiled step (fused projections, cached λ) gives the logits of the plain eager step (float64 model;
    the step returns float32 logits, so the bound is float32 rounding: a wrong λ or projection is off by >1e-3)."""
    model = _model(num_hidden_layers=2, num_key_value_heads=2)
    plain = _model(num_hidden_layers=2, num_key_value_heads=2)
    plain.load_state_dict(model.state_dict())
    ids, mask = padded_batch(96, "left", seq=6)
    b, s = ids.shape
    caches = [StaticCache.from_config(m.config, b, 16, torch.float64) for m in (model, plain)]
    steps = [DecodeStep(model, caches[0], compile=True), DecodeStep(plain, caches[1])]
    assert model.model.layers[0].mlp.fused is not None and plain.model.layers[0].mlp.fused is None
    full_mask = torch.cat([mask, torch.ones(b, 16 - s, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    token = torch.randint(1, 96, (b, 1))
    with torch.inference_mode():
        for m, cache in zip((model, plain), caches):
            m(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
              use_cache=True, cache_position=torch.arange(s))
        for t in range(3):
            args = (token, positions[:, -1:] + 1 + t, torch.tensor([s + t]), full_mask)
            got, expected = steps[0](*args), steps[1](*args)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            token = expected.argmax(-1, keepdim=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graph_replay_sees_in_place_parameter_updates():
    """After capture, in-place updates of λ (a cached value) and of a fused weight reach the replayed graph."""
    config = tiny_config(initializer_range=0.15, num_key_value_heads=2)
    model = diffllama.DiffLlamaForCausalLM(config).to("cuda", torch.float32).eval()
    cache = StaticCache.from_config(config, 1, 32, torch.float32, "cuda")
    step = DecodeStep(model, cache, compile=True)
    assert step.cuda_graph
    token, slot = torch.tensor([[5]], device="cuda"), torch.tensor([0], device="cuda")

    def both():
        fast = step(token, slot[None], slot).clone()
        return fast, DecodeStep(model, cache, fuse=False)(token, slot[None], slot)

    with torch.inference_mode():
        fast, plain = both()
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            model.model.layers[0].self_attn.lambda_q1.add_(1.0)
            model.model.layers[1].self_attn.k_proj.weight.mul_(1.5)
            model.model.layers[2].mlp.up_proj.weight.mul_(-1.0)
        changed, plain = both()
        torch.testing.assert_close(changed, plain, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(changed, fast, rtol=1e-3, atol=1e-3)
