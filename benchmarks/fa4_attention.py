"""FlashAttention-4 (CuTe DSL, Hopper) at value width 2d beside Llama's kernels and our Triton kernel (issue 19).

Usage (on an H100/H200 with the wheels of ``benchmarks/fa4_setup.sh`` installed, from the repo root):

    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:src:benchmarks \\
        python3 benchmarks/fa4_attention.py [--dims 128,64] [--seqs 4096,8192,16384] [--tokens 16384] [--out DIR]

Causal bf16, B = tokens / S, H = 16 heads at d = 128 and 32 at d = 64 (so H·d = 2048 either way), KV = H. Every
row runs in its native layout on the same values: SDPA and ours on contiguous (B, H, S, d), FA4 on contiguous
(B, S, H, d). Rows:

    llama-cudnn  ``F.scaled_dot_product_attention`` limited to cuDNN attention (PyTorch 2.11's default on Hopper)
    llama-fa2    the same limited to FlashAttention-2 / memory-efficient kernels
    fa4-d        ``flash_attn.cute.flash_attn_func`` at value width d: Llama on FA4
    fa4-2d       the same at value width 2d (q/k width d, v width 2d, one softmax): the fused differential kernel
                 alone, without the pairing of V or the ``o1 − λ·o2`` combine
    fa4-2d-alt   only where fa4-2d failed: fa4-2d on smaller tiles of FA4's own (see :func:`_wide_value_tiles`)
    fa4-diff     the whole differential op on fa4-2d (on fa4-2d-alt's tiles where only those worked), in plain
                 autograd: V' of each head pair built from v as :func:`diffllama.attention.pair_values` does, one
                 FA4 call, ``o1 − λ·o2`` as :func:`diffllama.attention.combine_pairs` (dλ and the sum of dV' over
                 the pair by autograd)
    flash        ours, :func:`diffllama.attention.flash.attention` (the full differential op)

Checks at S <= ``attention.EAGER_MAX_S`` (relative L2 error): llama rows and fa4-d against float32 SDPA math on the
same bf16 inputs (out, dq, dk, dv); fa4-2d likewise with the 2d-wide value (SDPA's math kernel allows Ev ≠ E);
fa4-diff and flash against float32 eager (out, dq, dk, dv, dλ). TFLOP/s counts a causal Llama attention's FLOPs
(forward 2·B·H·S²·d, forward + backward 3.5x that) for llama rows and 1.5x that for the 2d-wide rows, so every
row's TFLOP/s is useful work per second; %peak is that over the measured 8192³ bf16 matmul rate. The forward and
forward + backward of a row are timed apart, so a backward that fails to compile still leaves the forward.
Prints the table as it goes; JSON to DIR/fa4_attention.json after every row (default $OUT or benchmarks/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import EAGER_MAX_S, _eager_reference, _errors, _llama_reference, bench, matmul_peak

# The rows the acceptance turns on come first, so a run cut off at its time limit still has them.
ROWS = ("llama-cudnn", "flash", "fa4-2d", "fa4-2d-alt", "fa4-diff", "fa4-d", "llama-fa2")
DIFF_ROWS = ("fa4-2d", "fa4-2d-alt", "fa4-diff", "flash")
RESULTS: dict = {"core": []}


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """A contiguous (B, S, H, d) leaf holding the values of a (B, H, S, d) tensor: FA4's layout."""
    return t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)


def _impls():
    """name -> fn(inputs) returning the output; each row's inputs come from :func:`_inputs`."""
    from flash_attn.cute import flash_attn_func

    from diffllama.attention import combine_pairs, flash

    def sdpa_on(backends):
        def run(q, k, v, scale):
            with sdpa_kernel(backends):  # the backward follows the forward's kernel
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return run

    def fa4(q, k, v, scale):
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)[0]

    def fa4_diff(q, k, v, lam, scale):
        first, second = v.chunk(2, dim=2)  # (B, S, H/2, d) each: head i pairs with head i + H/2
        paired = torch.cat((first, second), dim=-1)
        o = fa4(q, k, torch.cat((paired, paired), dim=2), scale)  # (B, S, H, 2d)
        return combine_pairs(o.transpose(1, 2), lam)

    def ours(q, k, v, lam, mask, scale):
        return flash.attention(q, k, v, mask, scale=scale, lambda_full=lam)[0]

    return {"llama-cudnn": sdpa_on([SDPBackend.CUDNN_ATTENTION]),
            "llama-fa2": sdpa_on([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
            "fa4-d": fa4, "fa4-2d": fa4, "fa4-2d-alt": fa4, "fa4-diff": fa4_diff, "flash": ours}


@contextlib.contextmanager
def _wide_value_tiles(on: bool):
    """While on, FA4's SM90 kernels take smaller tiles wherever the value is wider than the query/key head.

    FA4 picks its tiles by head_dim whatever the value width. By our count of its shared-memory layout
    (flash_bwd_sm90.py), its backward tiles then need about 256 KB at d = 128, value 256 (Q 32, dO 64, K 32, V 64,
    dS 32, dQ accumulator 32; P stays in registers) and about 240 KB at d = 64, value 128, over the 227 KB a
    Hopper block can have. The tiles taken instead are FA4's own for a larger head_dim class: for a value up to
    128 those of head_dim 96 (64 x 128 blocks, about 144 KB at d = 64); for a wider value those of
    128 < head_dim <= 192 with a value wider than 128 (backward 64 x 96 blocks, one dO stage, dK/dV' swapped,
    about 192 KB at d = 128; forward 128 x 112 blocks).
    """
    from flash_attn.cute import interface

    fwd_default, bwd_default = interface._tile_size_fwd_sm90, interface._tile_size_bwd_sm90
    fwd_wide = interface.FwdConfig(128, 112, True, True)
    bwd_wide = interface.BwdConfig(m_block_size=64, n_block_size=96, num_stages_Q=2, num_stages_dO=1,
                                   num_stages_PdS=1, SdP_swapAB=False, dKV_swapAB=True, dQ_swapAB=False,
                                   AtomLayoutMSdP=1, AtomLayoutNdKV=2, AtomLayoutMdQ=1, num_wg=2)

    def fwd(d, dv, *args, **kwargs):
        return fwd_wide if dv > 128 else fwd_default(d, dv, *args, **kwargs)

    def bwd(d, dv, *args, **kwargs):
        if dv <= d:
            return bwd_default(d, dv, *args, **kwargs)
        return bwd_wide if dv > 128 else bwd_default(max(d, 96), dv, *args, **kwargs)

    if on:
        interface._tile_size_fwd_sm90, interface._tile_size_bwd_sm90 = fwd, bwd
    try:
        yield
    finally:
        interface._tile_size_fwd_sm90, interface._tile_size_bwd_sm90 = fwd_default, bwd_default


def _inputs(name, t, scale):
    """(args for the row's fn, the leaves its gradients are taken of, dO) in the row's layout."""
    if name.startswith("llama"):
        return (t["q"], t["k"], t["v"], scale), (t["q"], t["k"], t["v"]), t["dout"]
    if name == "fa4-d":
        return (t["q4"], t["k4"], t["v4"], scale), (t["q4"], t["k4"], t["v4"]), t["dout4"]
    if name in ("fa4-2d", "fa4-2d-alt"):
        return (t["q4"], t["k4"], t["v24"], scale), (t["q4"], t["k4"], t["v24"]), t["dout24"]
    if name == "fa4-diff":
        return (t["q4"], t["k4"], t["v4"], t["lam"], scale), (t["q4"], t["k4"], t["v4"], t["lam"]), t["ddiff"]
    return (t["q"], t["k"], t["v"], t["lam"], t["mask"], scale), (t["q"], t["k"], t["v"], t["lam"]), t["ddiff"]


def _tensors(b, h, s, d):
    """Random bf16 inputs (fresh per shape), both layouts of the same values, and the dO of each row kind."""
    from diffllama.attention import AttentionMask, pair_values

    gen = torch.Generator(device="cuda").manual_seed(1000 * d + s)
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    t = {n: mk(b, h, s, d).requires_grad_() for n in ("q", "k", "v")}
    t["v2"] = pair_values(t["k"], t["v"].detach(), h)[1].contiguous().requires_grad_()  # (B, H, S, 2d)
    for n, n4 in (("q", "q4"), ("k", "k4"), ("v", "v4"), ("v2", "v24")):
        t[n4] = _bshd(t[n])
    t["lam"] = torch.tensor(0.3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t["mask"] = AttentionMask(torch.arange(s, device="cuda"), None, s, plain_causal=True)
    t["dout"] = mk(b, h, s, d)
    t["dout4"] = t["dout"].transpose(1, 2).contiguous()
    t["dout2"] = mk(b, h, s, 2 * d)
    t["dout24"] = t["dout2"].transpose(1, 2).contiguous()
    t["ddiff"] = mk(b, s, h // 2, 2 * d)
    return t


def _check(name, got, t, refs) -> str:
    """Relative L2 errors of (out, grads...) against the float32 reference of the row's kind, in (B, H, S, ·)."""
    to_bhsd = (lambda x: x.transpose(1, 2)) if name.startswith("fa4") else (lambda x: x)
    if name in ("fa4-diff", "flash"):
        if "eager" not in refs:
            refs["eager"] = _eager_reference(t["q"], t["k"], t["v"], t["lam"], t["mask"], t["ddiff"])
        out, *grads = got
        return "vs eager32: " + _errors((out, *[to_bhsd(g) for g in grads[:3]], grads[3]), refs["eager"])
    key, v, dout = ("sdpa2", t["v2"], t["dout2"]) if name.startswith("fa4-2d") else ("sdpa", t["v"], t["dout"])
    if key not in refs:
        refs[key] = _llama_reference(t["q"], t["k"], v, dout)
    return "vs sdpa32: " + _errors([to_bhsd(x) for x in got], refs[key])


def core(dims, seqs, tokens, peak, out_path) -> None:
    impls = _impls()
    print(f"\n== causal bf16, B = {tokens}/S, H*d = 2048; matmul peak {peak:.0f} TFLOP/s; "
          f"%peak counts 1.5x Llama FLOPs for {', '.join(DIFF_ROWS)}")
    print(f"{'d':>4} {'S':>6} {'B':>3} {'H':>3} {'impl':>11} {'fwd ms':>8} {'%peak':>6} {'f+b ms':>8} {'%peak':>6} "
          f"{'vs cudnn':>8} {'vs flash':>8}  check")
    for d in dims:
        h = 2048 // d
        for s in seqs:
            b = max(1, tokens // s)
            t = _tensors(b, h, s, d)
            refs: dict = {}
            base, failed = {}, {}
            llama_flops = 2 * b * h * s * s * d
            for name in ROWS:
                if name == "fa4-2d-alt" and not failed.get("fa4-2d"):
                    continue
                fn = impls[name]
                args, leaves, dout = _inputs(name, t, d ** -0.5)
                flops = llama_flops * (1.5 if name in DIFF_ROWS else 1.0)
                row = dict(d=d, S=s, B=b, H=h, impl=name)
                # fa4-diff follows fa4-2d-alt's tiles where those worked and the default ones did not.
                use_alt = name == "fa4-2d-alt" or (name == "fa4-diff" and failed.get("fa4-2d-alt") is False)
                row["tiles"] = "wide-value" if use_alt else "default"
                with _wide_value_tiles(use_alt):
                    try:  # the first call also compiles: keep it, and the references, out of the timed region
                        out = fn(*args)
                        grads = torch.autograd.grad(out, leaves, dout)
                        if s <= EAGER_MAX_S:
                            row["check"] = _check(name, (out, *grads), t, refs)
                        del out, grads
                    except Exception as err:  # noqa: BLE001 - a failed check (or backward) still lets the forward time
                        row["check"] = f"check failed: {repr(err)[:300]}"
                        traceback.print_exc()
                    try:
                        row["fwd_ms"] = bench(lambda: fn(*args))
                        row["fwd_pct_peak"] = 100 * flops / row["fwd_ms"] / 1e9 / peak
                        row["fb_ms"] = bench(lambda: torch.autograd.grad(fn(*args), leaves, dout))
                        row["fb_pct_peak"] = 100 * 3.5 * flops / row["fb_ms"] / 1e9 / peak
                        base[name] = row["fb_ms"]
                        row["vs_cudnn"] = row["fb_ms"] / base["llama-cudnn"] if "llama-cudnn" in base else None
                        row["vs_flash"] = row["fb_ms"] / base["flash"] if "flash" in base else None
                    except Exception as err:  # noqa: BLE001 - one failing row must not stop the table
                        row["error"] = repr(err)[:400]
                        traceback.print_exc()
                failed[name] = "error" in row or row.get("check", "").startswith("check failed")
                RESULTS["core"].append(row)
                with open(out_path, "w") as f:  # after every row: a run killed at its limit keeps what it measured
                    json.dump(RESULTS, f, indent=1)
                print(f"{d:>4} {s:>6} {b:>3} {h:>3} {name:>11} {row.get('fwd_ms', float('nan')):8.3f} "
                      f"{row.get('fwd_pct_peak', float('nan')):5.1f}% {row.get('fb_ms', float('nan')):8.3f} "
                      f"{row.get('fb_pct_peak', float('nan')):5.1f}% {row.get('vs_cudnn') or float('nan'):8.2f} "
                      f"{row.get('vs_flash') or float('nan'):8.2f}  {row.get('check', '')} {row.get('error', '')}",
                      flush=True)
            del t, refs
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--seqs", default="4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    args = parser.parse_args(argv)
    import flash_attn.cute  # noqa: F401 - fail here, before any timing, when the wheels are missing
    from importlib.metadata import version

    RESULTS["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for package in ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "triton"):
        try:
            RESULTS["env"][package] = version(package)
        except Exception as err:  # noqa: BLE001 - a version is a note, not a requirement
            RESULTS["env"][package] = repr(err)
    print(RESULTS["env"], flush=True)
    peak = matmul_peak()
    RESULTS["matmul_peak_tflops"] = peak
    core([int(x) for x in args.dims.split(",")], [int(x) for x in args.seqs.split(",")], args.tokens, peak,
         os.path.join(args.out, "fa4_attention.json"))


if __name__ == "__main__":
    sys.exit(main())
