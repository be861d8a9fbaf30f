"""KV caches: cached (dynamic and static) logits equal a full forward over the whole sequence, in float64."""

from __future__ import annotations

import pytest
import torch

import diffllama
from conftest import padded_batch, tiny_config
from diffllama.cache import DynamicCache, StaticCache
from diffllama.generation import position_ids_from_mask

TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def model_for(kv_heads: int, attn: str = "sdpa"):
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=kv_heads, attn_implementation=attn, initializer_range=0.2)
    return diffllama.DiffLlamaForCausalLM(config).double().eval()


def make_cache(kind: str, model, batch: int, length: int):
    if kind == "dynamic":
        return DynamicCache()
    return StaticCache.from_config(model.config, batch, length, torch.float64)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_incremental_logits_match_full_forward(kind, kv_heads, attn):
    """Prefill 7 tokens, then chunks of 1, 3 and 1: every step's logits equal the full forward's, left-padded."""
    model = model_for(kv_heads, attn)
    ids, mask = padded_batch(model.config.vocab_size, "left", seq=12)
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        cache = make_cache(kind, model, ids.shape[0], 16)
        steps = [(0, 7), (7, 8), (8, 11), (11, 12)]
        for start, end in steps:
            if kind == "static":
                step_mask = torch.nn.functional.pad(mask, (0, 16 - mask.shape[1]), value=1)
            else:
                step_mask = mask[:, :end]
            out = model(ids[:, start:end], attention_mask=step_mask, position_ids=positions[:, start:end],
                        past_key_values=cache, use_cache=True, cache_position=torch.arange(start, end))
            real = mask[:, start:end].bool()  # padded query rows are not compared (their output is arbitrary)
            assert rel_err(out.logits[real], full[:, start:end][real]) < TOL
        assert cache.get_seq_length() == 12


def test_static_cache_without_cache_position_and_reuse():
    """Default slots follow get_seq_length; a reused (dirty) cache gives the same logits as a fresh one."""
    model = model_for(2)
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticCache.from_config(model.config, 2, 12, torch.float64)
        first = model(ids[:, :5], past_key_values=cache, use_cache=True).logits
        rest = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
        assert rel_err(torch.cat([first, rest], 1), full) < TOL
        other = torch.randint(1, model.config.vocab_size, (2, 9))
        again = model(other, past_key_values=cache, use_cache=True, cache_position=torch.arange(9)).logits
        assert rel_err(again, model(other).logits) < TOL


def test_static_cache_errors():
    model = model_for(2)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        StaticCache.from_config(model.config, 1, 0)
    cache = StaticCache.from_config(model.config, 1, 4, torch.float64)
    with pytest.raises(ValueError, match="past the StaticCache's max_length 4"):
        model(torch.ones(1, 5, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="StaticCache holds"):
        model(torch.ones(2, 2, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_oversized_static_cache_refused_before_allocating(monkeypatch):
    import diffllama.cache as cache_module

    model = model_for(2)
    monkeypatch.setattr(cache_module, "_memory_bytes", lambda device: 1 << 20)  # pretend the host has 1 MiB
    with pytest.raises(ValueError, match=r"batch_size=2 x max_length=100000 slots needs .* GiB .*more than the 0\.0 "
                                         r"GiB available on cpu: lower max_length \(max_new_tokens\)"):
        StaticCache.from_config(model.config, 2, 100_000, torch.float32)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length=100003 slots"):  # generate sizes the cache from its arguments
        model.generate(ids, max_new_tokens=100_000, static_cache=True)
    assert StaticCache.from_config(model.config, 1, 64).max_length == 64  # 64 slots fit in 1 MiB


def test_static_cache_shapes_and_reset():
    model = model_for(2)
    cache = StaticCache.from_config(model.config, 3, 10, torch.float64)
    assert len(cache.keys) == model.config.num_hidden_layers
    assert cache.keys[0].shape == (3, 2, 10, model.config.head_dim)
    k, v = cache.update(0, torch.ones(3, 2, 2, 8, dtype=torch.float64), torch.ones(3, 2, 2, 8, dtype=torch.float64),
                        torch.tensor([4, 5]))
    assert k.data_ptr() == cache.keys[0].data_ptr() and cache.get_seq_length() == 6
    assert k[:, :, 4:6].eq(1).all() and k[:, :, :4].eq(0).all()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.keys[0].eq(0).all()
