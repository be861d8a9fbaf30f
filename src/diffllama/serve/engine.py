"""A continuous-batching inference engine: requests join and leave the running batch at every decode step.

The scheme (the one of Orca, Yu et al. OSDI 2022, "iteration-level scheduling", and of vLLM's scheduler; written
here from scratch on diffllama's public model API):

- The KV cache is one :class:`SlotCache` (a :class:`~diffllama.cache.StaticCache`) of ``max_batch`` rows
  ("slots") of ``max_seq_len`` positions. A request owns one slot from admission to its end; its tokens sit at
  positions 0, 1, ... of its row, so every row has its own position (the model's ``position_ids`` and the cache
  slot written are per row).
- Each engine iteration (1) drops cancelled and timed-out requests, freeing their slots; (2) admits queued requests
  into free slots; (3) prefills new requests in chunks of at most ``prefill_chunk`` tokens in all, so a long prompt
  does not stall running streams for more than one chunk; (4) runs one decode step for every request that has its
  first token, all rows at once, and hands each new token to its request; finished requests free their slot at once.
- A prefill chunk runs the model on the request's own row (a batch-1 view of the cache) with ``cache_position`` its
  slots: plain causal attention. The decode step runs on rows ``[0, hi)`` (a view): each row writes its new key and
  value at its own position (:class:`SlotCache`) and sees keys ``0 .. position`` of its row through
  ``attention_mask``; rows in that range that are not decoding (free, or still prefilling) compute a throw-away
  token whose key lands on a position their next prefill chunk overwrites before reading it.

Greedy output therefore depends only on the request's own tokens (the rows never see each other's keys); in float32
on CPU it equals :func:`diffllama.generation.generate` of the request alone, token for token (tested).

Attention is the model's ``attn_implementation`` (sdpa on CPU; on CUDA "auto" takes the flash kernels, which read
the per-row key padding). Steps run eagerly: their shapes change as requests come and go, so neither
``torch.compile`` nor a CUDA graph applies to them. Sampling reuses :func:`diffllama.generation.next_tokens`.

The engine runs in its own thread (:meth:`Engine.start`); other threads call :meth:`Engine.submit` and
:meth:`Engine.cancel`. Each request's results go to its ``emit`` callback, called from the engine thread.
"""

from __future__ import annotations

import heapq
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from diffllama.cache import StaticCache
from diffllama.generation import next_tokens


class QueueFull(Exception):
    """``max_queue`` requests wait for a slot already, beyond the free slots (the server answers 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests (the server answers 503)."""


@dataclass
class SamplingParams:
    """How one request is continued (OpenAI's parameters, checked by the server).

    Attributes:
        max_tokens: the most new tokens (>= 1).
        temperature: 0 for greedy decoding (argmax), else the sampling temperature (> 0).
        top_p: nucleus mass in (0, 1]; 1 is off. top_k: None (off) or >= 1.
        seed: seeds the request's own ``torch.Generator`` (None: the global RNG).
        stop: strings that end the output (not included in it). stop_token_ids: ids that end it (not included).
        eos_token_ids: the model's end ids: they end the output too (not included) unless ``ignore_eos``.
        logprobs: None (off) or how many most likely alternatives to report per token (0 = only the chosen one).
            Log-probabilities are the model's (log-softmax of its float32 logits, before temperature, top-k and
            top-p), as vLLM reports them by default.
        prompt_logprobs: also report the log-probability of each prompt token after the first (OpenAI's
            ``echo`` with ``logprobs``).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass
class TokenLogprob:
    """One token with its log-probability (natural log, float) and, when asked, the ``top`` most likely ids with
    theirs (a list of ``(id, logprob)``, most likely first)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """What one engine iteration produced for a request (passed to its ``emit`` callback).

    Attributes:
        text: new text (a delta; text that may begin a stop string is held back until it cannot).
        token_ids: the new token ids (stop ids and EOS excluded).
        logprobs: one :class:`TokenLogprob` per new token when the request asked for logprobs.
        prompt_logprobs: with ``prompt_logprobs``, once, before the first token: one entry per prompt token (the
            first has logprob None).
        finish_reason: None while running; "stop" (EOS, a stop id or string), "length" (``max_tokens`` or the
            context), "timeout", "cancelled", "shutdown" or "error" at the end (the last Output of a request).
        error: the message when ``finish_reason`` is "error".
        prompt_tokens, completion_tokens: counts, set on the last Output.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Request:
    """One prompt to continue: its ids, settings, the ``emit`` callback, and the engine's bookkeeping.

    Args:
        prompt_ids: the prompt's token ids (at least one; checked by the server against the context).
        params: :class:`SamplingParams`. emit: called (from the engine thread) with each :class:`Output`.
        timeout: seconds from submission after which the request ends with finish_reason "timeout" (None: never).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Output], None],
                 timeout: float | None = None) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.arrival = time.monotonic()
        self.deadline = None if timeout is None else self.arrival + timeout
        self.cancelled = False
        self.slot: int | None = None
        self.computed = 0  # prompt tokens in the cache
        self.position = 0  # cache position of the next token fed to the model
        self.last_token: int | None = None  # fed to the next decode step
        self.output_ids: list[int] = []
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished = False
        self.generator = None
        self._detok = None
        self._held = ""  # text that may be the start of a stop string
        self._prompt_entries: list[TokenLogprob] | None = None  # prompt logprobs, emitted with the first token
        self._prompt_tail: torch.Tensor | None = None  # (V,) log-probs of the last prefilled position
        self._pending_logprob: TokenLogprob | None = None  # of the token just sampled


class SlotCache(StaticCache):
    """A :class:`~diffllama.cache.StaticCache` over given tensors (views of a larger cache) whose decode writes go
    to a per-row position.

    With ``row_positions`` None it is a StaticCache (slots ``cache_position``, shared by the rows). With
    ``row_positions`` a (B,) int64 tensor, :meth:`update` writes the one new key/value of row b at position
    ``row_positions[b]`` and ignores ``cache_position``. Writes go through the views into the engine's cache.

    Args:
        keys, values: per layer, (B, KV, S, d) tensors (views). row_positions: see above.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 row_positions: torch.Tensor | None = None) -> None:
        # No StaticCache.__init__: it would allocate; these tensors are the engine's.
        self.keys, self.values = keys, values
        self.batch_size, _, self.max_length, _ = keys[0].shape
        self.row_positions = row_positions
        self._length = 0

    @classmethod
    def allocate(cls, config, batch_size: int, max_length: int, dtype: torch.dtype, device) -> "SlotCache":
        """Zeroed keys and values, (batch_size, KV, max_length, head_dim) per layer of ``config``. (Unlike
        StaticCache's constructor it does not mark them static for CUDA graphs, which the engine does not use, and
        so does not import torch._dynamo: seconds at start-up.)"""
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        return cls(keys, [torch.zeros_like(k) for k in keys])

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`StaticCache.update`; with ``row_positions``, ``key``/``value`` are (B, KV, 1, d) and row b
        goes to position ``row_positions[b]``. Returns the layer's (B, KV, S, d) tensors."""
        if self.row_positions is None:
            return super().update(layer_idx, key, value, cache_position)
        k_all, v_all = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(k_all.shape[0], device=k_all.device)
        k_all[rows, :, self.row_positions] = key[:, :, 0].to(k_all.dtype)  # (B, KV, d) into (B, KV, S, d)
        v_all[rows, :, self.row_positions] = value[:, :, 0].to(v_all.dtype)
        return k_all, v_all


@dataclass
class EngineStats:
    """Counters the server's /metrics reads (updated by the engine thread; reads are racy but each is one int or
    float). ``ttft`` and ``itl`` receive each time to first token and each inter-token latency, in seconds."""

    waiting: int = 0
    running: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    on_ttft: Callable[[float], None] | None = None
    on_itl: Callable[[float], None] | None = None


class Engine:
    """Continuous batching over a causal LM (see the module docstring).

    Args:
        model: what ``from_pretrained`` gives for a causal LM: ``model(input_ids, attention_mask=, position_ids=,
            past_key_values=, use_cache=True, cache_position=)`` returning ``.logits``, with ``model.config``
            holding ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim`` and ``vocab_size``. Put in eval
            mode by the engine.
        tokenizer: a :class:`diffllama.Tokenizer` (decodes the output, for stop strings and text).
        max_batch: slots, i.e. the most requests decoding at once (>= 1).
        max_seq_len: positions per slot: prompt plus output (>= 2, <= ``max_position_embeddings``).
        max_queue: the most requests waiting for a slot, those about to take a free slot not counted; so up to
            ``max_batch + max_queue`` requests are accepted at once, and :meth:`submit` raises :class:`QueueFull`
            beyond (>= 0).
        prefill_chunk: the most prompt tokens prefilled per iteration, in all (>= 1).

    Raises:
        ValueError: a size out of range, naming it (before anything is allocated).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_seq_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int = 256) -> None:
        limit = model.config.max_position_embeddings
        max_seq_len = limit if max_seq_len is None else max_seq_len
        for name, value, low in (("max_batch", max_batch, 1), ("max_seq_len", max_seq_len, 2),
                                 ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_seq_len > limit:  # the model has no positions beyond; and a huge value would fail in allocation
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings ({limit})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.device = model.device
        self.cache = SlotCache.allocate(model.config, max_batch, max_seq_len, model.dtype, self.device)
        self.stats = EngineStats()
        self._free = list(range(max_batch))  # a heap: the lowest slot first keeps the decode view [0, hi) short
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- other threads -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (a daemon)."""
        self._thread = threading.Thread(target=self._loop, name="diffllama-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue ``request``; it is admitted into the batch when a slot frees.

        Raises:
            ValueError: a prompt of ``max_seq_len`` tokens or more, or ids outside [0, vocab_size) (checked here, so
                that one bad request cannot fail the batch it would join).
            QueueFull: ``max_queue`` requests wait for a slot already (beyond the free slots). EngineStopped:
                :meth:`stop` was called.
        """
        if len(request.prompt_ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; a slot holds {self.max_seq_len} "
                             f"(max_seq_len), prompt and output together")
        vocab = self.model.config.vocab_size
        if not all(0 <= i < vocab for i in request.prompt_ids):
            raise ValueError(f"prompt ids must lie in [0, vocab_size={vocab})")
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            # Requests submitted since the engine thread last admitted sit in _waiting too, though free slots await
            # them: only those beyond the free slots are queued (else a burst into an idle server is refused).
            queued = len(self._waiting) - len(self._free)
            if queued >= self.max_queue:
                raise QueueFull(f"the queue holds {queued} requests waiting for a slot (--max-queue "
                                f"{self.max_queue})")
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        """Ask for ``request`` to end (client gone): the engine frees its slot at the next iteration and emits a
        last Output with finish_reason "cancelled"."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    def stop(self, timeout: float | None = None) -> None:
        """End the engine: every unfinished request gets a last Output with finish_reason "shutdown"; the thread is
        joined (for at most ``timeout`` seconds)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def free_slots(self) -> int:
        """Slots not held by any request (read without locking: a snapshot)."""
        return len(self._free)

    # ---- the engine thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._stopping and not self._waiting and not self._running:
                            self._lock.wait()
                        if self._stopping:
                            break
                    try:
                        self.step()
                    except Exception as error:  # e.g. out of memory: the running requests fail, the engine goes on
                        traceback.print_exc()
                        for request in list(self._running.values()):
                            self._finish(request, "error", error=f"engine step failed: {type(error).__name__}: "
                                                                  f"{error}")
        except BaseException as error:  # the thread itself is ending: every request learns it, new ones are refused
            self.error = error
            with self._lock:
                self._stopping = True
            for request in list(self._running.values()) + list(self._waiting):
                self._finish(request, "error", error=f"engine failed: {type(error).__name__}: {error}")
            raise
        for request in list(self._running.values()) + list(self._waiting):
            self._finish(request, "shutdown")

    def step(self) -> None:
        """One engine iteration: drop ended requests, admit, prefill a chunk budget, decode one token per row."""
        now = time.monotonic()
        with self._lock:
            for request in list(self._waiting):
                if request.cancelled or (request.deadline is not None and now > request.deadline):
                    self._waiting.remove(request)
                    self._finish(request, "cancelled" if request.cancelled else "timeout")
            for request in list(self._running.values()):
                if request.cancelled or (request.deadline is not None and now > request.deadline):
                    self._finish(request, "cancelled" if request.cancelled else "timeout")
            while self._waiting and self._free:
                request = self._waiting.popleft()
                request.slot = heapq.heappop(self._free)
                self._running[request.slot] = request
            self.stats.waiting, self.stats.running = len(self._waiting), len(self._running)
        self._prefill()
        self._decode()

    def _row_cache(self, rows: slice, length: int, row_positions=None) -> SlotCache:
        return SlotCache([k[rows, :, :length] for k in self.cache.keys],
                         [v[rows, :, :length] for v in self.cache.values], row_positions)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for request in sorted(self._running.values(), key=lambda r: r.arrival):
            if budget == 0:
                break
            if request.computed == len(request.prompt_ids):
                continue
            start = request.computed
            end = min(len(request.prompt_ids), start + budget)
            budget -= end - start
            ids = torch.tensor([request.prompt_ids[start:end]], device=self.device)
            positions = torch.arange(start, end, device=self.device)
            cache = self._row_cache(slice(request.slot, request.slot + 1), self.max_seq_len)
            logits = self.model(ids, position_ids=positions[None], past_key_values=cache, use_cache=True,
                                cache_position=positions,
                                logits_to_keep=0 if request.params.prompt_logprobs else 1).logits[0]  # (n, V)
            if request.params.prompt_logprobs:
                self._prompt_logprobs(request, start, logits)
            self.stats.prompt_tokens += end - start
            request.computed = request.position = end
            if end == len(request.prompt_ids):
                self._start_sampling(request)
                self._accept(request, self._sample([request], logits[-1:].float())[0])

    def _prompt_logprobs(self, request: Request, start: int, logits: torch.Tensor) -> None:
        # logits[i] predicts prompt token start + i + 1
        scores = torch.log_softmax(logits[:-1].float(), dim=-1) if logits.shape[0] > 1 else None
        if request._prompt_entries is None:
            request._prompt_entries = [TokenLogprob(request.prompt_ids[0], None)]
        entries = request._prompt_entries
        if request._prompt_tail is not None:  # the previous chunk's last position predicts this chunk's first token
            entries.append(self._logprob_entry(request, request._prompt_tail, request.prompt_ids[start]))
        targets = request.prompt_ids[start + 1:start + logits.shape[0]]
        for i, token in enumerate(targets):
            entries.append(self._logprob_entry(request, scores[i], token))
        request._prompt_tail = torch.log_softmax(logits[-1].float(), dim=-1)

    def _logprob_entry(self, request: Request, scores: torch.Tensor, token: int) -> TokenLogprob:
        """(V,) log-probabilities -> the entry of ``token`` with the request's number of alternatives."""
        k = request.params.logprobs or 0
        top = []
        if k:
            values, ids = torch.topk(scores, min(k, scores.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(int(token), float(scores[token]), top)

    def _start_sampling(self, request: Request) -> None:
        params = request.params
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request._detok = self.tokenizer.detokenizer()

    def _decode(self) -> None:
        decoding = [r for r in self._running.values() if r.last_token is not None]
        if not decoding:
            return
        hi = max(r.slot for r in decoding) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        positions = torch.zeros(hi, dtype=torch.long)
        for slot in range(hi):  # rows not decoding write where their next prefill chunk overwrites (see above)
            request = self._running.get(slot)
            if request is not None:
                positions[slot] = request.position
                if request.last_token is not None:
                    tokens[slot, 0] = request.last_token
        length = int(positions.max()) + 1
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        mask = torch.arange(length, device=self.device)[None, :] <= positions[:, None]  # (hi, length)
        cache = self._row_cache(slice(0, hi), length, row_positions=positions)
        logits = self.model(tokens, attention_mask=mask, position_ids=positions[:, None], past_key_values=cache,
                            use_cache=True, cache_position=torch.tensor([length - 1], device=self.device),
                            logits_to_keep=1).logits[:, -1].float()  # (hi, V)
        for request in decoding:
            request.position += 1
        picked = self._sample(decoding, logits[[r.slot for r in decoding]])
        for request, token in zip(decoding, picked):
            self._accept(request, token)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """One token per request from its (V,) row of ``logits`` (len(requests), V) float32."""
        out = logits.argmax(dim=-1).tolist()  # greedy rows: as generate's next_tokens(do_sample=False)
        # Sampled rows: one draw per group of equal settings (rows with a seed each draw from their own generator).
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            params = request.params
            if params.temperature > 0:
                key = (params.temperature, params.top_k, params.top_p if params.top_p < 1 else None)
                groups.setdefault(key if request.generator is None else (i, *key), []).append(i)
        for key, rows in groups.items():
            temperature, top_k, top_p = key[-3:]
            picked = next_tokens(logits[rows], do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=requests[rows[0]].generator)
            for i, token in zip(rows, picked.tolist()):
                out[i] = token
        if any(r.params.logprobs is not None for r in requests):
            scores = torch.log_softmax(logits, dim=-1)
            for i, request in enumerate(requests):
                if request.params.logprobs is not None:
                    request._pending_logprob = self._logprob_entry(request, scores[i], out[i])
        return out

    def _accept(self, request: Request, token: int) -> None:
        """Record ``token`` for ``request``: emit its text, end the request when a stop condition is met."""
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            if self.stats.on_ttft:
                self.stats.on_ttft(now - request.arrival)
        elif self.stats.on_itl:
            self.stats.on_itl(now - request.last_token_time)
        request.last_token_time = now
        self.stats.generated_tokens += 1
        params = request.params
        out = Output(prompt_logprobs=request._prompt_entries)
        request._prompt_entries = request._prompt_tail = None
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(params.eos_token_ids))
        if token in stop_ids:
            request.output_ids.append(token)  # counted in usage, not shown
            self._finish(request, "stop", out, flush=True)
            return
        request.output_ids.append(token)
        request.last_token = token
        out.token_ids.append(token)
        if params.logprobs is not None:
            out.logprobs.append(request._pending_logprob)
        text, stopped = self._stop_text(request, request._detok.add(token))
        out.text = text
        if stopped:
            self._finish(request, "stop", out)
        elif len(request.output_ids) >= params.max_tokens or request.position >= self.max_seq_len:
            self._finish(request, "length", out, flush=True)
        else:
            request.emit(out)

    def _stop_text(self, request: Request, new: str) -> tuple[str, bool]:
        """Text to emit after ``new`` arrived, and whether a stop string was found (the text ends before it)."""
        stops = request.params.stop
        if not stops:
            return new, False
        text = request._held + new
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            request._held = ""
            return text[:min(found)], True
        # hold back the longest tail that begins some stop string
        keep = max((n for s in stops for n in range(1, min(len(s), len(text)) + 1) if text.endswith(s[:n])),
                   default=0)
        request._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _finish(self, request: Request, reason: str, out: Output | None = None, *, flush: bool = False,
                error: str | None = None) -> None:
        """End ``request``: free its slot and emit its last Output (once)."""
        if request.finished:
            return
        request.finished = True
        if request.slot is not None and self._running.get(request.slot) is request:
            del self._running[request.slot]
            heapq.heappush(self._free, request.slot)
            self.stats.running = len(self._running)
        out = out or Output()
        if flush and request._detok is not None:
            rest, stopped = self._stop_text(request, request._detok.flush())
            out.text += rest + ("" if stopped else request._held)
            request._held = ""
        out.finish_reason, out.error = reason, error
        out.prompt_tokens, out.completion_tokens = len(request.prompt_ids), len(request.output_ids)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        request.emit(out)
