"""Pick the flash backward's launch configurations: every candidate checked against float32 eager, then timed.

For each head_dim, each backward form (``fused``: dK and dV' in one launch; ``split``: a dK launch then a dV' launch;
``dq-kernel``: the dQ kernel; dQ always from its own kernel, the default) and each candidate configuration in
``flash._configs``, this script
1. checks q/k/v/λ gradients against float32 eager on a GQA, left-padded problem (relative L2 error, must be < 2e-2);
2. times the backward alone (``flash._backward`` on saved forward outputs; ``triton.testing.do_bench``, median)
   at H=16 heads, causal, bf16, 16384 tokens per batch (B = 16384 / S).
Per form, one configuration varies while the other kernels are autotuned over all their candidates. A losing
candidate leaves ``_configs``; the first of each list stays the one the GPU tests ran (it is what
``DIFFLLAMA_FLASH_AUTOTUNE=0`` takes). The table printed here is recorded in RESULTS.md.

With ``--fwd`` it instead prints the autotuner's time for every forward candidate. With ``--forms`` it instead
runs each whole form autotuned (dK/dV' in one or two launches x dQ by its own kernel
or by atomics): the same gradient check, then the backward time.

Run on the device machine from the repo root:
    PYTHONPATH=src python benchmarks/tune_flash_bwd.py [--dims 128,64] [--seqs 8192,4096] [--forms | --fwd]
                                                       [--only split,dq-kernel]
"""

from __future__ import annotations

import argparse

import torch
import triton

from diffllama.attention import AttentionMask, flash
from diffllama.attention.eager import attention as eager


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(d: int, bwd_mode: str, dq_mode: str) -> list[float]:
    """Relative errors of (dq, dk, dv, dλ) of one backward form against float32 eager."""
    gen = torch.Generator(device="cuda").manual_seed(d)
    b, h, kv, s = 2, 8, 4, 777
    q, k, v = (torch.randn(b, n, s, d, device="cuda", generator=gen) for n in (h, kv, kv))
    lam = torch.tensor(0.4, device="cuda")
    dout = torch.randn(b, s, h // 2, 2 * d, device="cuda", generator=gen)
    pad = torch.ones(b, s, dtype=torch.bool, device="cuda")
    pad[1, :100] = False
    mask = AttentionMask(torch.arange(s, device="cuda"), pad, s)
    errs = []
    grads = {}
    variant = dict(bwd_mode=bwd_mode, dq_mode=dq_mode)
    for name, fn, dtype, options in (("ref", eager, torch.float32, {}), ("flash", flash.attention, torch.bfloat16, variant)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, lam)]
        out, _ = fn(*leaves[:3], mask, scale=d ** -0.5, lambda_full=leaves[3], **options)
        grads[name] = torch.autograd.grad(out, leaves, dout.to(dtype))
    for got, ref in zip(grads["flash"], grads["ref"]):
        errs.append(_rel(got, ref))
    return errs


VARIANT = (True, False, [16, 16])  # autotune, no debug print, interpreter blocks (unused on the GPU)


def time_backward(d: int, s: int, bwd_mode: str, dq_mode: str) -> float:
    b, h = 16384 // s, 16
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lam = torch.tensor([0.4], device="cuda")
    qpos = torch.arange(s, device="cuda")
    out, o2, lse = flash._forward(q, k, v, qpos, None, None, lam, d ** -0.5, VARIANT, False)
    dout = torch.randn_like(out)
    return triton.testing.do_bench(lambda: flash._backward(dout, q, k, v, out, o2, lse, qpos, None, None, lam,
                                                           d ** -0.5, VARIANT, False, dq_mode, bwd_mode),
                                   warmup=50, rep=200)


def compare_forms(dims: list[int], seqs: list[int]) -> None:
    """Every backward form (dK/dV' launch x dQ mode), each autotuned: gradient check, then time."""
    print(f"{'d':>4} {'launch':>6} {'dq':>7} {'max err':>8} " + " ".join(f"{'bwd ms S=' + str(s):>14}" for s in seqs),
          flush=True)
    for d in dims:
        for mode in ("split", "fused"):
            for dq_mode in ("kernel", "atomic"):
                try:
                    err = max(check(d, mode, dq_mode))
                    times = [time_backward(d, s, mode, dq_mode) for s in seqs] if err < 2e-2 else []
                    cols = " ".join(f"{t:14.3f}" for t in times) or "  (failed check: not timed)"
                except Exception as error:  # noqa: BLE001 - report and go on
                    err, cols = float("nan"), f"  error: {type(error).__name__}: {str(error)[:200]}"
                print(f"{d:>4} {mode:>6} {dq_mode:>7} {err:8.1e} {cols}", flush=True)
                torch.cuda.empty_cache()


def forward_configs(d: int, seqs: list[int]) -> None:
    """The autotuner's time for every forward launch candidate (bf16, causal, H=16, 16384 tokens per batch)."""
    for s in seqs:
        b = 16384 // s
        q, k, v = (torch.randn(b, 16, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lam, qpos = torch.tensor([0.4], device="cuda"), torch.arange(s, device="cuda")
        flash._forward(q, k, v, qpos, None, None, lam, d ** -0.5, VARIANT, False)
        tuner = flash._TUNED[("fwd", d)]
        times = {str(c): round(float(ms[0] if isinstance(ms, (list, tuple)) else ms), 3)
                 for c, ms in tuner.configs_timings.items()}
        print(s, "best", tuner.best_config, times, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--seqs", default="8192,4096")
    parser.add_argument("--forms", action="store_true", help="compare the autotuned backward forms instead")
    parser.add_argument("--fwd", action="store_true", help="time every forward launch candidate instead")
    parser.add_argument("--only", default="fused,split,dq-kernel", help="per-kernel mode: the forms to tune")
    args = parser.parse_args()
    if args.fwd:
        for d in (int(x) for x in args.dims.split(",")):
            forward_configs(d, [int(x) for x in args.seqs.split(",")])
        return
    if args.forms:
        compare_forms([int(x) for x in args.dims.split(",")], [int(x) for x in args.seqs.split(",")])
        return
    seqs = [int(x) for x in args.seqs.split(",")]
    base_configs = flash._configs
    forms = {"fused": ("fused", "kernel", ["dkdv"]), "split": ("split", "kernel", ["dk", "dv"]),
             "dq-kernel": ("auto", "kernel", ["dq"])}
    forms = {name: form for name, form in forms.items() if name in args.only.split(",")}
    print(f"{'d':>4} {'form':>9} {'kernel':>6} {'config (BM, BN, warps, stages)':>32} {'max err':>8} "
          + " ".join(f"{'bwd ms S=' + str(s):>14}" for s in seqs), flush=True)
    for d in (int(x) for x in args.dims.split(",")):
        for form, (mode, dq_mode, kinds) in forms.items():
            for kind in kinds:
                for cfg in base_configs(kind, d):
                    flash._configs = lambda k, dp, _c=cfg, _k=kind: [_c] if k == _k else base_configs(k, dp)
                    flash._TUNED.clear()  # the autotuners were built from the previous trial's candidates
                    label = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
                    try:
                        err = max(check(d, mode, dq_mode))
                        times = [time_backward(d, s, mode, dq_mode) for s in seqs] if err < 2e-2 else []
                        cols = " ".join(f"{t:14.3f}" for t in times) or "  (failed check: not timed)"
                    except Exception as error:  # noqa: BLE001 - report and go on to the next candidate
                        err, cols = float("nan"), f"  error: {type(error).__name__}: {str(error)[:80]}"
                    print(f"{d:>4} {form:>9} {kind:>6} {str(label):>32} {err:8.1e} {cols}", flush=True)
                    torch.cuda.empty_cache()
            flash._configs = base_configs


if __name__ == "__main__":
    main()
