"""transformers' DiffLlamaForCausalLM with and without ``diffllama.integrations.transformers.apply``, in one call:
training-step tokens/s of both, and the gradients of both against a float32 eager reference.

Speed: each model trains on the same random token batches with bf16 autocast over float32 master weights, fused
AdamW; warm-up steps, then timed steps between ``torch.cuda.synchronize()`` calls; tokens/s = timed tokens /
seconds; peak memory from ``torch.cuda.max_memory_allocated``. The patched model runs diffllama's flash kernel
(plain causal rows: transformers passes no mask then); the unpatched one transformers' two SDPA calls per layer.

Gradients: one batch, the same weights; the loss's gradients in bf16 autocast, for the unpatched model (its sdpa
path, whichever SDPA kernel torch picks, cuDNN included) and the patched one, each compared with transformers'
eager attention in float32 on the same weights: max |g - g_ref| / max |g_ref| per q/k/v/o projection and λ vector,
the worst over layers, printed per kind.

Usage (GPU): PYTHONPATH=src python benchmarks/hf_integration.py [--shape 0.4b|1b] [--steps 10] [--warmup 3]
Prints one JSON line per measurement and a table. No results are claimed here until run on the GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from diffllama.integrations.transformers import apply

SHAPES = {
    "0.4b": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, batch=8, seq=2048),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, batch=4, seq=4096),
}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def build(shape: dict, attn: str):
    """A float32 transformers DiffLlamaForCausalLM of ``shape`` on the GPU, seeded, with ``attn`` masks."""
    import transformers

    fields = {k: v for k, v in shape.items() if k not in ("batch", "seq")}
    config = transformers.DiffLlamaConfig(**fields)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.DiffLlamaForCausalLM(config).cuda()


def batch(shape: dict, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(3, shape["vocab_size"], (shape["batch"], shape["seq"]), device="cuda", generator=gen)


def train_speed(model, shape: dict, steps: int, warmup: int) -> dict:
    """Tokens/s and peak memory of ``steps`` timed training steps after ``warmup`` untimed ones."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step(i):
        ids = batch(shape, i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * shape["batch"] * shape["seq"] / seconds,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def gradients(model, ids: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    """name -> float32 gradient of the LM loss on ``ids`` for the attention parameters."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if any(k in n for k in KINDS)}


def worst_errors(grads: dict, reference: dict) -> dict[str, float]:
    """kind -> the worst over layers of max |g - g_ref| / max |g_ref|."""
    out = {}
    for name, ref in reference.items():
        kind = next(k for k in KINDS if k in name)
        error = ((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        out[kind] = max(out.get(kind, 0.0), error)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.4b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/hf_integration.py needs a CUDA GPU")
    shape = SHAPES[args.shape]
    rows = {}
    for name in ("transformers-sdpa", "diffllama-patched"):
        model = build(shape, "sdpa")
        if name == "diffllama-patched":
            apply(model)
        rows[name] = train_speed(model, shape, args.steps, args.warmup)
        print(json.dumps({"case": name, "shape": args.shape, **rows[name]}), flush=True)
        del model
        torch.cuda.empty_cache()

    small = dict(shape, batch=1, seq=min(shape["seq"], 2048))  # the eager reference holds (B, H, S, S) scores
    ids = batch(small, 1234)
    reference_model = build(small, "eager")
    reference = gradients(reference_model, ids, autocast=False)
    for name in ("transformers-sdpa", "diffllama-patched"):
        model = copy.deepcopy(reference_model)
        model.set_attn_implementation("sdpa")
        if name == "diffllama-patched":
            apply(model)
        errors = worst_errors(gradients(model, ids, autocast=True), reference)
        rows[name]["grad_rel_error"] = errors
        print(json.dumps({"case": name, "grad_vs_fp32_eager": errors}), flush=True)
        del model

    print(f"\n{'case':<20} {'tokens/s':>12} {'peak GB':>8}  " + " ".join(f"{k:>10}" for k in KINDS))
    for name, row in rows.items():
        print(f"{name:<20} {row['tokens_per_s']:>12,.0f} {row['peak_gb']:>8.1f}  "
              + " ".join(f"{row['grad_rel_error'][k]:>10.2e}" for k in KINDS))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
