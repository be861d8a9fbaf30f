"""`diffllama serve` end to end: the real server (uvicorn on a free loopback port) and the official `openai` client.

Greedy outputs are compared with `generate` of the request alone (float32, CPU); every error case checks its status
and OpenAI's error body; cancellations and load end with every cache slot free.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import diffllama  # noqa: E402
from conftest import tiny_config  # noqa: E402
from diffllama.serve import api  # noqa: E402
from diffllama.serve.engine import Engine, Request, SamplingParams  # noqa: E402
from test_serve_engine import _one_thread  # noqa: E402,F401  (the autouse fixture: one BLAS thread)
from test_tokenizer import make_bytelevel  # noqa: E402

# A minimal ChatML-like template (the shape of many hub templates).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_BATCH = 8
MAX_SEQ_LEN = 128
PROMPTS = [f"The quick brown fox {'jumps ' * (i % 5)}over {i}" for i in range(32)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer, hidden-32 model with a byte-level BPE tokenizer and a chat template."""
    directory = tmp_path_factory.mktemp("serve_ckpt")
    tok = make_bytelevel()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=2, initializer_range=0.15,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    diffllama.DiffLlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_app(directory, *, max_batch=MAX_BATCH, max_queue=64, prefill_chunk=16, template=True, **kwargs):
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tok = diffllama.Tokenizer.from_pretrained(directory)
    engine = Engine(model, tok, max_batch=max_batch, max_seq_len=MAX_SEQ_LEN, max_queue=max_queue,
                    prefill_chunk=prefill_chunk)
    return api.create_app(engine, tok, "tiny", chat_template=api.load_chat_template(directory) if template else None,
                          **kwargs)


@pytest.fixture(scope="module")
def server(checkpoint):
    """The app served by uvicorn in a thread on a free loopback port; yields (base_url, app)."""
    import uvicorn

    app = make_app(checkpoint)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tok = diffllama.Tokenizer.from_pretrained(checkpoint)
    return model, tok


def client(base_url, **kwargs):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=kwargs.pop("api_key", "none"), timeout=30,
                         max_retries=0, **kwargs)


def greedy_ids(reference, ids, n) -> list[int]:
    """`generate` of ``ids`` alone: n new tokens at most, the EOS (if any) dropped."""
    model, tok = reference
    out = model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()
    return out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def wait_free(app, timeout=10.0) -> None:
    engine = app.state.engine
    deadline = time.monotonic() + timeout
    while engine.free_slots() != engine.max_batch or engine.stats.running:
        assert time.monotonic() < deadline, f"slots leaked: {engine.free_slots()} of {engine.max_batch} free"
        time.sleep(0.02)


# ---- completions and chat -------------------------------------------------------------------------------------------

def test_completion_greedy_equals_generate(server, reference):
    base, _ = server
    model, tok = reference
    ids = tok.encode(PROMPTS[3])
    want = greedy_ids(reference, ids, 12)
    out = client(base).completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].text == tok.decode(want)
    assert out.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)
    assert out.usage.total_tokens == len(ids) + 12
    # token ids as the prompt, echo: the prompt's text comes first
    echoed = client(base).completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == tok.decode(ids) + tok.decode(want)


def test_completion_stream_and_logprobs(server, reference):
    base, _ = server
    model, tok = reference
    ids = tok.encode(PROMPTS[1])
    stream = client(base).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                             logprobs=2, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = greedy_ids(reference, ids, 8)
    assert text == tok.decode(want)
    token_logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs
                      for lp in c.choices[0].logprobs.token_logprobs]
    with torch.no_grad():  # the model's log-softmax at each position, computed in one forward pass
        logits = model(torch.tensor([ids + want])).logits[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(8), torch.tensor(want)]
    assert torch.allclose(torch.tensor(token_logprobs), expected, atol=1e-4)
    top = [c.choices[0].logprobs.top_logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    # two alternatives each (fewer keys when both decode to the same text, e.g. halves of one UTF-8 character)
    assert all(1 <= len(t[0]) <= 2 and max(t[0].values()) >= lp - 1e-6 for t, lp in zip(top, token_logprobs))


def test_echo_with_prompt_logprobs(server, reference):
    base, _ = server
    model, tok = reference
    ids = tok.encode(PROMPTS[5])  # longer than the prefill chunk (16): logprobs cross a chunk boundary
    out = client(base).completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                          logprobs=0)
    logprobs = out.choices[0].logprobs.token_logprobs
    assert len(logprobs) == len(ids) + 1 and logprobs[0] is None
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(logprobs[1:-1]), expected, atol=1e-4)


def test_chat_stream_and_not(server, reference):
    base, _ = server
    model, tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = api.ChatTemplate(CHAT_TEMPLATE, tok).render(messages)
    assert prompt == "<s><|system|>Be brief.\n<|user|>Hello there\n<|assistant|>"
    want = tok.decode(greedy_ids(reference, tok.encode(prompt, add_special_tokens=False), 10))
    out = client(base).chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    chunks = list(client(base).chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                       temperature=0, stream=True, logprobs=True, top_logprobs=1))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    content = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(content) == out.usage.completion_tokens - (out.choices[0].finish_reason == "stop")
    assert all(len(e.top_logprobs) == 1 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)


def test_sampling_n_seed_stop(server, reference):
    base, _ = server
    model, tok = reference
    c = client(base)
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, top_p=0.9, seed=3, n=2,
                  extra_body={"top_k": 20, "ignore_eos": True})
    first, second = c.completions.create(**kwargs), c.completions.create(**kwargs)
    assert [ch.index for ch in first.choices] == [0, 1]
    assert [ch.text for ch in first.choices] == [ch.text for ch in second.choices]
    assert first.choices[0].text != first.choices[1].text  # each choice has its own seed
    assert first.usage.completion_tokens == 20
    # a stop string cuts the text before it; a stop id ends it at that token
    ids = tok.encode(PROMPTS[2])
    full = tok.decode(greedy_ids(reference, ids, 16))
    stop = full[5:8]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    want = greedy_ids(reference, ids, 16)
    by_id = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                 extra_body={"stop_token_ids": [want[4]]})
    assert by_id.choices[0].text == tok.decode(want[:want.index(want[4])])


def test_32_concurrent_streams_equal_generate_alone(server, reference):
    """More clients than slots: requests queue, join and leave the batch mid-stream; each output is that of the
    request alone; afterwards every slot is free and /metrics counts the work."""
    base, app = server
    model, tok = reference
    lengths = [4 + (i * 7) % 13 for i in range(32)]

    def run(i):
        stream = client(base).completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i],
                                                 temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(run, range(32)))
    for i, text in enumerate(texts):
        assert text == tok.decode(greedy_ids(reference, tok.encode(PROMPTS[i]), lengths[i])), i
    wait_free(app)
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert "diffllama_queue_length 0" in metrics and "diffllama_running_requests 0" in metrics
    ttft_count = "diffllama_time_to_first_token_seconds_count"
    count = next(line for line in metrics.splitlines() if line.startswith(ttft_count))
    assert int(count.split()[1]) >= 32
    assert "diffllama_inter_token_latency_seconds_bucket{le=\"+Inf\"}" in metrics
    assert "# TYPE diffllama_generation_tokens_per_second gauge" in metrics


def test_mixed_load_ends_with_no_leaked_slots(server):
    """Abandoned streams, sampled n=2, chat streams and stop strings at once: all answered, no slot leaked."""
    base, app = server
    finished = dict(app.state.engine.stats.finished)

    def run(i):
        c = client(base)
        if i % 4 == 0:  # read two events, then hang up
            body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 100, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=10) as response:
                events = (line for line in response.iter_lines() if line.startswith("data:"))
                next(events), next(events)
            return "abandoned"
        if i % 4 == 1:
            out = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=6, n=2, seed=i,
                                       extra_body={"top_k": 5})
            return out.choices[1].finish_reason
        if i % 4 == 2:
            stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[i]}],
                                               max_tokens=6, temperature=0, stream=True)
            return [chunk.choices[0].finish_reason for chunk in stream][-1]
        out = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=8, temperature=0, stop=["e"],
                                   logprobs=1)
        assert "e" not in out.choices[0].text
        return out.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    assert results.count("abandoned") == 4 and all(r in ("stop", "length") for r in results if r != "abandoned")
    wait_free(app)
    after = app.state.engine.stats.finished
    # >= 1, not 4: on a busy machine a stream can reach its max_tokens before its hang-up reaches the server
    assert after.get("cancelled", 0) - finished.get("cancelled", 0) >= 1
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_disconnect_mid_stream_frees_slot(server):
    base, app = server
    engine = app.state.engine
    cancelled = engine.stats.finished.get("cancelled", 0)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 110, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine.free_slots() == MAX_BATCH - 1
    wait_free(app)  # the connection is closed: the engine cancelled the request and freed its slot
    assert engine.stats.finished.get("cancelled", 0) == cancelled + 1


def test_models_health(server):
    base, _ = server
    assert [m.id for m in client(base).models.list().data] == ["tiny"]
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}


# ---- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "hi " * 200}, "prompt"),
    ({"prompt": "hi", "max_tokens": MAX_SEQ_LEN}, "max_tokens"),
    ({"prompt": [1, 2, 100000]}, "prompt"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "hi", "stream": "abc"}, "stream"),
    ({"prompt": 5}, "prompt"),
], ids=["temperature", "top_p", "n", "max_tokens", "logprobs", "unknown", "penalty", "missing", "too-long",
        "too-many-new", "bad-id", "bad-stop-id", "five-stops", "stream-type", "prompt-type"])
def test_bad_requests_400_name_the_field(server, body, param):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", json={"model": "tiny", **body}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_bad_json_unknown_model_and_chat_fields(server):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as info:
        client(base).completions.create(model="other", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client(base).chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    assert info.value.body["param"] == "messages[0].role"
    response = httpx.get(f"{base}/v2/nothing", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_chat_without_template_400(checkpoint):
    from fastapi.testclient import TestClient

    app = make_app(checkpoint, template=False)  # no lifespan: the engine never starts; the error comes first
    response = TestClient(app).post("/v1/chat/completions",
                                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "no_chat_template" and "chat template" in error["message"]


def test_api_key_401(checkpoint):
    from fastapi.testclient import TestClient

    app = make_app(checkpoint, api_key="s3cret")
    with TestClient(app) as http:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = http.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200  # open, for load balancers' health checks


def test_full_queue_429_and_timeout_408(checkpoint):
    from fastapi.testclient import TestClient

    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    app = make_app(checkpoint, max_batch=1, max_queue=0)  # not started: the request below stays queued
    app.state.engine.submit(Request([1, 2], SamplingParams(max_tokens=2), lambda out: None))  # takes the one slot
    response = TestClient(app).post("/v1/completions", json=body)
    assert response.status_code == 429 and response.json()["error"] == {
        "message": "the server is busy: the queue holds 0 requests waiting for a slot (--max-queue 0); retry later",
        "type": "rate_limit_error", "param": None, "code": "queue_full"}
    with TestClient(make_app(checkpoint, request_timeout=1e-4)) as http:
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
        events = http.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
        assert json.loads(events[0][len("data: "):])["error"]["code"] == "request_timeout"
        assert events[1] == "data: [DONE]"
        wait_free(http.app)


def test_exposure_warning():
    assert api.exposure_warning("0.0.0.0", None, euid=0) is not None
    for host, key, euid in (("127.0.0.1", None, 0), ("::1", None, 0), ("0.0.0.0", "k", 0), ("0.0.0.0", None, 1000)):
        assert api.exposure_warning(host, key, euid=euid) is None


@pytest.mark.slow
def test_cli_serve_sigterm_finishes_streams(checkpoint):
    """The real command in a subprocess: a stream in flight when SIGTERM arrives still ends with [DONE], then the
    server exits (uvicorn re-raises the signal once shut down, so the exit status is -SIGTERM)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffllama", "serve", str(checkpoint), "--port", str(port),
                             "--max-batch", "2", "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": str(checkpoint), "prompt": "Hello", "max_tokens": 40, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        events = [json.loads(line[6:]) for line in [first] + rest[:-1]]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events if e["choices"][0]["text"] or e["choices"][0]["finish_reason"]) >= 1
        assert proc.wait(30) == -signal.SIGTERM
        log = proc.stderr.read()
        assert "serving" in log and "Finished server process" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- request validation (no engine needed: each error comes before the request is queued) ---------------------

@pytest.fixture(scope="module")
def bare(checkpoint):
    """A TestClient of an app whose engine never starts (no lifespan): for requests refused before queueing."""
    from fastapi.testclient import TestClient

    return TestClient(make_app(checkpoint))


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens",
     "max_tokens: Input should be a valid integer (got True)"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens",
     "max_tokens: Input should be a valid integer (got '5')"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream",
     "stream: Input should be a valid boolean (got 'yes')"),
    ("/v1/completions", {"prompt": "hi", "user": 5}, "user", "user: Input should be a valid string (got 5)"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options: only allowed when stream is true"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "stream_options.include_usage: Input should be a valid boolean (got 1)"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("nan")}, "temperature",
     "temperature: Input should be a finite number (got nan)"),
    ("/v1/completions", {"prompt": "hi", "top_p": float("inf")}, "top_p",
     "top_p: Input should be a finite number (got inf)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model", "model: field required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, "messages[0].content",
     "messages[0].content: field required"),
    ("/v1/chat/completions", {**CHAT, "messages": [CHAT["messages"][0], {"role": "assistant", "content": None}]},
     "messages[1].content", "messages[1].content: Input should be a valid string (got None)"),
], ids=["max_tokens-bool", "max_tokens-str", "stream-str", "user-int", "stream_options-without-stream",
        "include_usage-int", "nan", "inf", "no-model", "no-content", "null-content"])
def test_strict_types_400_name_the_field(bare, path, body, param, message):
    # allow_nan: httpx would refuse NaN; Python's json (which FastAPI reads with) accepts the NaN/Infinity literals
    body = {"model": "tiny", **body} if path == "/v1/completions" else body
    response = bare.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}


@pytest.mark.parametrize("content, headers", [
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"5", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"", {}),
    (b'{"model": "tiny", "prompt": "hi"}', {"content-type": "text/plain"}),
], ids=["array", "number", "empty", "no-body", "text-plain"])
def test_body_not_a_json_object_400(bare, content, headers):
    response = bare.post("/v1/completions", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": "the request body must be a JSON object",
                                        "type": "invalid_request_error", "param": None, "code": None}


def test_messages_too_long_grammar(bare):
    response = bare.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user",
                                                                              "content": "hi " * 200}]})
    assert response.status_code == 400
    assert "but the messages have " in response.json()["error"]["message"]


# ---- `diffllama serve` arguments: each refused in one line before the model loads -----------------------------

@pytest.fixture
def serve_cli(monkeypatch):
    """Run `diffllama serve ARGS` in-process; loading the model fails the test (every refusal must come first)."""
    from typer.testing import CliRunner

    from diffllama import cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(diffllama.DiffLlamaForCausalLM, "from_pretrained", no_load)
    return lambda *args: CliRunner().invoke(cli.app, ["serve", *map(str, args)])


def test_cli_serve_refuses_bad_arguments_before_loading(serve_cli, checkpoint):
    port = free_port()
    cases = [
        (["--port", 70000], 2, "error: --port must be in [0, 65535], got 70000"),
        (["--port", -1], 2, "error: --port must be in [0, 65535], got -1"),
        (["--max-seq-len", 1], 2, "error: --max-seq-len must be >= 2, got 1"),
        (["--max-seq-len", 129], 2, "error: --max-seq-len 129 exceeds the model's max_position_embeddings (128)"),
        (["--max-seq-len", 10 ** 12], 2,
         f"error: --max-seq-len {10 ** 12} exceeds the model's max_position_embeddings (128)"),
        (["--chat-template", "/missing.jinja"], 2,
         "error: --chat-template '/missing.jinja': [Errno 2] No such file or directory: '/missing.jinja'"),
        (["--host", "203.0.113.7", "--port", port], 2,  # TEST-NET-3: never this machine's address
         f"error: --host '203.0.113.7': cannot bind 203.0.113.7:{port}: [Errno 99] Cannot assign requested "
         f"address"),
    ]
    for args, code, line in cases:
        result = serve_cli(checkpoint, *args)
        assert (result.exit_code, result.output.strip()) == (code, line), args


def test_cli_serve_port_in_use(serve_cli, checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve_cli(checkpoint, "--port", port)
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: --port {port}: 127.0.0.1:{port} is already in use (another server?): "
                                     f"pick another --port or stop that process")
