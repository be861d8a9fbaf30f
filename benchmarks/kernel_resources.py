"""Registers, spills and shared memory of the flash kernels per launch config, compiled offline for an H100/H200.

Compiles each kernel with Triton for ``sm_90a`` (no GPU needed: Triton's compiler and its bundled ptxas run on a CPU
machine) and prints what ``ptxas -v`` reports. The figures come from the local Triton, which may allocate
registers differently from the Triton on the GPU machine; RESULTS.md shows they did not predict which config runs
fastest there.

Usage (repo root): PYTHONPATH=src python benchmarks/kernel_resources.py KIND HEAD_DIM BM,BN,WARPS,STAGES [...]
    KIND: fwd, dq, dk, dv, dkdv (the kinds of ``diffllama.attention.flash._configs``); no configs = all of them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from diffllama.attention import flash
from diffllama.attention import flash_kernels as kernels

_POINTERS = {
    "fwd": (kernels.attn_fwd, dict(Q="bf16", K="bf16", V="bf16", Out="bf16", O2="bf16", LSE="fp32", QPOS="i64",
                                   PAD="u8", LAM="fp32")),
    "dq": (kernels.attn_bwd_dq, dict(Q="bf16", K="bf16", V="bf16", DO="bf16", LSE="fp32", R="fp32", QPOS="i64",
                                     PAD="u8", DQ="bf16", LAM="fp32")),
    "dkdv": (kernels.attn_bwd_dkdv, dict(Q="bf16", K="bf16", V="bf16", DO="bf16", LSE="fp32", R="fp32", QPOS="i64",
                                         ORDERED="u8", PAD="u8", DK="bf16", DV="bf16", DQACC="fp32", LAM="fp32")),
}


def resources(kind: str, d: int, block_m: int, block_n: int, warps: int, stages: int) -> str:
    """``ptxas -v``'s registers and spill bytes, and Triton's shared memory, for one kernel and launch config."""
    fn, pointers = _POINTERS["dkdv" if kind in ("dk", "dv") else kind]
    const = dict(HEAD_DIM=d, DP=d, HAS_PAD=False, BLOCK_M=block_m, BLOCK_N=block_n)
    if fn is kernels.attn_bwd_dkdv:  # the default backward: dQ from its own kernel, no atomics
        const.update(DQ_ATOMIC=False, DO_DK=kind != "dv", DO_DV=kind != "dk")
    names = fn.arg_names
    signature = {n: "*" + pointers[n] if n in pointers else "constexpr" if n in const
                 else "fp32" if n in ("qk_scale", "scale") else "i32" for n in names}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
    except Exception as error:  # noqa: BLE001 - report and go on to the next config
        return f"does not compile: {type(error).__name__}: {str(error)[-120:]}"
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/k.ptx", "w") as handle:
            handle.write(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                                capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return (f"regs {regs.group(1) if regs else '?'}  spill st/ld bytes "
            f"{'/'.join(spills.groups()) if spills else '?'}  smem {compiled.metadata.shared}")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    kind, d = sys.argv[1], sys.argv[2]
    if kind not in ("fwd", "dq", "dk", "dv", "dkdv") or d not in ("32", "64", "128", "256"):
        sys.exit(f"KIND must be fwd, dq, dk, dv or dkdv and HEAD_DIM 32, 64, 128 or 256, got {kind!r} {d!r}")
    d = int(d)
    configs = [tuple(map(int, c.split(","))) for c in sys.argv[3:]]
    if not configs:
        configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   for c in flash._configs(kind, d)]
    print(f"triton {triton.__version__}, sm_90a", flush=True)
    for config in configs:
        print(f"{kind:5} d{d} {str(config):18} {resources(kind, d, *config)}", flush=True)


if __name__ == "__main__":
    main()
