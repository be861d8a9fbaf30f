"""Whether a refactor of the attention kernels left their GPU code unchanged: compiles ``attn_fwd``, ``attn_bwd_dq``
and ``attn_bwd_dkdv`` from an old copy of flash_kernels.py and from the current one for sm_90 (no GPU needed: Triton
compiles on a CPU machine) and compares the TTGIR and PTX text, debug-info and location lines dropped.

Variants: head_dim 64 and 128, with and without padding and documents; for ``attn_bwd_dkdv`` each of the launches
``diffllama.attention.flash._backward`` makes (dkdv, dk, dv; dQ atomics on or off where the launch takes them);
each with its default launch config (the first of ``flash._configs``).

Usage (repo root): PYTHONPATH=src python benchmarks/kernel_identity.py OLD_FLASH_KERNELS.py
    e.g. git show HEAD~1:src/diffllama/attention/flash_kernels.py > /tmp/old.py first.
Prints one line per variant, "identical" or the number of differing lines and the first difference; exits 1 if
any variant differs.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diffllama.attention import flash
from diffllama.attention import flash_kernels as current

_POINTERS = dict(Q="bf16", K="bf16", V="bf16", DO="bf16", LSE="fp32", R="fp32", QPOS="i64", ORDERED="u8", PAD="u8",
                 DOC="i32", DOC_OK="u8", DK="bf16", DV="bf16", DQACC="fp32", LAM="fp32", Out="bf16", O2="bf16",
                 DQ="bf16")
# (kernel, launch kind, its constexpr flags): for attn_bwd_dkdv, the DQ_ATOMIC, DO_DK and DO_DV that _backward
# passes for each bwd_mode and dq_mode.
_LAUNCHES = [("attn_fwd", "fwd", {}), ("attn_bwd_dq", "dq", {})] + [
    ("attn_bwd_dkdv", kind, dict(DQ_ATOMIC=atomic, DO_DK=do_dk, DO_DV=do_dv))
    for kind, atomic, do_dk, do_dv in [("dkdv", False, True, True), ("dkdv", True, True, True),
                                       ("dk", False, True, False), ("dk", True, True, False),
                                       ("dv", False, False, True)]]
# Debug info names files, lines and inlined-call ranges, which a refactor moves: PTX's .loc/.file lines, its debug
# labels and the data directives of its debug sections; TTGIR's #loc lines and loc(...) annotations.
_NOISE = re.compile(r"^\s*(\.loc|\.file|#loc|\.section\s+\.debug|\$L__(tmp|func)|\.b(8|16|32|64) )")
# TTGIR hoists constants in the order the front end first made them, which moves with helper calls: each constant's
# name is replaced by its value and its definition line dropped.
_CONSTANT = re.compile(r"^\s*(%[\w.]+) = arith\.constant (.*)$")


def _strip_locs(line: str) -> str:
    """``line`` without its ``loc(...)`` annotations (nested parentheses included)."""
    while (start := line.find(" loc(")) >= 0:
        depth, end = 0, start + 4
        for end in range(start + 4, len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        line = line[:start] + line[end + 1:]
    return line


def _normalise(ir: str, text: str) -> str:
    """``text`` with the noise dropped (see _NOISE), and for TTGIR constants inlined (see _CONSTANT)."""
    lines = [_strip_locs(line) for line in text.splitlines() if not _NOISE.search(line)]
    if ir != "ttgir":
        return "\n".join(lines)
    values = {m.group(1): f"const({m.group(2)})" for line in lines if (m := _CONSTANT.match(line))}
    name = re.compile(r"%[\w.]+")
    return "\n".join(name.sub(lambda m: values.get(m.group(0), m.group(0)), line) for line in lines
                     if not _CONSTANT.match(line))


def _load(path: str):
    """The module at ``path`` (a copy of flash_kernels.py), imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("old_flash_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(module, d: int, pad: bool, doc: bool, launch: tuple) -> dict[str, str]:
    """TTGIR and PTX text of one kernel of ``module`` for one variant, noise lines dropped."""
    kernel, kind, flags = launch
    config = flash._configs(kind, d)[0]
    fn = getattr(module, kernel)
    const = dict(HEAD_DIM=d, DP=d, HAS_PAD=pad, HAS_DOC=doc, **flags, **config.kwargs)
    names = fn.arg_names
    signature = {n: "*" + _POINTERS[n] if n in _POINTERS else "constexpr" if n in const
                 else "fp32" if n in ("qk_scale", "scale") else "i32" for n in names}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return {ir: _normalise(ir, compiled.asm[ir]) for ir in ("ttgir", "ptx")}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    old = _load(sys.argv[1])
    print(f"triton {triton.__version__}, sm_90, {sys.argv[1]} vs {current.__file__}", flush=True)
    differs = False
    for d, pad, doc, launch in itertools.product((64, 128), (False, True), (False, True), _LAUNCHES):
        before, after = _compile(old, d, pad, doc, launch), _compile(current, d, pad, doc, launch)
        report = []
        for ir in ("ttgir", "ptx"):
            if before[ir] == after[ir]:
                report.append(f"{ir} identical ({len(after[ir].splitlines())} lines)")
                continue
            differs = True
            diff = [line for line in difflib.unified_diff(before[ir].splitlines(), after[ir].splitlines(),
                                                          lineterm="", n=0)
                    if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            report.append(f"{ir} DIFFERS ({len(diff)} lines, first: {diff[0][:100]!r})")
        flags = " ".join(f"{name}={value:d}" for name, value in launch[2].items())
        print(f"{launch[0]} {launch[1]:4} d{d} pad={pad:d} doc={doc:d} {flags}: {'; '.join(report)}", flush=True)
    sys.exit(1 if differs else 0)


if __name__ == "__main__":
    main()
