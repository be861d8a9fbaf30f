"""Prefill and decode throughput of diffllama's fast path beside transformers' DiffLlama ``generate``, same weights.

Usage (on a CUDA machine, from the repo root):

    PYTHONPATH=src python benchmarks/decode.py [--shapes 0.37b,1.2b] [--batches 1,16] [--prompt 128] [--new 256]
                                               [--hf-new 32] [--no-hf] [--profile] [--attn auto] [--no-fuse]
                                               [--out DIR]

For each shape (random bf16 weights) and batch size it reports:

- ours prefill: one eager forward over a (B, prompt) batch into a StaticCache, tokens/s = B·prompt / time;
- ours decode: the fast path ``generate(..., compile=True)`` takes: the compiled decode step (StaticCache +
  ``torch.compile`` + one CUDA graph per step) with fused q/k/v and gate/up projections (``--no-fuse``: separate),
  a fixed λ (:func:`diffllama.decode.prepare_for_decode`) and the ``--attn`` backend (default ``auto``: the flash
  decode kernel on CUDA; ``sdpa`` for the SDPA path), greedy, ``--new`` steps timed with CUDA events after warm-up, tokens/s = B·new / time;
- transformers: ``DiffLlamaForCausalLM.generate`` (sdpa, its default cache) on the same weights, greedy; prefill from
  a 1-token call, decode from the difference between a (1 + hf_new)-token call and the 1-token call;
- the roofline: bytes read per decode step (every matmul weight, lm_head included, plus the KV cache at the mean
  context) over the copy bandwidth measured here (bytes read + written by a 2 GiB device-to-device copy);
- with ``--profile``, for every shape at batch 1: the kernel table of one compiled step (the same compiled code,
  run without its CUDA graph), written to ``DIR/profile_<shape>_b1.txt``.

Each section runs in its own try/except and prints as it goes; results go to ``DIR/decode.json`` (default $OUT, else
benchmarks/). Sources of method: gpt-fast's decode benchmark idea (compile the one-token step, time tokens/s), the
roofline as bytes / bandwidth (Williams et al. 2009).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

SHAPES = {
    "0.37b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2816, vocab_size=32000, tie_word_embeddings=False),
    "1.2b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
}
RESULTS: dict = {"rows": []}


def log(*args) -> None:
    print(*args, flush=True)


def cuda_time(fn, repeat: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, with CUDA events."""
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + written) of 2 GiB, median of 10."""
    n = 2**30  # bf16 elements: 2 GiB
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t = cuda_time(lambda: dst.copy_(src), repeat=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * n / t


def build_models(shape: str, with_hf: bool, attn: str):
    from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM

    fields = dict(SHAPES[shape], max_position_embeddings=4096, attn_implementation=attn, pad_token_id=0)
    config = DiffLlamaConfig(**fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = DiffLlamaForCausalLM(config)
    ours = ours.to(torch.bfloat16).eval()
    hf = None
    if with_hf:
        try:
            import transformers

            hf_fields = config.to_dict()
            hf_fields.pop("model_type", None)
            hf_config = transformers.DiffLlamaConfig(**hf_fields)
            hf_config._attn_implementation = "sdpa"
            with torch.device("cuda"):
                hf = transformers.DiffLlamaForCausalLM(hf_config)
            hf = hf.to(torch.bfloat16).eval()
            missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
            if [k for k in missing if k != "lm_head.weight"] or unexpected:
                log(f"  transformers state-dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
        except Exception:  # noqa: BLE001
            log("  transformers model failed:\n" + traceback.format_exc())
            hf = None
    return ours, hf


def decode_bytes(model, batch: int, context: float) -> float:
    """Bytes read per decode step: all matmul weights (lm_head once, even when tied) + K and V at ``context``."""
    cfg = model.config
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * cfg.head_dim * 2
    return weights + kv


def bench_ours(model, batch: int, prompt: int, new: int, *, fuse: bool, profile_path: str | None) -> dict:
    from diffllama.cache import StaticCache
    from diffllama.generation import DecodeStep, decode_n, prefill

    row: dict = {}
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    positions = torch.arange(prompt, device="cuda").expand(batch, prompt)
    max_length = -(-(prompt + new + 16) // 256) * 256
    cache = StaticCache.from_config(model.config, batch, max_length, torch.bfloat16, "cuda")
    with torch.inference_mode():
        prefill(model, ids, None, positions, cache)  # warm-up
        t = cuda_time(lambda: prefill(model, ids, None, positions, cache), repeat=5)
        row["prefill_s"] = t
        row["prefill_tok_s"] = batch * prompt / t
        log(f"  ours prefill  B={batch:<3d} S={prompt}: {t * 1e3:8.2f} ms  {row['prefill_tok_s']:10.0f} tok/s")
        logits = prefill(model, ids, None, positions, cache)
        first = logits.argmax(-1, keepdim=True)
        step = DecodeStep(model, cache, compile=True, fuse=fuse)
        t0 = time.perf_counter()
        decode_n(step, first, positions[:, -1:] + 1, prompt, 4)  # compile + capture
        torch.cuda.synchronize()
        row["compile_s"] = time.perf_counter() - t0
        log(f"  ours compile + graph capture: {row['compile_s']:.1f} s")
        runs = []
        for _ in range(3):
            runs.append(cuda_time(lambda: decode_n(step, first, positions[:, -1:] + 1, prompt, new)))
        runs.sort()
        t = runs[1]
        row["decode_s"] = t
        row["decode_tok_s"] = batch * new / t
        row["decode_ms_per_step"] = t / new * 1e3
        row["decode_runs_s"] = runs
        log(f"  ours decode   B={batch:<3d} n={new}: {row['decode_ms_per_step']:.3f} ms/step  "
            f"{row['decode_tok_s']:10.0f} tok/s  (runs {[round(r, 4) for r in runs]})")
        # Same function as the eager step? Logits of one step from the same cache state (bf16: ~1e-2 expected);
        # greedy agreement alone says little with random weights, whose logits are nearly tied.
        slot = torch.tensor([prompt], device="cuda")
        eager_logits = DecodeStep(model, cache)(first, positions[:, -1:] + 1, slot, None).clone()
        fast_logits = step(first, positions[:, -1:] + 1, slot, None).clone()
        row["logits_rel_err_vs_eager"] = float((fast_logits - eager_logits).norm() / eager_logits.norm())
        log(f"  compiled vs eager step logits: relative error {row['logits_rel_err_vs_eager']:.2e}")
        fast = decode_n(step, first, positions[:, -1:] + 1, prompt, 16)
        eager = decode_n(DecodeStep(model, cache), first, positions[:, -1:] + 1, prompt, 16)
        row["greedy_agreement_vs_eager_16"] = float((fast == eager).float().mean())
        log(f"  compiled vs eager greedy agreement over 16 steps: {row['greedy_agreement_vs_eager_16']:.3f}")
        if profile_path is not None:
            row["profile"] = profile_step(step, first, positions[:, -1:] + 1, prompt, profile_path)
    del cache, step
    return row


def bench_hf(hf, batch: int, prompt: int, new: int) -> dict:
    row: dict = {}
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)

    def run(n):
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        run(2)  # warm-up
        torch.cuda.synchronize()
        t1 = cuda_time(lambda: run(1), repeat=3)
        tn = cuda_time(lambda: run(1 + new), repeat=1)
    row["prefill_s"] = t1
    row["prefill_tok_s"] = batch * prompt / t1
    row["decode_tok_s"] = batch * new / (tn - t1)
    row["decode_ms_per_step"] = (tn - t1) / new * 1e3
    log(f"  transformers  B={batch:<3d}: prefill {row['prefill_tok_s']:10.0f} tok/s, decode "
        f"{row['decode_ms_per_step']:.2f} ms/step = {row['decode_tok_s']:8.1f} tok/s")
    return row


def profile_step(step, token, position, slot: int, path: str) -> dict:
    """Kernel table of ``step``'s compiled code run without its CUDA graph (the graph's kernels, launched one by
    one: no recompilation), averaged over 4 steps; written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    slots = torch.arange(slot, slot + 7, device="cuda")
    with torch.inference_mode():
        for t in range(3):
            step._run(token, position + t, slots[t:t + 1], None)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for t in range(3, 7):
                step._run(token, position + t, slots[t:t + 1], None)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    per_step = len(events) / 4
    total_us = sum(getattr(e, "device_time_total", 0.0) for e in events) / 4
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    log(f"  profile: {per_step:.0f} kernels per step, {total_us:.0f} us of kernel time per step")
    log(table)
    with open(path, "w") as f:
        f.write(f"{per_step:.0f} kernels per step, {total_us:.0f} us of kernel time per step (4 steps)\n")
        f.write(table)
    return {"kernels_per_step": per_step, "kernel_us_per_step": total_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0.37b,1.2b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--hf-new", type=int, default=32)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--profile", action="store_true", help="kernel table of one step, every shape at batch 1")
    parser.add_argument("--attn", default="auto", choices=["auto", "flash", "sdpa", "eager"],
                        help="our attn_implementation (auto: flash decode on CUDA)")
    parser.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up projections")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "decode.json")

    def save():
        with open(out_json, "w") as f:
            json.dump(RESULTS, f, indent=2)

    import transformers
    import triton

    RESULTS["env"] = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                          args=vars(args))
    log(RESULTS["env"])
    try:
        bw = copy_bandwidth()
    except Exception:  # noqa: BLE001
        log(traceback.format_exc())
        bw = 4.18e12
    RESULTS["copy_bandwidth_Bps"] = bw
    log(f"copy bandwidth: {bw / 1e12:.2f} TB/s")
    save()

    models = {}
    for shape in args.shapes.split(","):
        try:
            models[shape] = build_models(shape, with_hf=not args.no_hf, attn=args.attn)
            n_params = sum(p.numel() for p in {id(p): p for p in models[shape][0].parameters()}.values())
            log(f"built {shape}: {n_params / 1e6:.1f} M parameters")
        except Exception:  # noqa: BLE001
            log(traceback.format_exc())

    # Batch 1 of every shape first (the targets), then larger batches.
    for batch in (int(b) for b in args.batches.split(",")):
        for shape, (ours, hf) in models.items():
            log(f"== shape {shape}, batch {batch} ==")
            n_params = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
            row = dict(shape=shape, batch=batch, params=n_params, prompt=args.prompt, new=args.new)
            context = args.prompt + args.new / 2
            row["bytes_per_step"] = decode_bytes(ours, batch, context)
            row["roofline_tok_s"] = batch * bw / row["bytes_per_step"]
            try:
                profile_path = os.path.join(args.out, f"profile_{shape}_b1.txt") if args.profile and batch == 1 \
                    else None
                row["ours"] = bench_ours(ours, batch, args.prompt, args.new, fuse=not args.no_fuse,
                                         profile_path=profile_path)
                row["fraction_of_roofline"] = row["ours"]["decode_tok_s"] / row["roofline_tok_s"]
            except Exception:  # noqa: BLE001
                log(traceback.format_exc())
            torch.cuda.empty_cache()
            if hf is not None:
                try:
                    row["transformers"] = bench_hf(hf, batch, args.prompt, args.hf_new)
                except Exception:  # noqa: BLE001
                    log(traceback.format_exc())
            log(f"  roofline B={batch}: {row['bytes_per_step'] / 1e9:.3f} GB/step -> {row['roofline_tok_s']:.0f} "
                f"tok/s; ours at {row.get('fraction_of_roofline', float('nan')):.1%}")
            RESULTS["rows"].append(row)
            save()

    log("\n| shape | B | ours prefill tok/s | ours decode tok/s | ms/step | transformers decode tok/s | speed-up |"
        " roofline tok/s | % roofline |")
    log("|---|---|---|---|---|---|---|---|---|")
    for row in RESULTS["rows"]:
        o, h = row.get("ours", {}), row.get("transformers", {})
        speed = o.get("decode_tok_s", float("nan")) / h["decode_tok_s"] if h else float("nan")
        log(f"| {row['shape']} | {row['batch']} | {o.get('prefill_tok_s', float('nan')):.0f} | "
            f"{o.get('decode_tok_s', float('nan')):.0f} | {o.get('decode_ms_per_step', float('nan')):.3f} | "
            f"{h.get('decode_tok_s', float('nan')):.1f} | {speed:.1f}x | {row['roofline_tok_s']:.0f} | "
            f"{row.get('fraction_of_roofline', float('nan')):.1%} |")
    save()


if __name__ == "__main__":
    main()
