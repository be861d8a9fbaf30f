"""The three architectures side by side in one process: training tokens/s and batch-1 decode tokens/s.

For each of DiffLlama V1 (``diffllama``), Differential Transformer V2 (``diffllama-v2``) and Llama (``llama``), the
preset's matched trio member (:func:`diffllama.presets.get_preset`; the 0.4b trio by default: hidden 1024, 24
layers, parameter counts within 2%) with random weights:

- training: the trainer's step (:class:`diffllama.train.loop.TrainModule`: chunked LM head + cross-entropy), the
  preset's batch and seq_len, bf16 autocast and fused AdamW on CUDA, each decoder layer compiled as
  ``diffllama train --compile`` does, ``attn_implementation="auto"`` (V1: the flash kernels; V2 and Llama: SDPA,
  FlashAttention-2 on the GPU). ``--warmup`` untimed steps (compilation), then ``--steps`` timed ones between
  synchronisations; tokens/s = timed tokens / seconds.
- decode: batch 1, the fast path of ``generate(..., compile=True)``: a ``--prompt``-token prefill into a
  StaticCache, then ``--new`` greedy steps of the compiled, fused (:func:`diffllama.decode.prepare_for_decode`) and,
  on CUDA, CUDA-graphed decode step, timed after a warm-up; tokens/s = new / seconds.

It prints a table and says whether V2's training step is within 1.15x of Llama's (issue 16's target), and writes
``architectures.json`` to ``--out`` (default ``$OUT``, else ``benchmarks/results``).

Usage (GPU): PYTHONPATH=src python benchmarks/architectures.py
CPU smoke run (the tiny trio, batch 2 x 64 tokens, eager, a few steps; seconds): ... --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM
from diffllama.cache import StaticCache
from diffllama.config import ARCHITECTURES
from diffllama.generation import DecodeStep, decode_n, prefill
from diffllama.presets import get_preset
from diffllama.train.loop import TrainModule

TARGET = 1.15  # V2's training step time over Llama's, at most (issue 16)


def build(preset: str, model_type: str, device: torch.device) -> DiffLlamaForCausalLM:
    """The preset's trio member for ``model_type``, random weights in float32 on ``device`` (a ``vocab_size`` of
    None: the preset's tokenizer vocabulary rounded up to 64, as ``diffllama train`` sets it)."""
    member = get_preset(preset, model_type)
    fields = dict(member["model"], attn_implementation="auto")
    fields["vocab_size"] = fields["vocab_size"] or -(-member["train"]["tokenizer_vocab_size"] // 64) * 64
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], member["train"]["seq_len"])
    torch.manual_seed(0)
    with torch.device(device):
        return DiffLlamaForCausalLM(DiffLlamaConfig(**fields))


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; CPU needs nothing), so timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(model, batch: int, seq: int, warmup: int, steps: int, compile: bool) -> dict:
    """Training tokens/s and step time of ``model`` on random (batch, seq) token windows."""
    device = model.device
    module = TrainModule(model)
    if compile:
        for layer in model.model.layers:
            layer.compile()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    windows = torch.randint(3, model.config.vocab_size, (2, batch, seq + 1), device=device)

    def step(i: int) -> None:
        w = windows[i % 2]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = module(w[:, :-1], w[:, 1:], 1.0 / (batch * seq))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"train_tokens_per_s": round(steps * batch * seq / seconds, 1), "step_ms": round(1e3 * seconds / steps, 2),
            "warmup_s": round(warm, 1)}


def bench_decode(model, prompt: int, new: int, compile: bool) -> dict:
    """Batch-1 greedy decode tokens/s of ``model`` (bf16 on CUDA) after a ``prompt``-token prefill."""
    device = model.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), device=device)
    positions = torch.arange(prompt, device=device)[None]
    cache = StaticCache.from_config(model.config, 1, prompt + new + 8, dtype, device)
    with torch.inference_mode():
        first = prefill(model, ids, None, positions, cache).argmax(-1, keepdim=True)  # (1, 1)
        step = DecodeStep(model, cache, compile=compile, fuse=True)
        t0 = time.perf_counter()
        decode_n(step, first, positions[:, -1:] + 1, prompt, 4)  # compilation and graph capture
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        decode_n(step, first, positions[:, -1:] + 1, prompt, new)
        sync(device)
        seconds = time.perf_counter() - t0
    return {"decode_tokens_per_s": round(new / seconds, 1), "decode_warmup_s": round(warm, 1)}


def run(preset: str, batch: int, seq: int, warmup: int, steps: int, prompt: int, new: int, compile: bool,
        device: torch.device) -> dict:
    """Every architecture's row, and V2's step time over Llama's with the verdict against :data:`TARGET`."""
    rows = []
    for arch, model_type in ARCHITECTURES.items():
        model = build(preset, model_type, device)
        row = {"arch": arch, "parameters": model.num_parameters()}
        row.update(bench_train(model, batch, seq, warmup, steps, compile))
        row.update(bench_decode(model, prompt, new, compile))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step = {row["arch"]: row["step_ms"] for row in rows}
    ratio = step["diffllama-v2"] / step["llama"]
    return {"preset": preset, "batch": batch, "seq_len": seq, "prompt": prompt, "new": new, "compile": compile,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "rows": rows, "v2_step_over_llama": round(ratio, 3),
            "v2_within_target": ratio <= TARGET}


def table(result: dict) -> str:
    """The rows as a text table, then the V2-vs-Llama verdict."""
    lines = [f"{'arch':<14}{'params':>12}{'train tok/s':>14}{'step ms':>10}{'decode tok/s':>14}"]
    for row in result["rows"]:
        lines.append(f"{row['arch']:<14}{row['parameters']:>12,}{row['train_tokens_per_s']:>14,.0f}"
                     f"{row['step_ms']:>10.1f}{row['decode_tokens_per_s']:>14,.1f}")
    verdict = "within" if result["v2_within_target"] else "NOT within"
    lines.append(f"V2 training step / Llama's: {result['v2_step_over_llama']:.3f}x ({verdict} {TARGET}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="0.4b", help="the trio to compare (default 0.4b)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: the tiny trio, batch 2 x 64 tokens, 1 + 2 steps, 8 new tokens, eager")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's seq_len)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--new", type=int, default=256, help="decode steps timed")
    parser.add_argument("--no-compile", action="store_true", help="eager training and decode steps")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 64, 1, 2
        args.prompt, args.new, args.no_compile = 16, 8, True
    train = get_preset(args.preset)["train"]
    batch, seq = args.batch or train["batch_size"], args.seq or train["seq_len"]
    for name, value in (("--batch", batch), ("--seq", seq), ("--steps", args.steps), ("--new", args.new),
                        ("--prompt", args.prompt)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(args.preset, batch, seq, args.warmup, args.steps, args.prompt, args.new, not args.no_compile,
                 device)
    print(table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "architectures.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out / 'architectures.json'}")
    return result


if __name__ == "__main__":
    main()
