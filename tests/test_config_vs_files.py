"""config.json and the weight files disagreeing (issue 14): each case loads as transformers 5.17 loads it (same
logits, same dtype, the file's data kept) or is refused with an error naming the key; nothing is dropped silently."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import diffllama
from conftest import tiny_config

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
IDS = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def weights(config) -> dict[str, torch.Tensor]:
    """Random float64 weights of a causal LM of ``config``, with a head of its own (not the embedding)."""
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(**{**config, "tie_word_embeddings": False})).double()
    return {k: v.clone() for k, v in model.state_dict().items()}


def write(folder, state: dict[str, torch.Tensor], dtype: str | None = None, **config) -> str:
    """A checkpoint folder: config.json of ``tiny_config(**config)`` (with a ``dtype`` entry when given) and one
    model.safetensors holding ``state``."""
    folder.mkdir()
    fields = {**tiny_config(**config).to_dict(), "architectures": ["DiffLlamaForCausalLM"]}
    if dtype is not None:
        fields["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(fields))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def load_both(folder, dtype=torch.float64):
    """(ours, transformers') causal LM loaded from ``folder``; ours while recording warnings: (ours, hf, warnings)."""
    import transformers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = diffllama.DiffLlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                                      attn_implementation="sdpa").eval()
    return ours, reference, [str(w.message) for w in caught]


def assert_same_logits(ours, reference, tol=1e-12):
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=tol, atol=tol)


def test_tied_config_with_a_different_head_keeps_the_head_and_warns(tmp_path):
    """transformers keeps the file's head, unties and warns; the code before the fix dropped the head silently."""
    state = weights({})
    ours, reference, caught = load_both(write(tmp_path / "ckpt", state, tie_word_embeddings=True))
    assert any("tie_word_embeddings" in m and HEAD in m for m in caught), caught
    assert torch.equal(reference.lm_head.weight, state[HEAD])
    assert torch.equal(ours.lm_head.weight, state[HEAD]) and torch.equal(ours.model.embed_tokens.weight, state[EMBED])
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert ours.config.tie_word_embeddings is False  # so tie_weights and save_pretrained keep the head
    assert_same_logits(ours, reference)
    ours.save_pretrained(tmp_path / "again")  # the head survives a round trip, now without the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again.lm_head.weight, state[HEAD])


def test_tied_config_with_an_equal_head_ties_without_a_warning(tmp_path):
    state = weights({})
    state[HEAD] = state[EMBED].clone()
    ours, reference, caught = load_both(write(tmp_path / "ckpt", state, tie_word_embeddings=True))
    assert caught == []
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and ours.config.tie_word_embeddings
    assert_same_logits(ours, reference)


def test_tied_config_with_only_the_head_takes_the_embedding_from_it(tmp_path):
    """transformers ties the side that is in the file: the embedding gets the head's values."""
    state = weights({})
    del state[EMBED]
    ours, reference, caught = load_both(write(tmp_path / "ckpt", state, tie_word_embeddings=True))
    assert caught == []
    assert torch.equal(ours.model.embed_tokens.weight, state[HEAD])
    assert torch.equal(reference.model.embed_tokens.weight, state[HEAD])
    assert_same_logits(ours, reference)


def test_untied_config_without_a_head_initialises_it_and_warns(tmp_path):
    """transformers initialises the missing head and reports it; so do we, with a warning naming it."""
    state = weights({})
    del state[HEAD]
    ours, reference, caught = load_both(write(tmp_path / "ckpt", state, tie_word_embeddings=False))
    assert any("newly initialised" in m and HEAD in m for m in caught), caught
    assert ours.loading_report["new"] == [HEAD]
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    with torch.no_grad():  # the decoder is the file's: the same hidden states as transformers'
        torch.testing.assert_close(ours.model(IDS).last_hidden_state, reference.model(IDS).last_hidden_state,
                                   rtol=1e-12, atol=1e-12)


def test_rotary_inv_freq_of_old_checkpoints_is_ignored_as_in_transformers(tmp_path):
    """Old Llama-style files hold each layer's rotary_emb.inv_freq, derived from the config: transformers ignores
    them, so do we (listed in loading_report["dropped"]); the code before the fix refused the folder."""
    state = weights({})
    extra = {"model.rotary_emb.inv_freq": torch.ones(4), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    ours, reference, _ = load_both(write(tmp_path / "ckpt", {**state, **extra}))
    assert sorted(extra) == [k for k in ours.loading_report["dropped"] if "inv_freq" in k]
    assert_same_logits(ours, reference)


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update({"model.foo.weight": torch.ones(3)}), r"unexpected keys \['model.foo.weight'\]"),
    (lambda s: s.pop("model.layers.0.mlp.up_proj.weight"), r"missing keys \['model.layers.0.mlp.up_proj.weight'\]"),
    (lambda s: s.update({"model.norm.weight": torch.ones(31)}), r"model.norm.weight: the config expects \(32,\)"),
], ids=["extra", "missing", "shape"])
def test_other_key_and_shape_disagreements_are_refused_by_name(tmp_path, change, match):
    """transformers warns and initialises (missing), ignores (extra) or raises (shape); we refuse all three, naming
    the key, rather than run a model that differs from the file."""
    state = weights({})
    change(state)
    with pytest.raises(ValueError, match=match):
        diffllama.DiffLlamaForCausalLM.from_pretrained(write(tmp_path / "ckpt", state))


@pytest.mark.parametrize("config_dtype, file_dtypes, expected", [
    ("float32", {EMBED: torch.bfloat16, "model.norm.weight": torch.float16}, torch.float32),  # mixed in the file
    ("bfloat16", {}, torch.bfloat16),                                   # config bf16, file float32
    (None, {"*": torch.bfloat16}, torch.bfloat16),                      # no entry: the file's dtype
], ids=["mixed-file", "config-bf16", "no-entry"])
def test_weight_dtypes_that_differ_from_the_config_load_as_transformers(tmp_path, config_dtype, file_dtypes,
                                                                         expected):
    state = {k: v.to(file_dtypes.get(k, file_dtypes.get("*", torch.float32))) for k, v in weights({}).items()}
    ours, reference, _ = load_both(write(tmp_path / "ckpt", state, dtype=config_dtype), dtype="auto")
    assert ours.dtype == reference.dtype == expected
    for name, tensor in ours.state_dict().items():  # every weight is the file's, cast as transformers casts it
        if name in state:
            assert torch.equal(tensor, reference.state_dict()[name]), name
    assert_same_logits(ours, reference, tol=2e-2 if ours.dtype == torch.bfloat16 else 1e-5)
