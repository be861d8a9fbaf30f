"""Shared fixtures: tiny configs and a bridge to transformers' DiffLlama (the parity reference)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

# Tests marked ``triton`` run diffllama's Triton kernels: on a CUDA GPU, or else through Triton's interpreter on CPU.
# Triton picks interpreted or compiled kernels when they are defined (at import), so the interpreter is turned on here,
# before diffllama is imported, and the kernel modules are imported at once; every test not marked ``triton`` then
# runs with it off again (fixture below), seeing the CPU behaviour (flash refuses CPU tensors, no Triton GEMV).
# A TRITON_INTERPRET set by hand is left alone.
# (pytest-xdist workers inherit the controller's environment: the second variable says the first was set here.)
MANAGE_INTERPRETER = "_DIFFLLAMA_TESTS_INTERPRETER" in os.environ or (
    not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
    and importlib.util.find_spec("triton") is not None)
if MANAGE_INTERPRETER:
    os.environ["TRITON_INTERPRET"] = os.environ["_DIFFLLAMA_TESTS_INTERPRETER"] = "1"

from diffllama import DiffLlamaConfig  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    import diffllama.attention.flash  # noqa: E402, F401  (defines the kernels as interpreted ones)
    from triton.runtime import interpreter as _interpreter  # noqa: E402

    # Triton 3.6's interpreter turns a reduction into a one-element array and calls int() on it for a loop bound,
    # which numpy 2 refuses: give its tensors an __index__ that reads the one element.
    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_with_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_with_index

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


@pytest.fixture(autouse=True)
def _triton_interpreter_only_for_kernel_tests(request, monkeypatch):
    if MANAGE_INTERPRETER and request.node.get_closest_marker("triton") is None:
        monkeypatch.delenv("TRITON_INTERPRET")
