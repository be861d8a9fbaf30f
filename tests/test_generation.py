"""Generation: greedy parity with transformers' generate, EOS handling, sampling filters, seeds, streaming, errors."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import diffllama
from conftest import hf_model, padded_batch, tiny_config
from diffllama.cache import StaticCache
from diffllama.decode import is_prepared
from diffllama.generation import (
    DecodeStep,
    apply_repetition_penalty,
    check_eos_token_id,
    filter_logits,
    next_tokens,
    pad_batch,
    position_ids_from_mask,
    resolve_generation_settings,
    stream_generate,
    stream_text,
)
from diffllama.hf_format import read_generation_config

NEW = 42


def resolve(model, prompt_length=1, **arguments):
    """The settings ``generate`` resolves for ``model`` and a prompt of ``prompt_length`` tokens."""
    return resolve_generation_settings(model.config, getattr(model, "generation_config", None),
                                       prompt_length=prompt_length, **arguments)


def resolve_special_ids(model, eos_token_id=None, pad_token_id=None):
    """(EOS ids, the id written after EOS) as resolved for ``model``."""
    settings = resolve(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return list(settings.eos_token_id), settings.fill_token_id


def resolve_lengths(model, prompt_length, **arguments):
    """(most, fewest) new tokens as resolved for ``model``."""
    settings = resolve(model, prompt_length, **arguments)
    return settings.max_new_tokens, settings.min_new_tokens


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def pair(request):
    """(ours, transformers) DiffLlamaForCausalLM in float64 with the same random weights."""
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=request.param, initializer_range=0.15)
    reference = hf_model("DiffLlamaForCausalLM", config, torch.float64)
    ours = diffllama.DiffLlamaForCausalLM(config).double().eval()
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def hf_generate(reference, ids, mask, **kwargs):
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("pad_token_id", 0)
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        return reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_greedy_equals_transformers_left_padded(pair, static):
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=9)
    expected = hf_generate(reference, ids, mask, max_new_tokens=NEW)
    got = ours.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[], static_cache=static)
    assert got.shape == (3, 9 + NEW)
    assert torch.equal(got, expected)
    assert len(set(got[:, 9:].flatten().tolist())) > 5, "degenerate output makes the comparison weak"


def test_mask_inferred_from_the_pad_id_like_transformers(pair):
    """No attention_mask: the pad id marks padding where it occurs and is not an EOS id (transformers' rule)."""
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=9)
    ids = ids.masked_fill(mask == 0, 7)  # pad id 7: an id that is no EOS here
    expected = hf_generate(reference, ids, None, max_new_tokens=8, pad_token_id=7)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=[], pad_token_id=7), expected)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=8, eos_token_id=[], pad_token_id=7), expected)
    # The pad id is also the EOS id: nothing is inferred (transformers' rule), every token is real.
    unmasked = ours.generate(ids, torch.ones_like(ids), max_new_tokens=8, eos_token_id=[7], pad_token_id=7)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=[7], pad_token_id=7), unmasked)
    with pytest.raises(ValueError, match="inferred as input_ids != pad_token_id=7"):
        ours.generate(torch.tensor([[3, 7, 5]]), max_new_tokens=2, pad_token_id=7)  # 7 after a real token


def test_sampling_settings_from_the_generation_config_like_transformers(pair):
    """A checkpoint's generation_config.json sampling settings apply when the call leaves them out, as in
    transformers: its repetition_penalty changes the greedy tokens the same way; its do_sample samples. (No
    padding: transformers' penalty also counts pad tokens, diffllama's does not.)"""
    ours, reference = pair
    ids = torch.randint(1, ours.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    plain = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.generation_config.update(repetition_penalty=1.8)
        try:
            expected = hf_generate(reference, ids, mask, max_new_tokens=12)
        finally:
            reference.generation_config.update(repetition_penalty=None)
    ours.generation_config = {"repetition_penalty": 1.8}
    try:
        got = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(got, expected) and not torch.equal(got, plain)
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[], repetition_penalty=1.0),
                           plain)  # an argument wins
        ours.generation_config = {"do_sample": True, "temperature": 1.5, "top_k": 0, "no_repeat_ngram_size": 3}
        with pytest.warns(UserWarning, match=r"sets no_repeat_ngram_size=3, which diffllama's generate does not"):
            sampled = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[], seed=3)
        explicit = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[], seed=3, do_sample=True,
                                 temperature=1.5)
        assert torch.equal(sampled, explicit) and not torch.equal(sampled, plain)
    finally:
        ours.generation_config = {}


def test_eos_stops_each_row_like_transformers(pair):
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=9)
    free = ours.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    eos = int(free[1, 9 + 4])  # row 1 emits it at step 4; others later or never
    expected = hf_generate(reference, ids, mask, max_new_tokens=NEW, eos_token_id=eos)
    for static in (False, True):
        got = ours.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, static_cache=static)
        assert torch.equal(got, expected)
    row = got[1, 9:].tolist()
    first = row.index(eos)
    assert first <= 4 and set(row[first + 1:]) <= {0}


def test_stop_list_and_trimming():
    torch.manual_seed(1)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).double().eval()
    ids = torch.randint(1, 96, (2, 5))
    free = model.generate(ids, max_new_tokens=20, eos_token_id=[])
    stops = [int(free[0, 5 + 2]), int(free[1, 5 + 3])]
    got = model.generate(ids, max_new_tokens=20, eos_token_id=stops, pad_token_id=0)
    first = [next(i for i, t in enumerate(r) if t in stops) for r in free[:, 5:].tolist()]
    assert got.shape[1] == 5 + max(first) + 1  # stops once every row has hit a stop id
    for r, f in enumerate(first):
        assert torch.equal(got[r, :5 + f + 1], free[r, :5 + f + 1])
        assert got[r, 5 + f + 1:].eq(0).all()


def test_defaults_from_config_and_generation_config(tmp_path):
    model = diffllama.DiffLlamaForCausalLM(tiny_config(eos_token_id=7, pad_token_id=3))
    assert resolve_special_ids(model) == ([7], 3)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 6], "pad_token_id": 1}')
    model.generation_config = read_generation_config(tmp_path)
    assert resolve_special_ids(model) == ([5, 6], 1)
    assert resolve_special_ids(model, eos_token_id=9, pad_token_id=None) == ([9], 1)
    assert resolve_special_ids(model, eos_token_id=[]) == ([], 1)
    assert read_generation_config(tmp_path / "nothing") == {}


# ---- lengths ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, new", [
    (dict(), 20),                                  # transformers 5.17's default: 20 new tokens, not 20 in all
    (dict(max_length=15), 6),                      # the total, prompt (9) included
    (dict(max_length=15, max_new_tokens=3), 3),    # max_new_tokens wins
    (dict(max_length=40, max_new_tokens=3), 3),
])
def test_lengths_match_transformers(pair, kwargs, new):
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' advice to set max_new_tokens
        expected = hf_generate(reference, ids, mask, **kwargs)
    got = ours.generate(ids, mask, eos_token_id=[], **kwargs)
    assert got.shape == (3, 9 + new) and torch.equal(got, expected)


def test_default_length_stops_at_max_position_embeddings_like_transformers(pair):
    ours, reference = pair
    limit = ours.config.max_position_embeddings  # 64
    ids = torch.randint(1, ours.config.vocab_size, (1, limit - 14), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf_generate(reference, ids, torch.ones_like(ids))
    got = ours.generate(ids, eos_token_id=[])
    assert got.shape == (1, limit) and torch.equal(got, expected)
    full = torch.ones(1, limit, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_generate(reference, full, torch.ones_like(full))
    with pytest.raises(ValueError, match="input_ids has 64 tokens, which fills max_position_embeddings=64"):
        ours.generate(full, eos_token_id=[])
    assert ours.generate(full, eos_token_id=[], max_new_tokens=2).shape == (1, limit + 2)  # an explicit length


def test_lengths_from_the_generation_config_like_transformers(pair):
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=9)
    free = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = [int(free[0, 9 + 1]), int(free[1, 9 + 2])]  # rows 0 and 1 would stop early
    unset = dict(max_length=None, max_new_tokens=None, min_new_tokens=None)
    for gen, kwargs in [({"max_length": 16}, {}), ({"max_new_tokens": 5, "max_length": 40}, {}),
                        ({"max_new_tokens": 12, "min_new_tokens": 4}, {}),
                        ({"max_length": 16}, dict(max_length=12)),  # the argument wins
                        ({"max_new_tokens": 5}, dict(max_length=20))]:  # transformers: max_new_tokens wins
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference.generation_config.update(**{**unset, **gen})
            expected = hf_generate(reference, ids, mask, eos_token_id=eos, **kwargs)
        ours.generation_config = gen
        try:
            got = ours.generate(ids, mask, eos_token_id=eos, pad_token_id=0, **kwargs)
            assert got.shape == expected.shape and torch.equal(got, expected), (gen, kwargs)
        finally:
            ours.generation_config = {}
            reference.generation_config.update(**unset)
    ours.generation_config = {"max_length": 4}  # checked as an argument, naming where it came from
    try:
        with pytest.raises(ValueError, match=r"max_length \(from model.generation_config\) must be greater than the "
                                             r"prompt length \(input_ids has 9 tokens"):
            ours.generate(ids, mask)
        assert ours.generate(ids, mask, max_length=11, eos_token_id=[]).shape == (3, 11)  # an argument wins
    finally:
        ours.generation_config = {}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_min_new_tokens_matches_transformers(pair, static):
    ours, reference = pair
    ids, mask = padded_batch(ours.config.vocab_size, "left", seq=9)
    free = ours.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = [int(free[0, 9 + 1]), int(free[1, 9 + 2])]  # rows 0 and 1 stop at steps 1 and 2 without min_new_tokens
    lengths = set()
    for fewest in (0, 3, 6):
        expected = hf_generate(reference, ids, mask, max_new_tokens=12, min_new_tokens=fewest, eos_token_id=eos)
        got = ours.generate(ids, mask, max_new_tokens=12, min_new_tokens=fewest, eos_token_id=eos, pad_token_id=0,
                            static_cache=static)
        assert torch.equal(got, expected), fewest
        new = got[:, 9:]
        assert not torch.isin(new[:, :fewest], torch.tensor(eos)).any()  # no EOS before min_new_tokens
        lengths.add(tuple(next((i for i, t in enumerate(row) if t in eos), None) for row in new.tolist()))
    assert len(lengths) == 3, "min_new_tokens must change where rows stop"


def test_resolve_lengths():
    model = diffllama.DiffLlamaForCausalLM(tiny_config())
    assert resolve_lengths(model, 9) == (20, 0)
    assert resolve_lengths(model, 50) == (14, 0)  # 64 positions in all
    assert resolve_lengths(model, 9, max_length=np.int64(12), min_new_tokens=2) == (3, 2)
    assert resolve_lengths(model, 9, max_new_tokens=5, max_length=3) == (5, 0)  # max_length unused: not compared
    model.generation_config = {"max_new_tokens": 7, "min_new_tokens": 1}
    assert resolve_lengths(model, 9) == (7, 1) and resolve_lengths(model, 9, max_length=10) == (7, 1)
    assert resolve_lengths(model, 9, max_new_tokens=3, min_new_tokens=0) == (3, 0)
    with pytest.warns(UserWarning, match="min_new_tokens=9 is more than the 7 new tokens"):
        assert resolve_lengths(model, 9, min_new_tokens=9) == (7, 9)
    model.generation_config = {"min_new_tokens": -1}
    with pytest.raises(ValueError, match=r"min_new_tokens \(from model.generation_config\) must be >= 0, got -1"):
        resolve_lengths(model, 9)


def test_min_new_tokens_above_the_length_warns_and_generates_everything():
    torch.manual_seed(1)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).double().eval()
    ids = torch.randint(1, 96, (1, 5))
    free = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    stop = int(free[0, 5])  # the first new token: stops at once unless suppressed
    assert model.generate(ids, max_new_tokens=4, eos_token_id=stop).shape == (1, 6)
    with pytest.warns(UserWarning, match="min_new_tokens=9 is more than the 4 new tokens"):
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=9, eos_token_id=stop)
    assert out.shape == (1, 9) and stop not in out[0, 5:].tolist()


def test_num_beams_and_return_dict_in_generate():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.ones(1, 3, dtype=torch.long)
    plain = model.generate(ids, max_new_tokens=3, eos_token_id=[])
    for kwargs in (dict(num_beams=1), dict(num_beams=np.int64(1)), dict(return_dict_in_generate=False),
                   dict(return_dict_in_generate=None)):
        assert torch.equal(model.generate(ids, max_new_tokens=3, eos_token_id=[], **kwargs), plain)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    recorder = Recorder()
    for kwargs, error, match in [
        (dict(num_beams=4), NotImplementedError, "beam search is not supported: num_beams must be 1 .* got 4"),
        (dict(num_beams=0), ValueError, r"num_beams must be 1 \(beam search is not supported\), got 0"),
        (dict(num_beams=2.0), TypeError, "num_beams must be an int, got 2.0"),
        (dict(num_beams=True), TypeError, "num_beams must be an int, got True"),
        (dict(return_dict_in_generate=True), NotImplementedError, "return_dict_in_generate=True is not supported"),
        (dict(return_dict_in_generate=1), TypeError, "return_dict_in_generate must be a bool, got 1"),
    ]:
        with pytest.raises(error, match=match):
            model.generate(ids, max_new_tokens=3, streamer=recorder, **kwargs)
    assert calls == [] and recorder.calls == []


def test_repetition_penalty_matches_transformers(pair):
    ours, reference = pair
    ids = torch.randint(1, ours.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    expected = hf_generate(reference, ids, torch.ones_like(ids), max_new_tokens=20, repetition_penalty=1.7)
    got = ours.generate(ids, max_new_tokens=20, eos_token_id=[], repetition_penalty=1.7)
    assert torch.equal(got, expected)


def test_apply_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


# ---- sampling -------------------------------------------------------------------------------------------------------

PROBS = torch.tensor([[0.0625, 0.5, 0.125, 0.0625, 0.25]])  # dyadic: the cumulative sums are exact


def support(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


@pytest.mark.parametrize("top_k, top_p, kept", [
    (None, None, {0, 1, 2, 3, 4}),
    (1, None, {1}),
    (3, None, {1, 4, 2}),
    (10, None, {0, 1, 2, 3, 4}),
    (None, 0.5, {1}),          # the top token alone reaches 0.5
    (None, 0.7, {1, 4}),       # 0.5 < 0.7 <= 0.75
    (None, 0.75, {1, 4}),      # exactly reached by two tokens
    (None, 0.76, {1, 4, 2}),
    (None, 0.01, {1}),         # the most probable token is always kept
    (None, 1.0, {0, 1, 2, 3, 4}),
    (2, 0.6, {1}),             # top-k first: renormalised [2/3, 1/3], 2/3 >= 0.6
    (2, 0.7, {1, 4}),
])
def test_filter_logits_keeps_exact_support(top_k, top_p, kept):
    assert support(filter_logits(PROBS.log(), top_k, top_p)) == kept


def test_sampling_stays_in_support_and_follows_probabilities():
    logits = PROBS.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, do_sample=True, top_p=0.76, generator=gen)
    counts = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert set(draws.tolist()) == {1, 4, 2}
    expected = torch.tensor([0, 0.5, 0.125, 0, 0.25]) / 0.875
    assert (counts - expected).abs().max() < 0.03
    assert torch.equal(next_tokens(logits[:3], do_sample=True, top_k=1, generator=gen), torch.tensor([1, 1, 1]))
    cold = next_tokens(logits, do_sample=True, temperature=0.05, generator=gen)  # nearly greedy
    assert (cold == 1).float().mean() > 0.99


def test_tiny_temperature_acts_as_greedy():
    logits = torch.tensor([[100.0, 99.0, -50.0, 99.5], [-3.0, -1.0, -1.5, -80.0]])
    greedy = next_tokens(logits)
    gen = torch.Generator().manual_seed(0)
    for temperature in (1e-45, 1e-46, 1e-300, 1e-30):  # 1e-46 rounds to 0 in float32; the old code overflowed
        for _ in range(20):
            assert torch.equal(next_tokens(logits, do_sample=True, temperature=temperature, generator=gen), greedy)
    # the repetition penalty still sees the raw logits (its sign rule), top-k/top-p the shifted and scaled ones
    seen = torch.tensor([[True, False, False, False], [False, True, False, False]])
    penalised = next_tokens(logits, repetition_penalty=2.0, seen=seen)
    assert penalised.tolist() == [3, 2]
    tiny = dict(do_sample=True, temperature=1e-45, repetition_penalty=2.0, seen=seen, generator=gen)
    assert torch.equal(next_tokens(logits, top_k=2, top_p=0.5, **tiny), penalised)
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    expected = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    for seed in (0, 1):
        got = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=1e-45,
                             seed=seed)
        assert torch.equal(got, expected)


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, eos_token_id=[])
    a = model.generate(ids, mask, seed=123, **kwargs)
    torch.manual_seed(99)  # the global RNG does not matter with a seed
    b = model.generate(ids, mask, seed=123, **kwargs)
    c = model.generate(ids, mask, seed=124, **kwargs)
    d = model.generate(ids, mask, seed=123, static_cache=True, **kwargs)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, ignored", [
    (dict(temperature=0.7), "temperature=0.7"),
    (dict(top_k=5), "top_k=5"),
    (dict(temperature=0.7, top_k=5, top_p=0.9), "temperature=0.7, top_k=5, top_p=0.9"),
], ids=["temperature", "top_k", "all"])
def test_greedy_warns_about_ignored_sampling_settings(kwargs, ignored):
    """As transformers' GenerationConfig.validate: a UserWarning, not an error, and the greedy output unchanged."""
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    greedy = model.generate(ids, mask, max_new_tokens=3, do_sample=False)
    with pytest.warns(UserWarning, match=rf"^do_sample=False \(greedy decoding\) ignores {re.escape(ignored)}: these "
                                         r"settings only apply to sampling; pass do_sample=True"):
        out = model.generate(ids, mask, max_new_tokens=3, do_sample=False, **kwargs)
    assert torch.equal(out, greedy)


def test_greedy_with_default_sampling_settings_does_not_warn():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, mask, max_new_tokens=2, temperature=1.0, top_k=None, top_p=None)
        model.generate(ids, mask, max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=0)


def test_numpy_scalars_act_as_python_numbers():
    """numbers.Integral/Real scalars (numpy's here) are accepted and sample exactly as the Python numbers."""
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    plain = dict(max_new_tokens=12, do_sample=True, temperature=0.75, top_k=5, top_p=0.5, repetition_penalty=1.25)
    scalars = dict(max_new_tokens=np.int64(12), do_sample=True, temperature=np.float32(0.75), top_k=np.int32(5),
                   top_p=np.float16(0.5), repetition_penalty=np.float64(1.25))
    settings = resolve(model, **scalars)
    checked = {name: getattr(settings, name) for name in plain}
    assert checked == plain and [type(v) for v in checked.values()] == [int, bool, float, int, float, float]
    expected = model.generate(ids, mask, eos_token_id=[], seed=7, **plain)
    assert expected.shape == (3, 18)
    assert torch.equal(model.generate(ids, mask, eos_token_id=[], seed=np.uint8(7), **scalars), expected)


# ---- streaming ------------------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def test_streamer_and_stream_generate():
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    recorder = Recorder()
    out = model.generate(ids, mask, max_new_tokens=10, eos_token_id=[], streamer=recorder)
    assert torch.equal(recorder.calls[0], ids) and recorder.calls[-1] == "end"
    assert torch.equal(torch.stack(recorder.calls[1:-1], 1), out[:, 6:])
    steps = list(stream_generate(model, ids, mask, max_new_tokens=10, eos_token_id=[]))
    assert torch.equal(torch.stack(steps, 1), out[:, 6:])


def test_stream_text_matches_decode():
    from test_tokenizer import make_bytelevel

    tok = make_bytelevel()
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(vocab_size=tok.vocab_size, initializer_range=0.15)).eval()
    pieces = list(stream_text(model, tok, "Hello world", max_new_tokens=30, eos_token_id=[]))
    ids = torch.tensor([tok.encode("Hello world")])
    full = model.generate(ids, max_new_tokens=30, eos_token_id=[])
    assert "".join(pieces) == tok.decode(full[0, ids.shape[1]:])
    assert len(pieces) > 1


# ---- helpers and errors ---------------------------------------------------------------------------------------------

def test_pad_batch_and_positions():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [1, 1, 0]]
    with pytest.raises(ValueError, match="at least one token"):
        pad_batch([[1], []])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(do_sample=True, top_p=0.0), ValueError, "top_p must be None or in"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p must be None or in"),
    (dict(do_sample=True, top_k=0), ValueError, "top_k must be None or an int >= 1"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number, got nan"),
    (dict(do_sample=True, temperature=float("inf")), ValueError, "temperature must be a finite number, got inf"),
    (dict(do_sample=True, top_p=float("nan")), ValueError, "top_p must be a finite number, got nan"),
    (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty must be a finite number, got inf"),
    (dict(max_new_tokens=np.int64(0)), ValueError, "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=np.float64(3)), TypeError, r"max_new_tokens must be an int, got np.float64\(3.0\)"),
    (dict(do_sample=True, top_k=np.int64(0)), ValueError, r"top_k must be None or an int >= 1, got np.int64\(0\)"),
    (dict(do_sample=True, top_k=np.float32(5)), ValueError, r"top_k must be None or an int >= 1, got np.float32"),
    (dict(do_sample=True, top_k=True), ValueError, "top_k must be None or an int >= 1, got True"),
    (dict(do_sample=True, top_k=np.bool_(True)), ValueError, "top_k must be None or an int >= 1, got np.True_"),
    (dict(do_sample=True, temperature=np.float32(-0.5)), ValueError, "temperature must be > 0 when sampling"),
    (dict(temperature=np.float32("nan")), ValueError, r"temperature must be a finite number, got np.float32\(nan\)"),
    (dict(temperature=True), TypeError, "temperature must be a number, got True"),
    (dict(temperature=np.bool_(True)), TypeError, "temperature must be a number, got np.True_"),
    (dict(do_sample=True, top_p=np.float32(1.5)), ValueError, r"top_p must be None or in \(0, 1\], got np.float32"),
    (dict(do_sample=True, top_p=False), TypeError, "top_p must be a number, got False"),
    (dict(repetition_penalty=np.float64(0)), ValueError, r"repetition_penalty must be > 0 \(1.0 = off\)"),
    (dict(compile=True), ValueError, "compile=True needs static_cache=True"),
    (dict(streamer=object()), TypeError, "streamer must have put"),
    (dict(streamer=type("PutOnly", (), {"put": lambda self, tokens: None})()), TypeError, "put\\(tokens\\) and end\\(\\)"),
    (dict(pad_token_id=-5), ValueError, r"pad_token_id must lie in \[0, vocab_size=96\)"),
    (dict(pad_token_id=96), ValueError, r"pad_token_id must lie in \[0, vocab_size=96\)"),
    (dict(do_sample=True, seed="a"), TypeError, "seed must be None or an int, got 'a'"),
    (dict(do_sample=True, seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64 - 1\], got -1"),
    (dict(do_sample=True, seed=2 ** 64), ValueError, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
    (dict(eos_token_id="12"), TypeError, "eos_token_id must be None, an int, or a list, tuple or 0-d/1-D integer"),
    (dict(eos_token_id="abc"), TypeError, "eos_token_id must be None, an int, or a list"),
    (dict(eos_token_id=[1.7]), TypeError, r"eos_token_id must be None, an int, .* got \[1.7\]"),
    (dict(eos_token_id=True), TypeError, "eos_token_id must be None, an int, .* got True"),
    (dict(eos_token_id=[1, True]), TypeError, "eos_token_id must be None, an int"),
    (dict(eos_token_id=2.0), TypeError, "eos_token_id must be None, an int"),
    (dict(eos_token_id=torch.tensor([1.0])), TypeError, "eos_token_id must be .* got a torch.float32 tensor"),
    (dict(eos_token_id=torch.ones(2, 2, dtype=torch.long)), ValueError, r"eos_token_id .* tensor of shape \(2, 2\)"),
    (dict(eos_token_id=-5), ValueError, r"eos_token_id must hold ids in \[0, vocab_size=96\), got \[-5\]"),
    (dict(eos_token_id=[3, 10**6]), ValueError, r"eos_token_id must hold ids in \[0, vocab_size=96\), got \[1000000\]"),
    (dict(eos_token_id=torch.tensor(96)), ValueError, r"eos_token_id must hold ids in \[0, vocab_size=96\)"),
    (dict(pad_token_id=True), TypeError, r"pad_token_id must be None or an int in \[0, vocab_size=96\), got True"),
    (dict(pad_token_id=1.0), TypeError, r"pad_token_id must be None or an int in \[0, vocab_size=96\), got 1.0"),
    (dict(pad_token_id="1"), TypeError, "pad_token_id must be None or an int"),
    (dict(pad_token_id=torch.tensor(1)), TypeError, "pad_token_id must be None or an int"),
])
def test_bad_arguments(kwargs, error, match):
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(torch.ones(1, 3, dtype=torch.long), **kwargs)


def test_special_id_forms_and_config_defaults(tmp_path):
    model = diffllama.DiffLlamaForCausalLM(tiny_config(eos_token_id=7, pad_token_id=3)).eval()
    for eos in (5, [5], (5,), torch.tensor(5), torch.tensor([5]), torch.tensor([5], dtype=torch.int32)):
        assert resolve_special_ids(model, eos) == ([5], 3)
    assert resolve_special_ids(model, [5, 6], 4) == ([5, 6], 4)
    assert resolve_special_ids(model, []) == ([], 3)
    assert check_eos_token_id(None, 96) == []
    ids = torch.tensor([[1, 2, 4]])  # no pad id (3): no mask is inferred
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, 5])
    expected = model.generate(ids, max_new_tokens=6, eos_token_id=stop)
    assert expected.shape[1] <= 6  # stopped at the stop id
    for eos in ([stop], (stop,), torch.tensor(stop), torch.tensor([stop, 95])):
        assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=eos), expected)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 6]}')  # a list in a checkpoint: fine
    model.generation_config = read_generation_config(tmp_path)
    assert resolve_special_ids(model) == ([5, 6], 3)
    model.generation_config = {"eos_token_id": "5"}  # the configs' values are checked too, naming their source
    with pytest.raises(TypeError, match=r"eos_token_id \(from model.generation_config\) must be None, an int"):
        model.generate(ids, max_new_tokens=2)
    model.generation_config = {}
    model.config.eos_token_id = 96
    with pytest.raises(ValueError, match=r"eos_token_id \(from model.config\) must hold ids in \[0, vocab_size=96\)"):
        model.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("ids, kwargs, error, match", [
    (torch.ones(1, 3, dtype=torch.long) + 1000, {}, ValueError, "input_ids must lie in"),
    ([[1, 2]], {}, TypeError, "input_ids must be an integer tensor"),
    (torch.ones(1, 3), {}, TypeError, "input_ids must be an integer tensor"),
    (torch.ones(1, 3, dtype=torch.long), dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "left-padded"),
    (torch.ones(1, 3, dtype=torch.long), dict(eos_token_id="12"), TypeError, "eos_token_id must be None, an int"),
    (torch.ones(1, 3, dtype=torch.long), dict(pad_token_id=96), ValueError, "pad_token_id must lie in"),
    (torch.ones(1, 3, dtype=torch.long), dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (torch.ones(1, 3, dtype=torch.long), dict(seed=1.5), TypeError, "seed must be None or an int"),
    (torch.ones(1, 3, dtype=torch.long), dict(compile=True), ValueError, "compile=True needs static_cache=True"),
    (torch.ones(1, 3, dtype=torch.long), dict(max_length=3), ValueError,
     r"max_length must be greater than the prompt length \(input_ids has 3 tokens; max_length counts the prompt"),
    (torch.ones(1, 3, dtype=torch.long), dict(max_length=2.5), TypeError, "max_length must be an int, got 2.5"),
    (torch.ones(1, 3, dtype=torch.long), dict(max_length=True, max_new_tokens=2), TypeError,
     "max_length must be an int, got True"),
    (torch.ones(1, 3, dtype=torch.long), dict(min_new_tokens=-1), ValueError, "min_new_tokens must be >= 0, got -1"),
    (torch.ones(1, 3, dtype=torch.long), dict(min_new_tokens="2"), TypeError, "min_new_tokens must be an int"),
    (torch.ones(1, 64, dtype=torch.long), {}, ValueError, "fills max_position_embeddings=64"),
])
def test_checks_run_before_the_streamer_and_the_model(ids, kwargs, error, match):
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    forward_calls = []
    model.register_forward_pre_hook(lambda *args: forward_calls.append(1))
    recorder = Recorder()
    with pytest.raises(error, match=match):
        model.generate(ids, streamer=recorder, **kwargs)
    assert recorder.calls == [] and forward_calls == []
    with pytest.raises(error, match=match):  # stream_generate checks when called, not at its first step
        stream_generate(model, ids, **kwargs)


def test_stream_generate_checks_sync_every():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="sync_every must be an int >= 1, got 0"):
        stream_generate(model, torch.ones(1, 3, dtype=torch.long), sync_every=0)


def test_pad_is_checked_before_any_step_and_a_config_minus_one_falls_back():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.ones(2, 3, dtype=torch.long)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="pad_token_id must lie in"):  # every id is EOS: rows stop, then pad
        model.generate(ids, max_new_tokens=4, eos_token_id=list(range(96)), pad_token_id=-5)
    assert calls == []  # refused before the prefill
    model.config.pad_token_id = -1  # "no pad" in some configs: generation pads with the first EOS id
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    first = int(model(ids).logits[0, -1].argmax())  # row 0 stops at once; row 1 may go on, row 0 then padded
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[first])
    assert out.min() >= 0 and out[0, 3] == first and (out[0, 4:] == first).all()


def test_bad_inputs():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model.generate(ids, torch.ones(2, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_size=96"):
        model.generate(ids * 500, max_new_tokens=2)
    with pytest.raises(TypeError, match="integer tensor"):
        model.generate(ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="shape \\(batch, seq\\)"):
        model.generate(ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):  # as forward; not truncated to 0
        model.generate(ids, torch.full((2, 4), 0.5), max_new_tokens=2)
    assert torch.equal(model.generate(ids, torch.ones(2, 4), max_new_tokens=2),  # float 0/1 masks: as transformers
                       model.generate(ids, torch.ones(2, 4, dtype=torch.long), max_new_tokens=2))
    with pytest.raises(TypeError, match="attention_mask must be None or a torch.Tensor, got list"):
        model.generate(ids, [[1, 1, 1, 1]] * 2, max_new_tokens=2)


@pytest.mark.slow
def test_compiled_static_decode_matches_eager():
    """The compiled decode path (what runs on GPU, there also CUDA-graphed) computes the eager step's function."""
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(num_hidden_layers=1, num_key_value_heads=2,
                                                       initializer_range=0.15)).eval()
    ids, mask = padded_batch(96, "left", seq=6)
    eager = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    compiled = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], static_cache=True, compile=True)
    assert torch.equal(compiled, eager)


def test_repeated_compiled_generate_reuses_the_step(monkeypatch):
    """The compiled step and its static cache are the model's (``model.decode_state``, not a module global): a second
    generate(compile=True) of the same shape reuses them, compiling once; a copy of the model starts without them
    (they hold the original's tensors)."""
    import copy

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(num_hidden_layers=1, initializer_range=0.15)).eval()
    ids = torch.tensor([[5, 6, 7]])
    kwargs = dict(max_new_tokens=4, eos_token_id=[], static_cache=True, compile=True)
    first = model.generate(ids, **kwargs)
    state = model.decode_state
    second = model.generate(ids, **kwargs)
    assert len(compiled) == 1 and model.decode_state is state and state.cache.max_length == 256
    assert torch.equal(first, second) and torch.equal(first, model.generate(ids, max_new_tokens=4, eos_token_id=[]))
    assert copy.deepcopy({"decode_state": state}) == {"decode_state": None}  # what a copy of the model holds


def test_an_unknown_generation_argument_is_named_by_generate():
    """Was "resolve_generation_settings() got an unexpected keyword argument": a function the caller never called."""
    model = diffllama.DiffLlamaForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    with pytest.raises(TypeError, match=r"generate\(\) got unknown arguments \['foo'\]; the generation arguments "
                                        r"are \['compile', 'do_sample', "):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, foo=1)


def test_compile_refuses_dynamic_rope_before_any_work(monkeypatch):
    """Dynamic NTK RoPE recomputes its frequencies from state kept between calls (a host-side branch): refused by
    name before the cache, the projection fusion or Dynamo see it, instead of a data-dependent error inside Dynamo."""
    config = tiny_config(num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                               "factor": 2.0})
    model = diffllama.DiffLlamaForCausalLM(config).eval()
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compiled.append(args))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="rope_type 'dynamic' cannot be compiled"):
        model.generate(ids, max_new_tokens=2, static_cache=True, compile=True)
    with pytest.raises(ValueError, match="rope_type 'dynamic' cannot be compiled"):
        DecodeStep(model, StaticCache.from_config(config, 1, 8, torch.float32), compile=True)
    assert not compiled and not is_prepared(model)
    assert model.generate(ids, max_new_tokens=2, static_cache=True).shape == (1, 5)  # uncompiled: as before


@pytest.mark.slow
def test_compiled_rotary_gives_float32_angles_in_bf16():
    """Dynamo and AOTAutograd (what the compiled decode step goes through before Inductor; Inductor itself takes
    ~30 s here, see test_compiled_static_decode_matches_eager) trace the rotary module with its float32 buffers:
    in a bfloat16 model its cos/sin at positions up to 32767 are transformers' (float32 angles rounded once)."""
    from transformers.models.diffllama import modeling_diffllama as hf

    from conftest import hf_config

    config = tiny_config(rope_parameters={"rope_type": "longrope", "rope_theta": 500000.0,
                                          "original_max_position_embeddings": 32,
                                          "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [4.0, 5.0, 6.0, 8.0]})
    rotary = diffllama.DiffLlamaForCausalLM(config).bfloat16().model.rotary_emb
    step = torch.compile(rotary, fullgraph=True, dynamic=False, backend="aot_eager")
    reference = hf.DiffLlamaRotaryEmbedding(hf_config(config))
    x = torch.zeros(1, dtype=torch.bfloat16)
    for pos in (torch.tensor([[5]]), torch.tensor([[1000]]), torch.tensor([[32767]])):  # short, then long factors
        for got, ref in zip(step(x, pos), reference(x, pos)):
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, ref), (pos, (got.float() - ref.float()).abs().max())
