"""Differential attention speed on one GPU: the fused Triton kernel beside SDPA-based forms, and a training step.

Usage (on a CUDA machine, from the repo root):

    PYTHONPATH=src python benchmarks/attention.py [--dims 64,128] [--seqs 1024,2048,4096,8192,16384]
                                                  [--tokens 16384] [--heads 16] [--no-layer] [--no-train]
                                                  [--out DIR]

Sections (each in its own try/except, printed as it goes, JSON to DIR/attention.json, default $OUT or benchmarks/):

1. peak: an 8192³ bf16 matmul on random data (median of do_bench), the "measured bf16 matmul peak".
2. core attention, causal, bf16, B = tokens / S, H heads (KV = H), head_dim d; forward and forward + backward
   (torch.autograd.grad of a random dO) median times, peak memory of forward + backward above the inputs:
     flash     ours, ``diffllama.attention.flash.attention`` (returns o1 − λ·o2), default settings
     flash-atomic the same with dQ added by float32 atomics in the dK/dV' kernel (``dq_mode="atomic"``)
     flash-fused / flash-split  the backward launch form that ``"auto"`` does not pick at this head_dim
                   (``bwd_mode``: dK and dV' in one launch, or in two)
     sdpa      ours, ``diffllama.attention.sdpa.attention`` (one SDPA call, 2d-wide value)
     hf-2call  transformers' DiffLlama form: two calls of transformers' ``sdpa_attention_forward`` over the two
               value halves, cat, o1 − λ·o2 (the lines of ``DiffLlamaAttention.forward``)
     hf-2call-fa2  the same with SDPA limited to FlashAttention-2 and memory-efficient kernels (no cuDNN)
     llama     ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` at the same H and d: no differential cost
               (PyTorch 2.11 dispatches it to cuDNN attention on an H100/H200)
     llama-cudnn / llama-fa2  the same call limited to cuDNN attention / to FlashAttention-2 and memory-efficient
   check: relative L2 difference of (out, dq, dk, dv, dλ) from float32 eager on the same bf16 inputs (S <= 4096),
   else from the flash row; for the llama rows, of (out, dq, dk, dv) from float32 SDPA (math kernel).
   TFLOP/s counts 1.5× a Llama causal attention's FLOPs for the differential rows (forward 1.5·2·B·H·S²·d,
   forward + backward 3.5× that) and 1× for the llama row, so every row's TFLOP/s is useful work per second.
3. train (below), then layer: whole attention modules (projections, RoPE, norm): transformers' ``DiffLlamaAttention`` (sdpa),
   ours with flash and with sdpa, transformers' ``LlamaAttention`` (sdpa), forward + backward.
4. train: one optimizer step (AdamW, bf16 weights) of ``DiffLlamaForCausalLM`` at the 0.4b shape (hidden 1024,
   24 layers, 16 heads, intermediate 2816, vocab 32000), batch 8 × 2048 tokens, flash vs sdpa.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

RESULTS: dict = {"core": [], "layer": [], "train": []}


def bench(fn, warmup=10, rep=50) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192 ** 3 / ms / 1e9


def _core_impls(h: int, d: int):
    from transformers import DiffLlamaConfig as HFConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention as HFAttn

    from diffllama.attention import flash, sdpa

    hf_mod = HFAttn(HFConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h, head_dim=d,
                             attn_implementation="sdpa"), layer_idx=1)

    def hf_two_call(q, k, v, mask, scale, lam):
        v1, v2 = (x.repeat(1, 2, 1, 1) for x in torch.chunk(v, 2, dim=1))
        o1, _ = sdpa_attention_forward(hf_mod, q, k, v1, None, dropout=0.0, scaling=scale)
        o2, _ = sdpa_attention_forward(hf_mod, q, k, v2, None, dropout=0.0, scaling=scale)
        out = torch.cat([o1, o2], dim=-1)  # (B, S, H, 2d)
        a, b = torch.chunk(out, 2, dim=2)
        return a - lam * b

    def ours(backend, **variant):
        return lambda q, k, v, mask, scale, lam: backend(q, k, v, mask, scale=scale, lambda_full=lam, **variant)[0]

    def llama(q, k, v, mask, scale, lam):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    def on(backends, fn):
        # The backward op follows the forward op SDPA picked, so only the forward needs the context.
        def run(*args):
            with sdpa_kernel(backends):
                return fn(*args)
        return run

    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return {"flash": ours(flash.attention), "flash-atomic": ours(flash.attention, dq_mode="atomic"),
            "flash-fused": ours(flash.attention, bwd_mode="fused"), "flash-split": ours(flash.attention, bwd_mode="split"),
            "sdpa": ours(sdpa.attention),
            "hf-2call": hf_two_call, "hf-2call-fa2": on(no_cudnn, hf_two_call), "llama": llama,
            "llama-cudnn": on([SDPBackend.CUDNN_ATTENTION], llama), "llama-fa2": on(no_cudnn, llama)}


EAGER_MAX_S = 4096  # float32 eager materialises (B, H, S, S) scores: 4.3 GB each at 16384 tokens, S = 4096


def _eager_reference(q, k, v, lam, mask, dout):
    """(out, dq, dk, dv, dλ) of this project's eager backend in float32 on the same bf16 inputs."""
    from diffllama.attention.eager import attention as eager

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, lam)]
    out, _ = eager(*leaves[:3], mask, scale=q.shape[-1] ** -0.5, lambda_full=leaves[3])
    grads = torch.autograd.grad(out, leaves, dout.float())
    result = (out.detach(), *grads)
    del out, leaves
    torch.cuda.empty_cache()
    return result


def _llama_reference(q, k, v, dout):
    """(out, dq, dk, dv) of plain causal attention in float32 (SDPA's math kernel) on the same bf16 inputs."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    result = (out.detach(), *torch.autograd.grad(out, leaves, dout.float()))
    del out, leaves
    torch.cuda.empty_cache()
    return result


def _errors(got, ref) -> str:
    """Relative L2 error of each tensor in ``got`` against ``ref``, formatted."""
    return " ".join(f"{((x.float() - r.float()).norm() / r.float().norm()).item():.1e}" for x, r in zip(got, ref))


def core(dims, seqs, tokens, heads, peak) -> None:
    import triton

    from diffllama.attention import AttentionMask, flash

    print(f"\n== core attention, causal bf16, H={heads}, B=tokens/S (tokens={tokens}); matmul peak {peak:.0f} TFLOP/s")
    print(f"{'d':>4} {'S':>6} {'B':>3} {'impl':>11} {'fwd ms':>8} {'TF/s':>6} {'%peak':>6} {'f+b ms':>8} {'TF/s':>6} "
          f"{'vs llama':>8} {'peak MiB':>9}  check")
    for d in dims:
        impls = _core_impls(heads, d)
        for s in seqs:
            b = max(1, tokens // s)
            gen = torch.Generator(device="cuda").manual_seed(s + d)
            mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
            q, k, v = (mk(b, heads, s, d).requires_grad_() for _ in range(3))
            lam = torch.tensor(0.3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            mask = AttentionMask(torch.arange(s, device="cuda"), None, s, plain_causal=True)
            llama_flops = 2 * b * heads * s * s * d  # causal: half of 4·B·H·S²·d
            llama_fb = llama_ref = None
            douts = {"llama": mk(b, heads, s, d), "diff": mk(b, s, heads // 2, 2 * d)}
            ref_outs, ref_name = None, "flash"
            if s <= EAGER_MAX_S:  # the float32 eager reference decides which gradients are right
                ref_outs, ref_name = _eager_reference(q, k, v, lam, mask, douts["diff"]), "eager32"
            alt = "flash-fused" if flash._bwd_split("auto", triton.next_power_of_2(d)) else "flash-split"
            for name in ("llama", "llama-cudnn", "llama-fa2", "flash", "flash-atomic", alt, "sdpa", "hf-2call",
                         "hf-2call-fa2"):
                fn = impls[name]
                row = dict(d=d, S=s, B=b, H=heads, impl=name)
                try:
                    out = fn(q, k, v, mask, d ** -0.5, lam)
                    is_llama = name.startswith("llama")
                    dout = douts["llama" if is_llama else "diff"]
                    inputs = (q, k, v) if is_llama else (q, k, v, lam)
                    check = ""
                    if is_llama and s <= EAGER_MAX_S:
                        llama_ref = llama_ref or _llama_reference(q, k, v, dout)
                        check = "vs sdpa32: " + _errors((out, *torch.autograd.grad(out, inputs, dout)), llama_ref)
                    elif not is_llama:
                        grads = torch.autograd.grad(out, inputs, dout)
                        if ref_outs is None:
                            ref_outs = (out.detach(), *grads)
                        else:
                            check = f"vs {ref_name}: " + _errors((out, *grads), ref_outs)
                        del grads
                    fwd = bench(lambda: fn(q, k, v, mask, d ** -0.5, lam))
                    fb = bench(lambda: torch.autograd.grad(fn(q, k, v, mask, d ** -0.5, lam), inputs, dout))
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    torch.autograd.grad(fn(q, k, v, mask, d ** -0.5, lam), inputs, dout)
                    torch.cuda.synchronize()
                    mem = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    flops = llama_flops * (1.0 if is_llama else 1.5)
                    if name == "llama":
                        llama_fb = fb
                    row.update(fwd_ms=fwd, fwd_tflops=flops / fwd / 1e9, fb_ms=fb, fb_tflops=3.5 * flops / fb / 1e9,
                               peak_mib=mem, vs_llama=fb / llama_fb if llama_fb else None, check=check)
                    print(f"{d:>4} {s:>6} {b:>3} {name:>11} {fwd:8.3f} {row['fwd_tflops']:6.0f} "
                          f"{100 * row['fwd_tflops'] / peak:5.1f}% {fb:8.3f} {row['fb_tflops']:6.0f} "
                          f"{row['vs_llama'] or 0:8.2f} {mem:9.0f}  {check}", flush=True)
                except Exception as err:  # noqa: BLE001 - one failing row must not stop the table
                    row["error"] = repr(err)[:300]
                    print(f"{d:>4} {s:>6} {b:>3} {name:>11} ERROR {row['error']}", flush=True)
                RESULTS["core"].append(row)
            del q, k, v, lam
            torch.cuda.empty_cache()
    print("\nlaunch configs picked by the autotuner, per (kernel, padded head_dim) and tuning key:")
    for (kind, dp), tuner in sorted(flash._TUNED.items()):
        for key, config in tuner.cache.items():
            print(f"  {kind:>4} d{dp} {key}: {config}")


def layer(d: int, seqs, tokens, heads) -> None:
    import transformers
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention as HFDiff
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaRotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaAttention as HFLlama

    from diffllama import DiffLlamaConfig
    from diffllama.attention import AttentionMask
    from diffllama.modeling import DiffLlamaAttention
    from diffllama.rope import RotaryEmbedding

    hidden = heads * d
    print(f"\n== attention layer (projections, RoPE, norm), causal bf16, d={d}, H={heads}, forward + backward")
    print(f"{'S':>6} {'B':>3} {'impl':>12} {'f+b ms':>8} {'vs llama':>8}")
    hf_cfg = transformers.DiffLlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                                          head_dim=d, attn_implementation="sdpa")
    ll_cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                                      head_dim=d, attn_implementation="sdpa")
    mods = {"hf-diffllama": HFDiff(hf_cfg, layer_idx=1), "hf-llama": HFLlama(ll_cfg, layer_idx=1)}
    for impl in ("flash", "sdpa"):
        cfg = DiffLlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                              intermediate_size=4 * hidden, attn_implementation=impl)
        mods[f"ours-{impl}"] = DiffLlamaAttention(cfg, layer_idx=1)
    for m in mods.values():
        m.to("cuda", torch.bfloat16)
    hf_rope = DiffLlamaRotaryEmbedding(hf_cfg).to("cuda")
    our_rope = RotaryEmbedding(DiffLlamaConfig(hidden_size=hidden, num_attention_heads=heads,
                                               intermediate_size=4 * hidden)).to("cuda")
    for s in seqs:
        b = max(1, tokens // s)
        x = torch.randn(b, s, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(s, device="cuda")[None]
        hf_pe = hf_rope(x, pos)
        our_pe = our_rope(x, pos)
        mask = AttentionMask(torch.arange(s, device="cuda"), None, s, plain_causal=True)
        dy = torch.randn_like(x)
        llama_ms = None
        for name in ("hf-llama", "ours-flash", "ours-sdpa", "hf-diffllama"):
            m = mods[name]
            if name.startswith("hf"):
                fn = lambda: m(x, hf_pe, None)[0]  # noqa: E731
            else:
                fn = lambda: m(x, our_pe, mask)[0]  # noqa: E731
            try:
                params = [p for p in m.parameters()]
                ms = bench(lambda: torch.autograd.grad(fn(), [x, *params], dy))
                llama_ms = llama_ms or ms
                RESULTS["layer"].append(dict(d=d, S=s, B=b, impl=name, fb_ms=ms, vs_llama=ms / llama_ms))
                print(f"{s:>6} {b:>3} {name:>12} {ms:8.3f} {ms / llama_ms:8.2f}", flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"{s:>6} {b:>3} {name:>12} ERROR {repr(err)[:300]}", flush=True)


def train_step() -> None:
    from diffllama import DiffLlamaConfig
    from diffllama.modeling import DiffLlamaForCausalLM

    print("\n== training step, 0.4b shape, batch 8 x 2048, bf16 weights, AdamW")
    for impl in ("flash", "sdpa"):
        try:
            cfg = DiffLlamaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  num_key_value_heads=16, intermediate_size=2816, vocab_size=32000,
                                  max_position_embeddings=4096, attn_implementation=impl)
            torch.manual_seed(0)
            model = DiffLlamaForCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda").train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ids = torch.randint(0, 32000, (8, 2048), device="cuda")

            def step():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            losses = [step().item() for _ in range(3)]
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(6):
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            ms = sorted(times)[len(times) // 2]
            mem = torch.cuda.max_memory_allocated() / 2 ** 30
            tok_s = 8 * 2048 / ms * 1e3
            RESULTS["train"].append(dict(impl=impl, step_ms=ms, tokens_per_s=tok_s, peak_gib=mem, first_losses=losses))
            print(f"{impl:>6}: step {ms:8.1f} ms  {tok_s:9.0f} tok/s  peak {mem:5.1f} GiB  losses {losses}", flush=True)
            del model, opt
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            print(f"{impl:>6}: ERROR {repr(err)[:300]}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layer-seqs", default="8192")
    parser.add_argument("--no-layer", action="store_true")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    args = parser.parse_args(argv)
    dims = [int(x) for x in args.dims.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    peak = matmul_peak()
    RESULTS["matmul_peak_tflops"] = peak
    print(f"bf16 matmul peak (8192^3, random, median): {peak:.0f} TFLOP/s", flush=True)
    sections = [lambda: core(dims, seqs, args.tokens, args.heads, peak)]
    if not args.no_train:
        sections.append(train_step)
    if not args.no_layer:
        sections.append(lambda: layer(128, [int(x) for x in args.layer_seqs.split(",")], args.tokens, args.heads))
    for section in sections:
        try:
            section()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
