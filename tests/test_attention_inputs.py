"""Every attention backend refuses inputs that break the shared contract with an error naming the argument."""

from __future__ import annotations

import pytest
import torch

from diffllama.attention import AttentionMask, get_backend

B, H, KV, S, D = 1, 4, 2, 5, 8


def _inputs():
    q = torch.randn(B, H, S, D)
    k, v = torch.randn(B, KV, S, D), torch.randn(B, KV, S, D)
    return q, k, v, AttentionMask(torch.arange(S), None, S)


def _bad(case):
    q, k, v, mask = _inputs()
    if case == "k_len":
        mask = AttentionMask(torch.arange(S), None, S + 1)
    elif case == "positions_length":
        mask = AttentionMask(torch.arange(S + 1), None, S)
    elif case == "positions_float":
        mask = AttentionMask(torch.arange(S, dtype=torch.float32), None, S)
    elif case == "padding_shape":
        mask = AttentionMask(torch.arange(S), torch.ones(3, S, dtype=torch.bool), S)
    elif case == "padding_int":
        mask = AttentionMask(torch.arange(S), torch.ones(B, S, dtype=torch.int64), S)
    elif case == "odd_heads":
        q = torch.randn(B, 3, S, D)
        k, v = torch.randn(B, 1, S, D), torch.randn(B, 1, S, D)
    elif case == "heads_not_multiple":
        k, v = torch.randn(B, 3, S, D), torch.randn(B, 3, S, D)
    elif case == "value_shape":
        v = torch.randn(B, KV, S, D + 1)
    elif case == "three_dims":
        q = q[0]
    return q, k, v, mask


CASES = {
    "k_len": (ValueError, r"mask.k_len 6 != key length 5"),
    "positions_length": (ValueError, r"mask.query_positions must be \(5,\), got \(6,\)"),
    "positions_float": (TypeError, r"mask.query_positions must be an integer tensor"),
    "padding_shape": (ValueError, r"mask.key_padding must be \(B=1, Sk=5\), got \(3, 5\)"),
    "padding_int": (TypeError, r"mask.key_padding must be a bool tensor"),
    "odd_heads": (ValueError, r"num heads 3 must be even"),
    "heads_not_multiple": (ValueError, r"num heads 4 must be even and a multiple of the KV heads 3"),
    "value_shape": (ValueError, r"must be \(B=1, KV, Sk, d=8\)"),
    "three_dims": (ValueError, r"query, key, value must be 4-D"),
}


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_refused_before_any_work(backend, case):
    q, k, v, mask = _bad(case)
    error, message = CASES[case]
    with pytest.raises(error, match=message):
        get_backend(backend)(q, k, v, mask, scale=D ** -0.5, lambda_full=torch.tensor(0.5))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_valid_inputs_pass_the_checks(backend):
    q, k, v, mask = _inputs()
    out, _ = get_backend(backend)(q, k, v, mask, scale=D ** -0.5, lambda_full=torch.tensor(0.5))
    assert out.shape == (B, S, H // 2, 2 * D)


def test_unknown_backend_names_are_refused():
    from diffllama.attention import resolve_implementation

    assert resolve_implementation("auto", "cpu") == "sdpa" and resolve_implementation("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="attn_implementation must be one of .* or 'auto', got 'flash3'"):
        get_backend(resolve_implementation("flash3", "cpu"))


def test_backend_is_chosen_once_per_implementation_and_device(monkeypatch):
    """The attention function is resolved and imported on a layer's first call only, and again only when
    ``config.attn_implementation`` changes; the outputs follow the choice."""
    import diffllama
    import diffllama.attention as attention_pkg
    from conftest import tiny_config

    chosen = []
    real = attention_pkg.get_backend
    monkeypatch.setattr(attention_pkg, "get_backend", lambda name: chosen.append(name) or real(name))
    model = diffllama.DiffLlamaModel(tiny_config(attn_implementation="auto")).double().eval()
    ids = torch.randint(1, 90, (2, 7))
    with torch.no_grad():
        first = model(input_ids=ids).last_hidden_state
        model(input_ids=ids)
        assert chosen == ["sdpa"] * 3  # one choice per layer ("auto" on CPU), none on the second call
        model.config.attn_implementation = "eager"
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, first, rtol=1e-12, atol=1e-12)
    assert chosen == ["sdpa"] * 3 + ["eager"] * 3
