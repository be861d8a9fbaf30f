"""Training throughput: diffllama vs transformers' DiffLlama and Llama of the same shape, in one run.

Each case trains on random token batches with the same recipe: float32 master weights, bf16 autocast, fused AdamW,
gradient clipping at 1.0; diffllama uses its training module (chunked LM head + cross-entropy, see
``diffllama.train.loss``), transformers' models their own ``labels=`` loss. Per case: warm-up steps, then timed
steps between ``torch.cuda.synchronize()`` calls; tokens/s = timed tokens / seconds; peak memory from
``torch.cuda.max_memory_allocated``.

MFU = achieved model FLOP/s over 989 TFLOP/s (H100/H200 SXM dense bf16 datasheet). Model FLOPs per token
(PaLM appendix B convention, causal mask not discounted): 6·N + 6·L·S·(QK width + PV width), N = parameters in
matrix products (all but the input embedding, LM head included), QK width = H·d, PV width = H·d for Llama and
2·H·d for DiffLlama in the fused form (transformers' two-call DiffLlama computes more than this; the same
model-FLOP count is used for both DiffLlama implementations so MFU compares like with like).

With ``--document-mask`` every row holds documents of ``--document-length`` tokens (default 1024), each ended by
token 2 as EOS: ours trains with the document mask of ``diffllama train --document-mask`` (TrainModule's
``document_separator``), transformers' models get position_ids that restart per document (their packed-sequence
mask; no cache). Without it the rows are the same random tokens, one sequence per row. Compare the two runs'
tokens/s for the cost of document masking.

Usage (GPU): PYTHONPATH=src python benchmarks/train.py --cases ours-sdpa,hf-diffllama,hf-llama,ours-1b-sdpa
Case names: ours-{sdpa,flash}[-compile][-ckpt], hf-diffllama, hf-llama; '-1b' in a name selects the 1.2B shape\n(batch 4 x 4096), else the 0.4b preset's (batch 8 x 2048). Each case runs in its own process (a crash cannot\nspoil the next). Prints one JSON line per case and a table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import torch

PEAK_FLOPS = 989e12

SHAPES = {
    "0.4b": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, batch=8, seq=2048),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, batch=4, seq=4096),
}


def flops_per_token(shape: dict, n_matmul: int, diff: bool) -> float:
    """Model FLOPs per trained token (forward + backward) by the formula in the module docstring."""
    h, d = shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    attn = 6 * shape["num_hidden_layers"] * shape["seq"] * (h * d + (2 if diff else 1) * h * d)
    return 6 * n_matmul + attn


EOS = 2  # the document separator of --document-mask; random tokens are drawn above it


def build(case: str, shape: dict, device: torch.device, document_mask: bool = False):
    """(module, step_loss_fn, n_matmul_params, is_diff) for a case name; ``document_mask``: rows are packed
    documents ended by :data:`EOS` (see the module docstring)."""
    fields = {k: v for k, v in shape.items() if k not in ("batch", "seq")}
    if case.startswith("ours"):
        from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM
        from diffllama.train.loop import TrainModule

        impl = "flash" if "flash" in case else "sdpa"
        config = DiffLlamaConfig(**fields, attn_implementation=impl)
        with torch.device(device):
            model = DiffLlamaForCausalLM(config)
        module = TrainModule(model, document_separator=EOS if document_mask else None)
        if "compile" in case:
            for layer in model.model.layers:
                layer.compile()
        if "ckpt" in case:
            model.gradient_checkpointing_enable()

        def loss_fn(x, y, scale):
            return module(x, y, scale)
        embed = model.model.embed_tokens.weight.numel()
        return module, loss_fn, model.num_parameters() - embed, True
    import transformers

    cls_cfg = transformers.DiffLlamaConfig if case == "hf-diffllama" else transformers.LlamaConfig
    config = cls_cfg(**fields, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()

    def loss_fn(x, y, scale):
        packing = {}
        if document_mask:  # transformers masks documents from position_ids restarts (no mask, no cache)
            from diffllama.masks import document_position_ids
            from diffllama.train.loop import separator_documents

            packing["position_ids"] = document_position_ids(separator_documents(x, EOS))
        return model(input_ids=x, labels=x, use_cache=False, **packing).loss
    embed = model.get_input_embeddings().weight.numel()
    return model, loss_fn, sum(p.numel() for p in model.parameters()) - embed, case == "hf-diffllama"


def bench(case: str, shape_name: str, warmup: int, steps: int, document_length: int = 0) -> dict:
    """One case's timing; ``document_length`` > 0: packed documents of that many tokens with document masking."""
    shape = SHAPES[shape_name]
    device = torch.device("cuda")
    torch.manual_seed(0)
    module, loss_fn, n_matmul, diff = build(case, shape, device, document_mask=document_length > 0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    b, s = shape["batch"], shape["seq"]
    batches = [torch.randint(EOS + 1, shape["vocab_size"], (b, s + 1), device=device) for _ in range(4)]
    if document_length:
        for w in batches:
            w[:, document_length - 1::document_length] = EOS
    scale = 1.0 / (b * s)

    def step(i):
        w = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(w[:, :-1], w[:, 1:], scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = steps * b * s / dt
    fpt = flops_per_token(shape, n_matmul, diff)
    result = {"case": case, "shape": shape_name, "batch": b, "seq": s, "tokens_per_s": round(tps),
              "step_ms": round(1000 * dt / steps, 1), "mfu": round(tps * fpt / PEAK_FLOPS, 4),
              "gflop_per_token": round(fpt / 1e9, 3), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
              "warmup_s": round(warm_s, 1), "loss": round(float(loss.detach()), 4),
              "document_length": document_length or None}
    del module, opt, batches, loss_fn
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="ours-sdpa,ours-sdpa-compile,ours-flash-compile,hf-diffllama,hf-llama,"
                                           "ours-1b-flash-compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip remaining cases after this many seconds (default: no limit)")
    parser.add_argument("--document-mask", action="store_true",
                        help="rows of packed documents (see --document-length), trained with document masking")
    parser.add_argument("--document-length", type=int, default=1024, help="tokens per document with --document-mask")
    parser.add_argument("--single", help="run one case in this process (used internally)")
    args = parser.parse_args()
    if args.document_mask and args.document_length < 1:
        parser.error(f"--document-length must be >= 1, got {args.document_length}")
    if args.single:
        shape = "1b" if "-1b" in args.single else "0.4b"
        length = args.document_length if args.document_mask else 0
        print(json.dumps(bench(args.single.replace("-1b", ""), shape, args.warmup, args.steps, length)), flush=True)
        return
    start = time.perf_counter()
    results = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for case in args.cases.split(","):
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
        shape = "1b" if "-1b" in case else "0.4b"
        name = case.replace("-1b", "")
        if left is not None and left <= 5:
            result = {"case": name, "shape": shape, "skipped": "time budget"}
        else:
            # One process per case: a crash (e.g. an illegal memory access) cannot poison the next case.
            command = [sys.executable, __file__, "--single", case, "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--document-length", str(args.document_length)]
            command += ["--document-mask"] if args.document_mask else []
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=left)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode == 0 and lines:
                    result = json.loads(lines[-1])
                else:
                    tail = [line for line in proc.stderr.strip().splitlines() if "Error" in line] or ["?"]
                    result = {"case": name, "shape": shape, "error": tail[-1][:300]}
            except subprocess.TimeoutExpired:
                result = {"case": name, "shape": shape, "skipped": "time budget (killed)"}
        results.append(result)
        print(json.dumps(result), flush=True)
    base = next((r["tokens_per_s"] for r in results if r.get("case") == "hf-diffllama" and "tokens_per_s" in r), None)
    print(f"\n{'case':<24}{'shape':<6}{'tokens/s':>10}{'MFU':>8}{'mem GiB':>9}{'vs hf-diffllama':>17}{'vs 85.0k':>10}")
    for r in results:
        if "tokens_per_s" in r:
            same = r["shape"] == "0.4b"
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base and same else "-"
            ref = f"{r['tokens_per_s'] / 85000:.2f}x" if same else "-"
            print(f"{r['case']:<24}{r['shape']:<6}{r['tokens_per_s']:>10,}{r['mfu']:>8.1%}{r['peak_mem_gib']:>9}"
                  f"{ratio:>17}{ref:>10}")
        else:
            print(f"{r['case']:<24}{r['shape']:<6}  {r.get('error', r.get('skipped'))}")


if __name__ == "__main__":
    main()
