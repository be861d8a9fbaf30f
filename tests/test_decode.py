"""decode.prepare_for_decode: fused q/k/v and gate/up projections and a fixed λ, against the plain model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffllama
from conftest import padded_batch, tiny_config
from diffllama import decode
from diffllama.cache import StaticCache
from diffllama.generation import DecodeStep


def _model(**overrides) -> diffllama.DiffLlamaForCausalLM:
    config = tiny_config(initializer_range=0.15, **overrides)
    return diffllama.DiffLlamaForCausalLM(config).double().eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("overrides", [dict(), dict(num_key_value_heads=2), dict(attention_bias=True),
                                       dict(num_key_value_heads=1)], ids=["mha", "gqa", "bias", "mqa"])
def test_prepared_logits_equal_plain(overrides, monkeypatch):
    model = _model(**overrides)
    ids, mask = padded_batch(96, "left")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model, ids, mask)
    assert decode.prepare_for_decode(model) is model and decode.is_prepared(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # The parameters are views of the fused tensor, and the fused matmul is the one that runs.
    assert attn.k_proj.weight.data_ptr() == attn.fused_qkv.weight[attn.q_proj.out_features].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.fused_gate_up.weight[mlp.gate_proj.out_features].data_ptr()
    sites = []
    real = decode.gemv.linear
    monkeypatch.setattr(decode.gemv, "linear", lambda x, w, b, site, *rest: sites.append(site) or real(x, w, b, site, *rest))
    got = _logits(model, ids, mask)
    assert sites == ["qkv", "gate_up"] * model.config.num_hidden_layers
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    after = model.state_dict()  # same state dict: names, shapes and values
    assert list(after) == list(state)
    for name, value in state.items():
        assert torch.equal(after[name], value), name
    decode.undo_prepare_for_decode(model)
    assert not decode.is_prepared(model) and "qkv" not in vars(attn)
    sites.clear()
    torch.testing.assert_close(_logits(model, ids, mask), expected, rtol=1e-12, atol=1e-12)
    assert sites == []


def test_fuse_projections_is_prepare_for_decode():
    """The documented model method stays: a thin call of decode.prepare_for_decode (and its undo)."""
    model = _model()
    assert model.fuse_projections() is model and decode.is_prepared(model)
    assert model.unfuse_projections() is model and not decode.is_prepared(model)


def test_checkpoint_bytes_are_the_same_after_prepare_for_decode(tmp_path):
    model = _model(num_key_value_heads=2)
    model.save_pretrained(tmp_path / "plain")
    decode.prepare_for_decode(model)
    model.save_pretrained(tmp_path / "prepared")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "prepared").iterdir()) and "model.safetensors" in files
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "prepared" / name).read_bytes(), name
    loaded = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "prepared", dtype=torch.float64)
    ids, mask = padded_batch(96, "left")
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), rtol=0, atol=0)


def test_training_a_prepared_model_matches_plain():
    """With gradients the separate projections and a computed λ run (same gradients), and the update reaches the
    fused matmul."""
    ids, mask = padded_batch(96, "left")
    models = [_model(num_key_value_heads=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    decode.prepare_for_decode(models[1])
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
    assert fused.model.layers[1].mlp.fused_gate_up.valid()
    torch.testing.assert_close(_logits(fused, ids, mask), _logits(plain, ids, mask), rtol=1e-12, atol=1e-12)


def test_replaced_parameters_fall_back_until_prepared_again():
    model = decode.prepare_for_decode(_model())
    other = _model()
    ids, mask = padded_batch(96, "left")
    model.load_state_dict(other.state_dict(), assign=True)  # new parameter objects: the views are gone
    assert not model.model.layers[0].self_attn.fused_qkv.valid()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(other, ids, mask), rtol=1e-12, atol=1e-12)
    decode.prepare_for_decode(model)
    assert model.model.layers[0].self_attn.fused_qkv.valid() and model.model.layers[0].mlp.fused_gate_up.valid()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(other, ids, mask), rtol=1e-12, atol=1e-12)


def test_layers_that_cannot_share_a_matmul_are_refused():
    with pytest.raises(ValueError, match="in_features"):
        decode.FusedWeights([nn.Linear(4, 3), nn.Linear(5, 3)])
    with pytest.raises(ValueError, match="bias"):
        decode.FusedWeights([nn.Linear(4, 3), nn.Linear(4, 3, bias=False)])


# ---- λ --------------------------------------------------------------------------------------------------------

def test_fixed_lambda_is_refreshed_in_place_and_read_only_by_compiled_code():
    """Compiled code cannot check λ against its parameters: it reads the fixed value, which refresh_lambda
    updates in place (a captured CUDA graph keeps reading the same address); eager code computes λ."""
    model = decode.prepare_for_decode(_model(num_hidden_layers=1))
    attn = model.model.layers[0].self_attn
    step = torch.compile(lambda: attn.compute_lambda(torch.float64) * 1, fullgraph=True, backend="eager")
    with torch.no_grad():
        fixed = attn.fixed_lambda
        assert torch.equal(fixed, type(attn).compute_lambda(attn, torch.float64)) and not fixed.is_inference()
        attn.lambda_q1.add_(0.5)
        true = type(attn).compute_lambda(attn, torch.float64)
        assert torch.equal(attn.compute_lambda(torch.float64), true)  # eager: computed
        assert not torch.equal(step(), true)  # compiled: the fixed value, now stale
        decode.refresh_lambda(model)
        assert attn.fixed_lambda is fixed and torch.equal(step(), true)  # refreshed in place
        attn.fixed_lambda.fill_(123.0)  # white box: prove that compiled code reads the fixed value
        assert step().item() == 123.0


def test_writes_through_data_are_seen_by_forward_and_by_generate():
    """``p.data.fill_`` bumps no version counter: eager forward computes λ, and generate refreshes the fixed λ on
    every call, so both match a fresh model holding the new values."""
    model = decode.prepare_for_decode(_model())
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
        attn = model.model.layers[0].self_attn
        assert torch.equal(attn.fixed_lambda, type(attn).compute_lambda(attn, torch.float64))


def test_lambda_with_gradient_is_computed_and_differentiable():
    attn = decode.prepare_for_decode(_model()).model.layers[1].self_attn
    lam = torch.compile(lambda: attn.compute_lambda(torch.float64), fullgraph=True, backend="eager")()
    assert lam.requires_grad
    lam.backward()
    assert attn.lambda_q1.grad is not None and attn.lambda_q1.grad.abs().sum() > 0


def test_prepared_in_inference_mode_gives_normal_tensors():
    model = _model()
    with torch.inference_mode():
        decode.prepare_for_decode(model)
    attn = model.model.layers[0].self_attn
    assert not attn.fixed_lambda.is_inference() and not attn.fused_qkv.weight.is_inference()
    with torch.no_grad():
        attn.lambda_q2.mul_(0.5)
        decode.refresh_lambda(model)
    assert torch.equal(attn.fixed_lambda, type(attn).compute_lambda(attn, torch.float64))


@pytest.mark.slow
def test_compiled_decode_step_with_caches_matches_plain_eager():
    """The compiled step (fused projections, fixed λ) gives the logits of the plain eager step (float64 model;
    the step returns float32 logits, so the bound is float32 rounding: a wrong λ or projection is off by >1e-3)."""
    model = _model(num_hidden_layers=2, num_key_value_heads=2)
    plain = _model(num_hidden_layers=2, num_key_value_heads=2)
    plain.load_state_dict(model.state_dict())
    ids, mask = padded_batch(96, "left", seq=6)
    b, s = ids.shape
    caches = [StaticCache.from_config(m.config, b, 16, torch.float64) for m in (model, plain)]
    steps = [DecodeStep(model, caches[0], compile=True), DecodeStep(plain, caches[1])]
    assert decode.is_prepared(model) and not decode.is_prepared(plain)
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
    """After capture, in-place updates of λ (a fixed value) and of a fused weight reach the replayed graph."""
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
