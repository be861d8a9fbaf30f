"""generate(inputs_embeds=...) (soft prompts, issue 14): greedy tokens equal transformers 5.17's in float64, alone
(new tokens only are returned) and with input_ids (prompt + new tokens), left-padded, static and dynamic caches,
streaming; its argument checks."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffllama
from conftest import hf_model, padded_batch, tiny_config
from diffllama.generation import stream_generate
from test_generation import Recorder, hf_generate

NEW = 12
SEQ = 9


@pytest.fixture(scope="module")
def pair():
    """(ours, transformers) causal LMs in float64 with the same random weights, GQA."""
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=2, initializer_range=0.15)
    reference = hf_model("DiffLlamaForCausalLM", config, torch.float64)
    ours = diffllama.DiffLlamaForCausalLM(config).double().eval()
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def soft_prompt(model, ids):
    """Embeddings of ``ids`` plus noise: a prompt no token sequence gives, so ids alone would decode otherwise."""
    noise = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    with torch.no_grad():
        return model.model.embed_tokens(ids) + 0.5 * noise


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["embeds-alone", "with-input-ids"])
def test_greedy_equals_transformers_left_padded(pair, with_ids, static):
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=SEQ)
    embeds = soft_prompt(ours, ids)
    given = ids if with_ids else None
    expected = hf_generate(reference, given, mask, inputs_embeds=embeds, max_new_tokens=NEW)
    got = ours.generate(given, mask, inputs_embeds=embeds, max_new_tokens=NEW, eos_token_id=[],
                        static_cache=static)
    assert got.shape == ((3, SEQ + NEW) if with_ids else (3, NEW))
    assert torch.equal(got, expected)
    from_ids = ours.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])[:, SEQ:]
    assert not torch.equal(got[:, -NEW:], from_ids), "the embeddings must change the output for the test to bite"


def test_max_length_and_repetition_penalty_like_transformers(pair):
    """Embeddings alone: max_length counts the embedded prompt; the penalty sees new tokens only, with a warning."""
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=SEQ)
    embeds = soft_prompt(ours, ids)
    kwargs = dict(max_length=SEQ + 7, repetition_penalty=1.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf_generate(reference, None, mask, inputs_embeds=embeds, **kwargs)
    with pytest.warns(UserWarning, match="penalises only the new tokens"):
        got = ours.generate(attention_mask=mask, inputs_embeds=embeds, eos_token_id=[], **kwargs)
    assert got.shape == (3, 7) and torch.equal(got, expected)


def test_streaming_and_the_streamer(pair):
    ours, _ = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=SEQ)
    embeds = soft_prompt(ours, ids)
    recorder = Recorder()
    out = ours.generate(attention_mask=mask, inputs_embeds=embeds, max_new_tokens=NEW, eos_token_id=[],
                        streamer=recorder)
    assert recorder.calls[0].shape == (3, 0) and recorder.calls[-1] == "end"  # transformers puts (B, 0) ids
    assert torch.equal(torch.stack(recorder.calls[1:-1], 1), out)
    steps = list(stream_generate(ours, attention_mask=mask, inputs_embeds=embeds, max_new_tokens=NEW,
                                 eos_token_id=[], static_cache=True))
    assert torch.equal(torch.stack(steps, 1), out)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "pass input_ids .*, inputs_embeds .*, or both"),
    (dict(inputs_embeds=torch.zeros(2, 4, 32)), ValueError, "model's dtype torch.float64, got torch.float32"),
    (dict(inputs_embeds=torch.zeros(2, 4, 31, dtype=torch.float64)), ValueError, r"hidden_size=32"),
    (dict(inputs_embeds=torch.zeros(2, 4, dtype=torch.float64)), ValueError, r"shape \(batch, seq, hidden_size"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long), inputs_embeds=torch.zeros(2, 4, 32, dtype=torch.float64)),
     ValueError, r"input_ids \(2, 3\) and inputs_embeds \(2, 4, 32\) must describe the same"),
    (dict(inputs_embeds=torch.zeros(2, 4, 32, dtype=torch.float64), attention_mask=torch.ones(2, 5)),
     ValueError, r"attention_mask must be a tensor of the shape of input_ids \(or of inputs_embeds' batch"),
])
def test_bad_inputs_embeds_are_refused_before_the_model_runs(pair, kwargs, error, match):
    ours, _ = pair
    calls = []
    handle = ours.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            ours.generate(max_new_tokens=2, **kwargs)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.slow
def test_compiled_static_decode_with_inputs_embeds_matches_eager():
    """The prefill reads the embeddings eagerly; the compiled decode step then only sees token ids."""
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(num_hidden_layers=1, initializer_range=0.15)).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    embeds = soft_prompt(model.double(), ids).float()
    model.float()
    eager = model.generate(attention_mask=mask, inputs_embeds=embeds, max_new_tokens=8, eos_token_id=[])
    compiled = model.generate(attention_mask=mask, inputs_embeds=embeds, max_new_tokens=8, eos_token_id=[],
                              static_cache=True, compile=True)
    assert torch.equal(compiled, eager)
