"""Batch-1 decode GEMVs: Inductor's fused reductions vs diffllama's Triton GEMV vs cuBLAS, per projection.

Usage (on a CUDA machine, from the repo root):

    PYTHONPATH=src python benchmarks/gemv.py [--shapes 0.37b,1.2b]

For every projection of a decode step (q/k/v fused, o_proj, gate/up fused, down_proj, lm_head) it times the
projection inside the elementwise work it sits in within the model (its RMSNorm, residual add or SiLU), three ways:

- ``inductor``: the whole context compiled as ``DecodeStep`` compiles it (coordinate-descent tuning, which makes
  Inductor write its own GEMV reduction and fuse the context into it);
- ``gemv``: the same context compiled, with the product as the opaque custom op ``diffllama::gemv``;
- ``cublas-op``: the same context compiled, with the product as an opaque custom op calling ``F.linear`` (cuBLAS);
- ``cublas``: the bare product through ``F.linear`` (cuBLAS), no context.

Each is captured in a CUDA graph of 50 calls and timed over replays (CUDA events, median of 5), so launch gaps are
those of a graph as in real decoding. TB/s = weight bytes / time. Every output is checked against a float32
product. Prints one table per shape.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__file__))
from decode import SHAPES, cuda_time  # noqa: E402

from diffllama import gemv as gemv_mod  # noqa: E402

CALLS = 50


@torch.library.custom_op("bench::cublas_linear", mutates_args=())
def cublas_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear that Inductor cannot decompose or fuse."""
    return F.linear(x, w)


@cublas_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def contexts(cfg: dict) -> dict:
    """Per site: (function of (inputs, matmul), input factory) with the model's neighbouring elementwise work."""
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    qkv_n = (h + 2 * kv) * hd

    def norm(x, w):
        return F.rms_norm(x, (x.shape[-1],), w, 1e-5)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02

    return {
        "qkv": (lambda t, mm: mm(norm(t[0], t[1]), t[2]), lambda: (randn(1, 1, d), randn(d) + 1, randn(qkv_n, d))),
        "o": (lambda t, mm: t[2] + mm(t[0], t[1]), lambda: (randn(1, 1, d), randn(d, d), randn(1, 1, d))),
        "gate_up": (lambda t, mm: (lambda g, u: F.silu(g) * u)(*mm(t[0], t[1]).chunk(2, dim=-1)),
                    lambda: (randn(1, 1, d), randn(2 * i, d))),
        "down": (lambda t, mm: (lambda r: (r, norm(r, t[3])))(t[2] + mm(t[0], t[1])),
                 lambda: (randn(1, 1, i), randn(d, i), randn(1, 1, d), randn(d) + 1)),
        "lm_head": (lambda t, mm: mm(norm(t[0], t[1]), t[2]).float(),
                    lambda: (randn(1, 1, d), randn(d) + 1, randn(v, d))),
    }


def weight_of(site: str, inputs) -> torch.Tensor:
    return inputs[2] if site in ("qkv", "lm_head") else inputs[1]


def time_graph(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    return cuda_time(graph.replay, repeat=5) / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="0.37b,1.2b")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    cublas = F.linear
    triton_mm = lambda x, w: gemv_mod.gemv(x.reshape(-1), w).reshape(*x.shape[:-1], w.shape[0])  # noqa: E731
    for shape in args.shapes.split(","):
        print(f"\n{shape}: site, weight MB, then us and TB/s for inductor | gemv | cublas-op | cublas; max rel err vs fp32")
        for site, (fn, make) in contexts(SHAPES[shape]).items():
            inputs = make()
            weight = weight_of(site, inputs)
            mb = weight.numel() * weight.element_size()
            reference = fn([t.float() for t in inputs], F.linear)
            row = [f"{site:8s} {mb / 1e6:7.1f} MB"]
            torch._dynamo.reset()  # every site compiles the same lambdas afresh
            runs = {name: torch.compile(lambda t, mm=mm: fn(t, mm), fullgraph=True, dynamic=False,
                                        options={"coordinate_descent_tuning": True})
                    for name, mm in [("inductor", cublas), ("gemv", triton_mm), ("cublas-op", cublas_linear)]}
            runs["cublas"] = lambda t: F.linear(t[0], weight)
            errors = []
            with torch.inference_mode():
                for name, run in runs.items():
                    out = run(inputs)
                    if name != "cublas":
                        pairs = zip(out, reference) if isinstance(out, tuple) else [(out, reference)]
                        errors.append(max(float((a.float() - b).norm() / b.norm()) for a, b in pairs))
                    t = time_graph(lambda: run(inputs))
                    row.append(f"{name} {t * 1e6:7.2f} us {mb / t / 1e12:5.2f} TB/s")
            print("  " + " | ".join(row) + f" | err {max(errors):.1e}", flush=True)


if __name__ == "__main__":
    main()
