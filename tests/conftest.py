"""Shared fixtures: tiny configs and a bridge to transformers' DiffLlama (the parity reference)."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffllama import DiffLlamaConfig

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0)


def tiny_config(**overrides) -> DiffLlamaConfig:
    """A 3-layer, 4-head, hidden-32 config (fast on CPU); keyword overrides replace fields."""
    return DiffLlamaConfig(**{**TINY, **overrides})


def hf_config(config: DiffLlamaConfig, attn_implementation: str = "sdpa"):
    """transformers' DiffLlamaConfig with the same fields as ``config``."""
    import transformers

    fields = config.to_dict()
    fields.pop("model_type")
    hf = transformers.DiffLlamaConfig(**fields)
    hf._attn_implementation = attn_implementation
    return hf


def hf_model(cls_name: str, config: DiffLlamaConfig, dtype=torch.float64, attn_implementation: str = "sdpa"):
    """A randomly initialised transformers model of class ``cls_name`` (e.g. "DiffLlamaForCausalLM"), in eval mode."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(hf_config(config, attn_implementation))
    return model.to(dtype).eval()


def padded_batch(vocab_size: int, padding: str, batch: int = 3, seq: int = 11, seed: int = 0):
    """(input_ids, attention_mask) with rows padded by 0, 2 and 5 tokens on the ``padding`` side ("left"/"right")."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate((0, 2, 5)[:batch]):
        if pad:
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, seq - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
