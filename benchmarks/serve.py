"""Serving benchmark: the continuous-batching engine of ``diffllama serve`` under Poisson arrivals, beside sequential
``generate`` on the same weights.

Usage (on a CUDA machine, from the repo root; exits cleanly, doing nothing, without CUDA):

    PYTHONPATH=src python benchmarks/serve.py [--quick] [--shapes 0.37b,1.2b] [--rates 4,16,64,inf]
                                              [--requests 128] [--max-batch 64] [--out DIR]

For each shape (random bf16 weights, the shapes of benchmarks/decode.py) it reports:

- sequential ``generate``, one request at a time (batch 1), eager (``DynamicCache``) and compiled (``compile=True``:
  StaticCache, torch.compile, CUDA graph): output tokens/s;
- for each arrival rate (requests/s; ``inf``: all at once), ``--requests`` requests arriving as a Poisson process,
  prompt lengths uniform in [32, 256] tokens and output lengths uniform in [64, 256] (``--quick``: [32, 128] and
  [32, 128]), random token ids, greedy, EOS ignored: request throughput, output tokens/s, TTFT and inter-token
  latency p50/p99 (measured in the engine's callback, so HTTP is excluded);
- the target check at ``--max-batch`` (64) concurrent streams: 64 requests at once with 256-token prompts and
  ``--steady-new`` new tokens each; decode throughput while all 64 decode, over the batch-1 rates above, and the
  p99 inter-token latency (target: >= 20x, < 50 ms, on the 0.37B shape).

The engine runs its steps eagerly (their shapes change as requests come and go; see diffllama.serve.engine), with the
model's ``attn_implementation`` "auto" (the flash kernels on CUDA). Results go to ``DIR/serve.json`` (default $OUT,
else benchmarks/). ``--quick`` (0.37B only, two rates, fewer and shorter requests) runs in under 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import SHAPES, build_models  # noqa: E402  (the shapes and random models the benchmarks share)

RESULTS: dict = {"rows": []}


def log(*args) -> None:
    print(*args, flush=True)


class _NoText:
    """The engine's tokenizer for random token ids: no text, so no detokenization cost is timed."""

    class _Detok:
        def add(self, ids) -> str:
            return ""

        def flush(self) -> str:
            return ""

    def detokenizer(self):
        return self._Detok()


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def bench_sequential(model, prompts, outputs, *, compile: bool) -> dict:
    """Batch-1 ``generate`` over the requests one after another; output tokens/s (after one warm-up call)."""
    from diffllama.generation import generate

    def run(ids, n):
        return generate(model, torch.tensor([ids], device="cuda"), max_new_tokens=n, eos_token_id=[],
                        static_cache=compile, compile=compile)

    run(prompts[0], outputs[0])  # warm-up (and compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for ids, n in zip(prompts, outputs):
        tokens += run(ids, n).shape[1] - len(ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_load(engine, prompts, outputs, rate: float, seed: int = 0) -> dict:
    """Submit the requests at Poisson times of ``rate`` per second (inf: all at once) and wait for all of them."""
    from diffllama.serve.engine import Request, SamplingParams

    rng = random.Random(seed)
    records = [dict(times=[], done=threading.Event()) for _ in prompts]

    def emitter(record):
        def emit(out):
            if out.token_ids:
                record["times"].append(time.perf_counter())
            if out.finish_reason is not None:
                record["reason"] = out.finish_reason
                record["done"].set()
        return emit

    start = time.perf_counter()
    next_time = start
    for ids, n, record in zip(prompts, outputs, records):
        if rate != float("inf"):
            next_time += rng.expovariate(rate)
            time.sleep(max(0.0, next_time - time.perf_counter()))
        record["arrival"] = time.perf_counter()
        engine.submit(Request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), emitter(record)))
    for record in records:
        assert record["done"].wait(1800), "a request did not finish"
    seconds = time.perf_counter() - start
    ttft = [r["times"][0] - r["arrival"] for r in records if r["times"]]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in records)
    bad = [r["reason"] for r in records if r["reason"] != "length"]
    return {"rate": rate, "requests": len(prompts), "tokens": tokens, "seconds": seconds,
            "requests_per_s": len(prompts) / seconds, "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "not_finished_by_length": len(bad), "free_slots_after": engine.free_slots()}


def steady_state(engine, batch: int, prompt: int, new: int, vocab: int) -> dict:
    """``batch`` requests at once; decode throughput counted over the time every request decodes (after the last
    first token, before the first request ends), and the inter-token latency there."""
    from diffllama.serve.engine import Request, SamplingParams

    rng = random.Random(1)
    records = [dict(times=[], done=threading.Event()) for _ in range(batch)]

    def emitter(record):
        def emit(out):
            if out.token_ids:
                record["times"].append(time.perf_counter())
            if out.finish_reason is not None:
                record["done"].set()
        return emit

    for record in records:
        ids = [rng.randrange(vocab) for _ in range(prompt)]
        engine.submit(Request(ids, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True), emitter(record)))
    for record in records:
        assert record["done"].wait(1800), "a request did not finish"
    begin = max(r["times"][0] for r in records)
    end = min(r["times"][-1] for r in records)
    tokens = sum(sum(begin < t <= end for t in r["times"]) for r in records)
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:]) if a >= begin and b <= end]
    return {"batch": batch, "prompt": prompt, "new": new, "window_s": end - begin,
            "decode_tokens_per_s": tokens / (end - begin) if end > begin else float("nan"),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "free_slots_after": engine.free_slots()}


def bench_shape(shape: str, args) -> None:
    from diffllama.serve.engine import Engine

    log(f"== {shape} ==")
    model = build_models(shape, with_hf=False, attn="auto")[0]
    vocab = model.config.vocab_size
    rng = random.Random(0)
    lo_p, hi_p, lo_n, hi_n = (32, 128, 32, 128) if args.quick else (32, 256, 64, 256)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo_p, hi_p))] for _ in range(args.requests)]
    outputs = [rng.randint(lo_n, hi_n) for _ in range(args.requests)]
    row = {"shape": shape, "device": torch.cuda.get_device_name(), "prompt_len": [lo_p, hi_p],
           "output_len": [lo_n, hi_n], "max_batch": args.max_batch}
    RESULTS["rows"].append(row)
    k = args.sequential
    for compile in (False, True):
        name = "generate_compiled" if compile else "generate_eager"
        row[name] = bench_sequential(model, prompts[:k], outputs[:k], compile=compile)
        log(f"{shape} sequential {name}: {row[name]['tokens_per_s']:.1f} tokens/s over {k} requests")
    engine = Engine(model, _NoText(), max_batch=args.max_batch, max_seq_len=1024, max_queue=100_000,
                    prefill_chunk=args.prefill_chunk)
    engine.start()
    try:
        run_load(engine, prompts[:4], [8] * 4, float("inf"))  # warm-up: kernels' first launches and tuning
        row["rates"] = []
        for rate in args.rates:
            result = run_load(engine, prompts, outputs, rate)
            row["rates"].append(result)
            log(f"{shape} rate {rate:g}/s: {result['tokens_per_s']:.0f} tokens/s, {result['requests_per_s']:.2f} "
                f"req/s, TTFT p50/p99 {result['ttft_p50_ms']:.0f}/{result['ttft_p99_ms']:.0f} ms, ITL p50/p99 "
                f"{result['itl_p50_ms']:.1f}/{result['itl_p99_ms']:.1f} ms, free slots after "
                f"{result['free_slots_after']}/{args.max_batch}")
        steady = steady_state(engine, args.max_batch, 256, args.steady_new, vocab)
        row["steady"] = steady
        for name in ("generate_eager", "generate_compiled"):
            steady[f"x_{name}"] = steady["decode_tokens_per_s"] / row[name]["tokens_per_s"]
        ok = steady["x_generate_compiled"] >= 20 and steady["itl_p99_ms"] < 50
        log(f"{shape} {args.max_batch} concurrent streams: decode {steady['decode_tokens_per_s']:.0f} tokens/s = "
            f"{steady['x_generate_eager']:.1f}x eager / {steady['x_generate_compiled']:.1f}x compiled batch-1 "
            f"generate; ITL p50/p99 {steady['itl_p50_ms']:.1f}/{steady['itl_p99_ms']:.1f} ms; target (>= 20x the "
            f"compiled batch-1 rate, p99 < 50 ms): {'met' if ok else 'NOT met'}")
    finally:
        engine.stop(60)
    del engine, model
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.37B only, rates 16 and inf, 64 short requests")
    parser.add_argument("--shapes", default=None, help="comma-separated, of " + ", ".join(SHAPES))
    parser.add_argument("--rates", default=None, help="requests/s, comma-separated ('inf': all at once)")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--sequential", type=int, default=None, help="requests run by sequential generate")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--steady-new", type=int, default=None, help="new tokens per stream in the 64-stream test")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        log("benchmarks/serve.py needs a CUDA GPU: none here, nothing run")
        return
    args.shapes = (args.shapes or ("0.37b" if args.quick else "0.37b,1.2b")).split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    args.rates = [float(r) for r in (args.rates or ("16,inf" if args.quick else "4,16,64,inf")).split(",")]
    args.requests = args.requests or (64 if args.quick else 256)
    args.sequential = args.sequential or (3 if args.quick else 8)
    args.steady_new = args.steady_new or (64 if args.quick else 128)
    RESULTS["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    for shape in args.shapes:
        bench_shape(shape, args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "serve.json")
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
