#!/usr/bin/env bash
# FSDP2 scaling on one host: the 0.4b preset on the bundled corpus, 50 steps on 1 GPU, then 50 steps on 2 GPUs
# under torchrun (same per-GPU batch 8 x 2048), real data pipeline and final checkpoint included.
# Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU), from the metrics windows after step 10.
# Usage (kind nvidia-h200-x2): bash benchmarks/train_fsdp.sh [RUNS_DIR] [CACHE_DIR]
set -euo pipefail
RUNS=${1:-/tmp/fsdp_runs}
CACHE=${2:-.cache_train}
export PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
common=(--preset 0.4b --max-steps 50 --log-every 10 --eval-every 50 --save-every 0 --cache-dir "$CACHE")
rm -rf "$RUNS"
CUDA_VISIBLE_DEVICES=0 python -m diffllama train "${common[@]}" --out "$RUNS/one" 2>&1 | tr '\r' '\n' | grep -v "^train:" || true
torchrun --standalone --nproc_per_node=2 -m diffllama train "${common[@]}" --parallel fsdp --out "$RUNS/fsdp2" 2>&1 \
  | tr '\r' '\n' | grep -v "^train:" || true
python - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
def rate(run):
    recs = [json.loads(l) for l in (runs / run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 10]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    return sum(tps) / len(tps), (val[-1] if val else None)
one, v1 = rate("one")
two, v2 = rate("fsdp2")
print(json.dumps({"one_gpu_tokens_per_s": round(one), "two_gpu_fsdp2_tokens_per_s": round(two),
                  "scaling_efficiency": round(two / (2 * one), 3), "val_loss_one": v1, "val_loss_fsdp2": v2}))
PY
