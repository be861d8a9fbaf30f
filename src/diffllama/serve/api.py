"""The OpenAI-compatible HTTP API over an :class:`~diffllama.serve.engine.Engine` (FastAPI, pydantic, SSE).

Endpoints follow OpenAI's API reference (https://platform.openai.com/docs/api-reference): ``POST /v1/completions``
and ``POST /v1/chat/completions`` (non-streaming JSON, or server-sent events ending with ``data: [DONE]`` when
``stream`` is true), ``GET /v1/models``; plus ``GET /health`` and ``GET /metrics`` (Prometheus text).

Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON, a body that is
not a JSON object, unknown fields, wrong JSON types (strict: no coercion), non-finite numbers, out-of-range values
and prompts that do not fit the context (``param`` names the field, e.g. ``messages[0].content``), 401 for a missing
or wrong API key, 404 for an unknown model or path, 408 when a request runs past ``request_timeout``, 429 when the
queue is full, 503 while shutting down. A streaming request that fails after its first event gets one event
``{"error": ...}`` before ``[DONE]``.

Beyond OpenAI's fields (as vLLM offers them): ``top_k``, ``stop_token_ids`` and ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffllama.serve.engine import EngineStopped, Output, QueueFull, Request, SamplingParams
from diffllama.serve.metrics import ServerMetrics
from diffllama.generation import resolve_generation_settings, with_tokenizer_eos

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # OpenAI's bound for top_logprobs
MAX_STOP = 4  # OpenAI's bound for stop strings


class APIError(Exception):
    """An error answered with OpenAI's error body.

    Args:
        status: HTTP status. message: what went wrong and what to do. type: OpenAI's error type.
        param: the request field at fault, or None. code: OpenAI's machine-readable code, or None.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        """The JSON response: this status and OpenAI's error body."""
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param,
                                                                        self.code))


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request models -----------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    """Unknown fields, wrong JSON types and non-finite numbers are 400s, as in OpenAI's API: strict mode refuses
    ``"5"`` or ``true`` for an int, ``"yes"`` for a bool, a number for a string (a float field still takes a JSON
    integer); NaN and Infinity (which Python's JSON parser reads) would pass or confuse the range checks."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _null_is_default(cls, value, info):
    """An explicit JSON null takes the field's default, as OpenAI's API does for its optional fields."""
    return cls.model_fields[info.field_name].default if value is None else value


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage counts (and no choices)."""

    include_usage: bool = False


class _Sampling(_Strict):
    """The fields completions and chat share (OpenAI's names, ranges and defaults)."""

    model: str  # required, as OpenAI requires it
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="None, -1 or 0: off (vLLM's convention); else >= 1")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    user: str | None = None

    _defaults = field_validator("n", "stream", "temperature", "top_p", "presence_penalty", "frequency_penalty",
                                "ignore_eos", mode="before")(classmethod(_null_is_default))

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        values = [value] if isinstance(value, str) else value or []
        if len(values) > MAX_STOP or any(not s for s in values):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings")
        return values

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value):
        if value != 0:
            raise ValueError("only 0 is supported")
        return value


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of
    lists of ids (one choice set per prompt); ``logprobs`` is the number of alternatives (0..20) per token."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    _echo_default = field_validator("echo", mode="before")(classmethod(_null_is_default))


class TextPart(_Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message; ``content`` is a string or a list of text parts, required for every role (OpenAI lets only an
    assistant message with ``tool_calls`` omit it, and tool calls are not supported here)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` rendered by the tokenizer's chat template; ``logprobs`` a bool
    and ``top_logprobs`` the number of alternatives (0..20, needs ``logprobs``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    _logprobs_default = field_validator("logprobs", mode="before")(classmethod(_null_is_default))


# ---- chat template ------------------------------------------------------------------------------------------------

def load_chat_template(directory: str | Path | None, file: str | Path | None = None) -> str | None:
    """The Jinja chat template: ``file``'s text when given, else the checkpoint's ``chat_template.jinja``, else
    tokenizer_config.json's ``chat_template`` (a string, or transformers' list of ``{"name", "template"}``, of
    which "default"); None when there is none.

    Raises:
        FileNotFoundError: ``file`` does not exist. ValueError: a ``chat_template`` entry of another shape.
    """
    if file is not None:
        return Path(file).read_text(encoding="utf-8")
    if directory is None:
        return None
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config_file}: chat_template must be a string or a list of {{name, template}}, got "
                         f"{type(template).__name__}")
    return template


class ChatTemplate:
    """A compiled chat template, rendered as transformers' ``apply_chat_template(messages,
    add_generation_prompt=True)`` does: a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``, the
    ``raise_exception`` function, and the tokenizer's special tokens as variables.

    Raises:
        ValueError: a template Jinja cannot parse.
    """

    def __init__(self, source: str, tokenizer) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"chat template: {error}") from error
        self.special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token")}

    def render(self, messages: list[dict]) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn.

        Raises:
            APIError: 400 when the template refuses the messages (its ``raise_exception``) or fails.
        """
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as error:
            raise APIError(400, f"the chat template refused the messages: {error}", param="messages") from error


# ---- the app ------------------------------------------------------------------------------------------------------

def create_app(engine, tokenizer, model_name: str, *, api_key: str | None = None,
               request_timeout: float | None = 600.0, chat_template: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and stopped with the app's lifespan).

    Args:
        engine: an :class:`~diffllama.serve.engine.Engine` (not yet started). tokenizer: its
            :class:`diffllama.Tokenizer`. model_name: the id /v1/models lists and requests may name.
        api_key: when set, /v1/ requests need ``Authorization: Bearer <api_key>`` (401 otherwise).
        request_timeout: seconds a request may take in all (408 after; None: no limit).
        chat_template: the Jinja source (see :func:`load_chat_template`); None: chat answers 400.
    """
    from contextlib import asynccontextmanager

    template = ChatTemplate(chat_template, tokenizer) if chat_template else None
    metrics = ServerMetrics()
    engine.stats.on_ttft, engine.stats.on_itl = metrics.ttft.observe, metrics.itl.observe
    created = int(time.time())
    eos_ids = _eos_ids(engine.model, tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop(timeout=30)

    app = FastAPI(title="diffllama", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error: RequestValidationError):
        return _validation_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(status_code=error.status_code, content=error_body(str(error.detail), kind),
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, error: Exception):
        return JSONResponse(status_code=500, content=error_body(f"internal error: {type(error).__name__}: {error}",
                                                                "internal_server_error"))

    @app.middleware("http")
    async def _authorize(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise APIError(503, f"engine failed: {engine.error}", "internal_server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine.stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(name, model_name)
        return _model_card(model_name, created)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: HTTPRequest):
        _check_model(body.model, model_name)
        _check_stream_options(body)
        prompts = _completion_prompts(body.prompt, tokenizer, engine.model.config.vocab_size)
        max_tokens = [_max_tokens(len(p), body.max_tokens, engine.max_seq_len, "prompt") for p in prompts]
        params = [_params(body, m, eos_ids, body.logprobs, body.echo and body.logprobs is not None)
                  for m in max_tokens]
        job = _Job(engine, tokenizer, prompts, params, body.n, request_timeout)
        echo = [tokenizer.decode(p) if body.echo else "" for p in prompts]
        if body.stream:
            return _stream(raw, job, _CompletionChunks(model_name, echo, body.logprobs is not None, tokenizer),
                           body.stream_options)
        results = await job.collect(raw)
        return _completion_response(model_name, results, echo, body.logprobs is not None, tokenizer, job)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: HTTPRequest):
        _check_model(body.model, model_name)
        _check_stream_options(body)
        if template is None:
            raise APIError(400, "this model's tokenizer has no chat template (no chat_template in "
                                "tokenizer_config.json nor a chat_template.jinja file): use /v1/completions, or "
                                "start the server with --chat-template FILE", param="messages",
                           code="no_chat_template")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.content if not isinstance(m.content, list)
                     else "".join(p.text for p in m.content), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        ids = tokenizer.encode(template.render(messages), add_special_tokens=False)
        if not ids:
            raise APIError(400, "the chat template rendered the messages to no tokens", param="messages")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = _max_tokens(len(ids), limit, engine.max_seq_len, "messages",
                                 "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = _Job(engine, tokenizer, [ids], [_params(body, max_tokens, eos_ids, logprobs, False)], body.n,
                   request_timeout)
        if body.stream:
            return _stream(raw, job, _ChatChunks(model_name, body.logprobs, tokenizer), body.stream_options)
        results = await job.collect(raw)
        return _chat_response(model_name, results, body.logprobs, tokenizer, job)

    return app


def _eos_ids(model, tokenizer) -> list[int]:
    """The model's end ids: generation_config.json's, else config.json's, else the tokenizer's EOS (resolved as
    ``generate`` and ``diffllama generate`` resolve them)."""
    gen = with_tokenizer_eos(model, tokenizer)
    return list(resolve_generation_settings(model.config, gen, max_new_tokens=1).eos_token_id)


def _validation_response(error: RequestValidationError) -> JSONResponse:
    """400 with OpenAI's body; ``param`` is the first failing field's path as OpenAI spells it
    (``messages[0].role``), None when the body as a whole is at fault."""
    first = error.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        param=None, code="invalid_json").response()
    # A union (prompt: str | list[...]) reports one error per member type: name the field without the member.
    loc = [part for part in loc if isinstance(part, int) or not _union_member(part)]
    if not loc:  # a JSON array or scalar, an empty body, or one not sent as JSON (text/plain)
        return APIError(400, "the request body must be a JSON object", param=None).response()
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first.get("type") == "extra_forbidden":
        message = f"{param}: unknown field (not part of this endpoint's parameters)"
    elif first.get("type") == "missing":
        message = f"{param}: field required"
    else:
        message = f"{param}: {first.get('msg')} (got {first.get('input')!r})"
    return APIError(400, message, param=param).response()


def _union_member(part: str) -> bool:
    """Whether a location part is pydantic's tag of a union member ("str", "list[int]", "TextPart"), not a field."""
    return part in ("str", "int", "float", "bool", "none") or part.startswith(("list[", "dict[", "function-")) \
        or part[:1].isupper()


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"the model {name!r} does not exist: this server serves {served!r}", param="model",
                       code="model_not_found")


def _check_stream_options(body: _Sampling) -> None:
    # OpenAI refuses stream_options on a non-streaming request rather than ignoring it.
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "diffllama"}


def _completion_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """``prompt`` (any of OpenAI's four forms) as token id lists; an empty text starts from BOS.

    Raises:
        APIError: 400 for an empty list, ids outside the vocabulary, or an empty prompt without a BOS token.
    """
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: an empty list", param="prompt")
    out = []
    for item in prompt:
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            if tokenizer.bos_token_id is None:
                raise APIError(400, "prompt is empty (no tokens, and the tokenizer has no BOS token to start "
                                    "from)", param="prompt")
            ids = [tokenizer.bos_token_id]
        if any(not 0 <= i < vocab_size for i in ids):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab_size})", param="prompt")
        out.append(ids)
    return out


def _max_tokens(prompt_tokens: int, asked: int | None, context: int, prompt_field: str,
                field: str = "max_tokens") -> int:
    """The tokens a request may generate: ``asked``, or (None) all the context leaves.

    Raises:
        APIError: 400 naming ``prompt_field`` when the prompt fills the context, or ``field`` when prompt plus
            ``asked`` exceed it (OpenAI's "context_length_exceeded").
    """
    has = "have" if prompt_field == "messages" else "has"  # "the messages have", "the prompt has"
    if prompt_tokens >= context:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but the {prompt_field} {has} "
                            f"{prompt_tokens} tokens, which leaves none to generate: shorten it",
                       param=prompt_field, code="context_length_exceeded")
    if asked is None:
        return context - prompt_tokens
    if prompt_tokens + asked > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; you requested "
                            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the {prompt_field}, {asked} for "
                            f"the completion): lower {field} or shorten the {prompt_field}",
                       param=field, code="context_length_exceeded")
    return asked


def _params(body: _Sampling, max_tokens: int, eos_ids: list[int], logprobs: int | None,
            prompt_logprobs: bool) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k if body.top_k and body.top_k > 0 else None, seed=body.seed,
                          stop=list(body.stop or []), stop_token_ids=list(body.stop_token_ids or []),
                          eos_token_ids=eos_ids, ignore_eos=body.ignore_eos, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs)


class _Job:
    """The engine requests of one HTTP request (prompts x n choices), their outputs in one asyncio queue."""

    def __init__(self, engine, tokenizer, prompts, params, n: int, timeout: float | None) -> None:
        vocab = engine.model.config.vocab_size
        for p in params:
            if any(not 0 <= i < vocab for i in p.stop_token_ids):
                raise APIError(400, f"stop_token_ids: ids must lie in [0, {vocab})", param="stop_token_ids")
        self.engine = engine
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.requests = []
        for p, (ids, param) in enumerate(zip(prompts, params)):
            for j in range(n):
                index = p * n + j
                choice = SamplingParams(**{**param.__dict__, "seed": None if param.seed is None else param.seed + j})
                self.requests.append(Request(ids, choice, self._emitter(loop, index), timeout))
        self.prompt_tokens = sum(len(r.prompt_ids) for r in self.requests[::n])
        self.completion_tokens = 0
        try:
            for request in self.requests:
                engine.submit(request)
        except QueueFull as error:
            self.cancel()
            raise APIError(429, f"the server is busy: {error}; retry later", "rate_limit_error",
                           code="queue_full") from error
        except EngineStopped as error:
            self.cancel()
            raise APIError(503, str(error), "service_unavailable") from error
        except ValueError as error:  # the engine's own prompt checks (the endpoints check first)
            self.cancel()
            raise APIError(400, f"prompt: {error}", param="prompt") from error

    def _emitter(self, loop, index: int):
        def emit(out: Output) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
            except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
                pass
        return emit

    def cancel(self) -> None:
        for request in self.requests:
            if not request.finished:
                self.engine.cancel(request)

    async def events(self, raw: HTTPRequest):
        """Yield ``(index, Output)`` until every choice ended; cancels them all if the client goes away."""
        remaining = len(self.requests)
        try:
            while remaining:
                try:
                    index, out = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await raw.is_disconnected():
                        return
                    continue
                if out.finish_reason is not None:
                    remaining -= 1
                    self.completion_tokens += out.completion_tokens
                yield index, out
        finally:
            self.cancel()

    async def collect(self, raw: HTTPRequest) -> list[list[Output]]:
        """Every choice's outputs, in order.

        Raises:
            APIError: 408 when a choice timed out, 503 at shutdown, 500 when the engine failed.
        """
        results = [[] for _ in self.requests]
        async for index, out in self.events(raw):
            _raise_for_finish(out)
            results[index].append(out)
        return results

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _raise_for_finish(out: Output) -> None:
    if out.finish_reason == "timeout":
        raise APIError(408, "the request ran past the server's --request-timeout", "timeout_error",
                       code="request_timeout")
    if out.finish_reason == "shutdown":
        raise APIError(503, "the server shut down before the request finished", "service_unavailable")
    if out.finish_reason == "error":
        raise APIError(500, out.error or "engine error", "internal_server_error")


def _token_text(tokenizer, token_id: int) -> str:
    """A token's text for logprobs; ``token_id:N`` (vLLM's spelling) for a token that is not text on its own
    (a part of a multi-byte character), so that distinct tokens keep distinct keys."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return f"token_id:{token_id}" if "\ufffd" in text else text


def _completion_logprobs(entries, tokenizer, offset: int) -> dict:
    """OpenAI's legacy completion logprobs object for ``entries`` (TokenLogprob), text offsets from ``offset``."""
    tokens = [_token_text(tokenizer, e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else
                             {_token_text(tokenizer, i): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets}


def _chat_logprobs(entries, tokenizer) -> dict:
    def item(token_id, logprob):
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries]}


def _completion_response(model_name, results, echo, logprobs: bool, tokenizer, job: _Job) -> dict:
    choices = []
    n = len(results) // len(echo)
    for index, outs in enumerate(results):
        prefix = echo[index // n]
        text = prefix + "".join(o.text for o in outs)
        entry = None
        if logprobs:
            entries = [e for o in outs for e in (o.prompt_logprobs or [])] + [e for o in outs for e in o.logprobs]
            entry = _completion_logprobs(entries, tokenizer, 0)
        choices.append({"index": index, "text": text, "logprobs": entry, "finish_reason": outs[-1].finish_reason})
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model_name,
            "choices": choices, "usage": job.usage()}


def _chat_response(model_name, results, logprobs: bool, tokenizer, job: _Job) -> dict:
    choices = [{"index": index, "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
                "logprobs": _chat_logprobs([e for o in outs for e in o.logprobs], tokenizer) if logprobs else None,
                "finish_reason": outs[-1].finish_reason} for index, outs in enumerate(results)]
    return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": model_name,
            "choices": choices, "usage": job.usage()}


class _CompletionChunks:
    """Streaming chunks of /v1/completions (object "text_completion")."""

    def __init__(self, model_name, echo, logprobs: bool, tokenizer) -> None:
        self.model_name, self.echo, self.logprobs, self.tokenizer = model_name, echo, logprobs, tokenizer
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}

    def chunk(self, job: _Job, index: int, out: Output) -> dict:
        text = out.text
        entries = list(out.prompt_logprobs or []) + list(out.logprobs)
        if index not in self.started:
            self.started.add(index)
            text = self.echo[index // (len(job.requests) // len(self.echo))] + text
        entry = None
        if self.logprobs:
            entry = _completion_logprobs(entries, self.tokenizer, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in entry["tokens"])
        return self.wrap(job, [{"index": index, "text": text, "logprobs": entry,
                                "finish_reason": out.finish_reason}])

    def wrap(self, job: _Job, choices: list) -> dict:
        return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created,
                "model": self.model_name, "choices": choices}


class _ChatChunks:
    """Streaming chunks of /v1/chat/completions (object "chat.completion.chunk"); each choice opens with its
    role."""

    def __init__(self, model_name, logprobs: bool, tokenizer) -> None:
        self.model_name, self.logprobs, self.tokenizer = model_name, logprobs, tokenizer
        self.started: set[int] = set()

    def chunk(self, job: _Job, index: int, out: Output) -> dict:
        delta = {}
        if index not in self.started:
            self.started.add(index)
            delta["role"] = "assistant"
        if out.text or out.finish_reason is None:
            delta["content"] = out.text
        entry = _chat_logprobs(out.logprobs, self.tokenizer) if self.logprobs else None
        return self.wrap(job, [{"index": index, "delta": delta, "logprobs": entry,
                                "finish_reason": out.finish_reason}])

    def wrap(self, job: _Job, choices: list) -> dict:
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created,
                "model": self.model_name, "choices": choices}


def _stream(raw: HTTPRequest, job: _Job, chunks, options: StreamOptions | None) -> StreamingResponse:
    """Server-sent events: one ``data: {chunk}`` per engine output, the usage chunk when asked, ``data: [DONE]``.
    A client that disconnects cancels every choice (the ``finally`` of :meth:`_Job.events`)."""

    async def body():
        try:
            async for index, out in job.events(raw):
                _raise_for_finish(out)
                yield f"data: {json.dumps(chunks.chunk(job, index, out))}\n\n"
            if options is not None and options.include_usage:
                yield f"data: {json.dumps({**chunks.wrap(job, []), 'usage': job.usage()})}\n\n"
        except APIError as error:
            yield f"data: {json.dumps(error_body(error.message, error.type, error.param, error.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- running it ---------------------------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str, api_key: str | None, euid: int | None = None) -> str | None:
    """A warning when the server runs as root, without an API key, on a non-loopback ``host``; else None.
    ``euid`` defaults to the process's effective user id (None where the platform has none)."""
    import ipaddress
    import os

    if euid is None and hasattr(os, "geteuid"):
        euid = os.geteuid()
    try:
        loopback = host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if euid == 0 and api_key is None and not loopback:
        return (f"running as root with no --api-key on {host}, reachable from other machines: anyone who reaches "
                f"the port can use the model; set --api-key, bind 127.0.0.1, or run as an unprivileged user")
    return None


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM. On either, uvicorn stops accepting connections, lets
    in-flight requests (streams included) finish for up to ``shutdown_timeout`` seconds, then cancels them; the
    app's lifespan then stops the engine."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    uvicorn.Server(config).run()
