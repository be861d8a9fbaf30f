"""Flash attention over packed documents (issue 14): 8 documents of 1k tokens packed in one 8k row, against the same
8k row with plain causal masking.

Usage (on a CUDA machine, from the repo root):

    PYTHONPATH=src python benchmarks/attention_documents.py [--docs 8] [--doc-len 1024] [--dims 64,128]
                                                            [--heads 16,32] [--batches 1,2] [--out FILE]

For each (head_dim d, heads H = KV, batch B): bf16 inputs, the flash backend's forward and forward + backward
(torch.autograd.grad of a random dO) median times (triton.testing.do_bench) with ``AttentionMask.document_ids``
(``docs`` documents of ``doc_len`` tokens each) and without (causal over the whole row), and their ratio; with working
block skipping the documents cost about 1/docs of the causal row. check: the relative L2 difference of the output
from the sdpa backend (bf16; the dense boolean mask for the packed row), for both masks: two bf16 roundings apart
(~1e-2 at most), while a mask that leaked across documents would differ by O(1). Prints a table; JSON to ``--out``
(default $OUT/attention_documents.json, else benchmarks/attention_documents.json).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def measure(b: int, h: int, d: int, docs: int, doc_len: int) -> dict:
    from diffllama.attention import AttentionMask, flash, sdpa

    s = docs * doc_len
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(b, h, s, d), mk(b, h, s, d), mk(b, h, s, d)
    dout = mk(b, s, h // 2, 2 * d)
    lam = torch.tensor(0.3, device="cuda")
    positions = torch.arange(s, device="cuda")
    ids = torch.arange(docs, device="cuda", dtype=torch.int32).repeat_interleave(doc_len).expand(b, s).contiguous()
    masks = {"documents": AttentionMask(positions, None, s, document_ids=ids),
             "causal": AttentionMask(positions, None, s, plain_causal=True)}
    row = {"B": b, "H": h, "d": d, "S": s, "docs": docs}
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for name, mask in masks.items():
        def fwd():
            return flash.attention(*leaves, mask, scale=d ** -0.5, lambda_full=lam)[0]

        def fwd_bwd():
            return torch.autograd.grad(fwd(), leaves, dout)

        with torch.no_grad():
            row[f"{name}_fwd_ms"] = bench(fwd)
        row[f"{name}_fwd_bwd_ms"] = bench(fwd_bwd)
        with torch.no_grad():
            got = fwd().float()
            ref = sdpa.attention(q, k, v, mask, scale=d ** -0.5, lambda_full=lam)[0].float()
        row[f"{name}_check"] = ((got - ref).norm() / ref.norm()).item()
    row["fwd_ratio"] = row["documents_fwd_ms"] / row["causal_fwd_ms"]
    row["fwd_bwd_ratio"] = row["documents_fwd_bwd_ms"] / row["causal_fwd_bwd_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--doc-len", type=int, default=1024)
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--heads", default="16,32")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks"), "attention_documents.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_documents.py needs a CUDA GPU")
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    rows = []
    print(f"{torch.cuda.get_device_name()}, bf16, {args.docs} documents of {args.doc_len} packed in one row vs causal")
    print(f"{'B':>2} {'H':>3} {'d':>4} {'S':>6} | {'fwd docs':>9} {'causal':>8} {'ratio':>6} | "
          f"{'f+b docs':>9} {'causal':>8} {'ratio':>6} | {'check docs':>10} {'causal':>8}")
    for d in ints(args.dims):
        for h in ints(args.heads):
            for b in ints(args.batches):
                r = measure(b, h, d, args.docs, args.doc_len)
                rows.append(r)
                print(f"{b:>2} {h:>3} {d:>4} {r['S']:>6} | "
                      f"{r['documents_fwd_ms']:>7.3f}ms {r['causal_fwd_ms']:>6.3f}ms "
                      f"{r['fwd_ratio']:>6.3f} | {r['documents_fwd_bwd_ms']:>7.3f}ms {r['causal_fwd_bwd_ms']:>6.3f}ms "
                      f"{r['fwd_bwd_ratio']:>6.3f} | {r['documents_check']:>10.2e} {r['causal_check']:>8.2e}",
                      flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
