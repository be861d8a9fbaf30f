"""The serving engine without HTTP: per-row cache writes, parity with `generate` under chunked prefill, stop-string
hold-back, queue bounds, and recovery from a failed step."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import diffllama
from conftest import tiny_config
from diffllama.serve.engine import Engine, QueueFull, Request, SamplingParams, SlotCache
from test_tokenizer import make_bytelevel


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The engine thread and the test's `generate` share two cores: one BLAS thread each avoids oversubscription
    # (tens of times slower on a busy machine). Results do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return make_bytelevel()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=2, initializer_range=0.15,
                         max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    return diffllama.DiffLlamaForCausalLM(config).eval()


def run(engine, prompts, params) -> list[list]:
    """Submit every prompt and step the engine in this thread until all have finished; the outputs of each."""
    outs = [[] for _ in prompts]
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.submit(Request(ids, p, outs[i].append))
    for _ in range(1000):
        if all(o and o[-1].finish_reason for o in outs):
            return outs
        with torch.inference_mode():
            engine.step()
    raise AssertionError("the engine did not finish")


def test_slot_cache_writes_each_row_at_its_position():
    keys = [torch.zeros(3, 2, 5, 4)]
    values = [torch.zeros(3, 2, 5, 4)]
    view = SlotCache([keys[0][:2]], [values[0][:2]], row_positions=torch.tensor([3, 1]))
    new = torch.arange(16.0).reshape(2, 2, 1, 4)
    k, v = view.update(0, new, -new)
    assert torch.equal(keys[0][0, :, 3], new[0, :, 0]) and torch.equal(keys[0][1, :, 1], new[1, :, 0])
    assert torch.equal(values[0][1, :, 1], -new[1, :, 0])
    assert int((keys[0] != 0).sum()) == 15  # 16 values, one of them 0; nothing else written, row 2 untouched
    assert k.shape == (2, 2, 5, 4)
    # without row positions it is a StaticCache: shared slots
    shared = SlotCache([keys[0][2:]], [values[0][2:]])
    shared.update(0, torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), torch.tensor([0, 1]))
    assert torch.equal(keys[0][2, :, :2], torch.ones(2, 2, 4)) and shared.get_seq_length() == 2


def test_chunked_prefill_and_batching_equal_generate(model, tok):
    """Prompts longer than the prefill chunk, more requests than slots, different lengths: each output is the
    greedy continuation of `generate` alone, token for token."""
    engine = Engine(model, tok, max_batch=3, max_seq_len=64, prefill_chunk=5)
    prompts = [tok.encode("one two three " * (i + 1)) for i in range(5)]
    lengths = [3, 9, 5, 12, 7]
    outs = run(engine, prompts, [SamplingParams(max_tokens=n, temperature=0, eos_token_ids=[]) for n in lengths])
    for ids, n, out in zip(prompts, lengths, outs):
        want = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])[0, len(ids):].tolist()
        assert [t for o in out for t in o.token_ids] == want
        assert out[-1].finish_reason == "length" and out[-1].completion_tokens == n
        assert out[-1].prompt_tokens == len(ids)
        assert "".join(o.text for o in out) == tok.decode(want)
    assert engine.free_slots() == 3


def test_sampled_rows_drawn_together_keep_their_settings(model, tok):
    """Unseeded rows with equal settings draw in one call: top_k=1 must still give the greedy tokens, and a seeded
    row reproduces its draw whatever runs beside it."""
    engine = Engine(model, tok, max_batch=4, max_seq_len=64)
    ids = tok.encode("Hello world")
    want = model.generate(torch.tensor([ids]), max_new_tokens=6, eos_token_id=[])[0, len(ids):].tolist()
    top1 = SamplingParams(max_tokens=6, temperature=1.0, top_k=1, eos_token_ids=[])
    seeded = SamplingParams(max_tokens=6, temperature=1.5, seed=11, eos_token_ids=[])
    outs = run(engine, [ids] * 4, [top1, top1, top1, seeded])
    assert all([t for o in out for t in o.token_ids] == want for out in outs[:3])
    alone = run(engine, [ids], [seeded])[0]
    assert [t for o in alone for t in o.token_ids] == [t for o in outs[3] for t in o.token_ids]


def test_stop_string_held_back_and_cut(model, tok):
    engine = Engine(model, tok, max_batch=1, max_seq_len=64)
    ids = tok.encode("Hello world")
    full = run(engine, [ids], [SamplingParams(max_tokens=16, temperature=0, eos_token_ids=[])])[0]
    text = "".join(o.text for o in full)
    stop = text[6:9]
    out = run(engine, [ids], [SamplingParams(max_tokens=16, temperature=0, eos_token_ids=[], stop=[stop])])[0]
    assert "".join(o.text for o in out) == text[:text.index(stop)]
    assert out[-1].finish_reason == "stop"
    assert all(stop not in o.text for o in out)


def test_arguments_and_queue_bound(model, tok):
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Engine(model, tok, max_batch=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=0)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"^max_seq_len {10 ** 12} exceeds the model's max_position_embeddings "
                                         rf"\({limit}\)$"):
        Engine(model, tok, max_seq_len=10 ** 12)  # refused before allocating (it would need terabytes)
    engine = Engine(model, tok, max_batch=1, max_seq_len=32, max_queue=1)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit(Request([1] * 32, SamplingParams(max_tokens=1), lambda out: None))
    with pytest.raises(ValueError, match="vocab_size"):
        engine.submit(Request([1, tok.vocab_size], SamplingParams(max_tokens=1), lambda out: None))
    engine.submit(Request([1, 2], SamplingParams(max_tokens=2), lambda out: None))  # takes the free slot
    engine.submit(Request([1, 2], SamplingParams(max_tokens=2), lambda out: None))  # the one queued
    with pytest.raises(QueueFull, match=r"the queue holds 1 requests waiting for a slot \(--max-queue 1\)"):
        engine.submit(Request([1, 2], SamplingParams(max_tokens=2), lambda out: None))


def test_burst_accepts_max_batch_plus_max_queue(model, tok):
    """Six requests at once (the engine thread has admitted none yet) with 2 slots and --max-queue 1: 2 will run
    and 1 waits, so 3 are accepted and 3 refused."""
    engine = Engine(model, tok, max_batch=2, max_seq_len=32, max_queue=1)
    outcomes = []
    for _ in range(6):
        try:
            engine.submit(Request([1, 2], SamplingParams(max_tokens=2), lambda out: None))
            outcomes.append("accepted")
        except QueueFull:
            outcomes.append("full")
    assert outcomes == ["accepted"] * 3 + ["full"] * 3


def test_failed_step_fails_its_requests_and_the_engine_goes_on(model, tok, monkeypatch):
    engine = Engine(model, tok, max_batch=2, max_seq_len=32)
    real = model.forward
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    engine.start()
    try:
        results = []
        for _ in range(2):
            done = threading.Event()
            outs = []
            engine.submit(Request([1, 5, 7], SamplingParams(max_tokens=3, temperature=0, eos_token_ids=[]),
                                  lambda out, outs=outs, done=done: (outs.append(out),
                                                                     out.finish_reason and done.set())))
            assert done.wait(30)
            results.append(outs[-1])
    finally:
        engine.stop(10)
    assert results[0].finish_reason == "error" and "simulated" in results[0].error
    assert results[1].finish_reason == "length" and results[1].completion_tokens == 3
    assert engine.free_slots() == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine(model, tok):
    """On a GPU: float32 (flash falls back to sdpa there) equals `generate` alone token for token; bfloat16 (the flash
    prefill and decode kernels, with per-row key padding) runs every request to its length and frees every slot."""
    prompts = [tok.encode("one two three " * (i + 1)) for i in range(5)]
    lengths = [3, 9, 5, 12, 7]
    for dtype in (torch.float32, torch.bfloat16):
        config = copy.deepcopy(model.config)
        config.attn_implementation = "auto"
        cuda = diffllama.DiffLlamaForCausalLM(config)
        cuda.load_state_dict(model.state_dict())
        cuda = cuda.to("cuda", dtype).eval()
        engine = Engine(cuda, tok, max_batch=3, max_seq_len=64, prefill_chunk=5)
        outs = run(engine, prompts, [SamplingParams(max_tokens=n, temperature=0, eos_token_ids=[]) for n in lengths])
        assert engine.free_slots() == 3
        for ids, n, out in zip(prompts, lengths, outs):
            got = [t for o in out for t in o.token_ids]
            assert len(got) == n and out[-1].finish_reason == "length"
            if dtype == torch.float32:
                want = cuda.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, eos_token_id=[])
                assert got == want[0, len(ids):].tolist()
