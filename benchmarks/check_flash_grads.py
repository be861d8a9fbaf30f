"""GPU check of the flash and sdpa backends' gradients at benchmark-sized shapes (head_dim 64, MHA and GQA).

The attention benchmark saw flash's q/k/v gradients disagree with sdpa (then free to use cuDNN attention) at
head_dim 64 and with transformers' two-call form (RESULTS.md); this script settles which is right by comparing
flash, sdpa (no cuDNN, as shipped) and sdpa forced onto cuDNN with the eager backend in float32 on the same bf16
inputs.
Prints relative L2 errors per tensor.
Run on the device machine from the repo root:  PYTHONPATH=src python benchmarks/check_flash_grads.py
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from diffllama.attention import AttentionMask
from diffllama.attention import flash, sdpa
from diffllama.attention.eager import attention as eager


def grads(fn, q, k, v, lam, mask, dout, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
    out, _ = fn(*leaves[:3], mask, scale=scale, lambda_full=leaves[3])
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main() -> None:
    torch.manual_seed(0)
    for d, h, kv, s, b in [(64, 16, 16, 2048, 4), (64, 16, 4, 1000, 3)]:
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16)
        lam = torch.tensor(0.35, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(b, s, h // 2, 2 * d, device="cuda")
        mask = AttentionMask(query_positions=torch.arange(s, device="cuda"), key_padding=None, k_len=s,
                             plain_causal=True)
        ref = grads(eager, q.float(), k.float(), v.float(), lam.float(), mask, dout, d ** -0.5)
        rows = {"sdpa": grads(sdpa.attention, q, k, v, lam, mask, dout, d ** -0.5)}
        # The same call with SDPA forced onto cuDNN (torch 2.11's default on Hopper, excluded by our backend).
        sdpa.CUDA_BACKENDS, saved = [SDPBackend.CUDNN_ATTENTION], sdpa.CUDA_BACKENDS
        try:
            rows["sdpa-cudnn-only"] = grads(sdpa.attention, q, k, v, lam, mask, dout, d ** -0.5)
        except RuntimeError as error:
            print(f"cuDNN SDPA not available here: {error}")
        sdpa.CUDA_BACKENDS = saved
        rows["flash"] = grads(flash.attention, q, k, v, lam, mask, dout, d ** -0.5)
        rows["flash-again"] = grads(flash.attention, q, k, v, lam, mask, dout, d ** -0.5)
        for name, got in rows.items():
            errs = " ".join(f"{n} {rel(g, r):.1e}" for n, g, r in zip(("out", "dq", "dk", "dv", "dlam"), got, ref))
            print(f"d{d} H{h} KV{kv} S{s} B{b} {name:>18}: {errs}", flush=True)
        print({k: str(v.best_config) for k, v in flash._TUNED.items()}, flush=True)


if __name__ == "__main__":
    main()
