#!/usr/bin/env bash
# Fine-tuning benchmark, one device run (<= 5 minutes on one H200): pretrain the `small` preset briefly on the
# bundled corpus, then fine-tune it three times with `diffllama finetune`:
#   1. sentiment: full Rotten Tomatoes fresh/rotten split (train 10,246 / validation 1,281 / test 1,281) -> test accuracy
#   2. POS tagging: Brown corpus, held-out files (universal tags) -> test token accuracy
#   3. key-information retrieval QA (fact + 3 distractors in 200-word SOTU passages) -> exact match by depth
# Data: python scripts/fetch_finetune_data.py first (here, with network), then carry data/finetune to the device.
# Usage: bash benchmarks/finetune.sh [RUNS_DIR]   (summary JSON lines go to stdout and RUNS_DIR/*.json)
set -uo pipefail
RUNS=${1:-/tmp/ft_runs}
DATA=${DATA:-data/finetune}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$RUNS"
quiet() { tr '\r' '\n' | grep -v -E "^train|it/s|s/it" ; }
t0=$(date +%s)
python -m diffllama train --preset small --out "$RUNS/pretrain" --max-steps 500 --warmup-steps 50 --eval-every 500 \
  --save-every 0 --cache-dir "$RUNS/cache" 2>&1 | quiet
echo "pretrain done after $(( $(date +%s) - t0 )) s"
BASE="$RUNS/pretrain/model"
ft() {  # name task args...
  local name=$1; shift
  python -m diffllama finetune "$@" --model "$BASE" --out "$RUNS/$name" --save-every 0 2>&1 | quiet
  cp "$RUNS/$name/finetune_metrics.json" "$RUNS/$name.json" 2>/dev/null
  echo "$name done after $(( $(date +%s) - t0 )) s"
}
ft sentiment sequence-classification --data "$DATA/rotten_tomatoes/train.csv" \
  --eval-data "$DATA/rotten_tomatoes/validation.csv" --test-data "$DATA/rotten_tomatoes/test.csv" \
  --max-length 128 --batch-size 64 --max-steps 400 --eval-every 400 --lr 1e-4 --warmup-steps 50
ft pos token-classification --data "$DATA/brown/train.conll" --eval-data "$DATA/brown/validation.conll" \
  --test-data "$DATA/brown/test.conll" --max-length 128 --batch-size 64 --max-steps 500 --eval-every 500 \
  --lr 3e-4 --warmup-steps 50
ft retrieval question-answering --data "$DATA/retrieval_qa/train.json" --test-data "$DATA/retrieval_qa/test.json" \
  --max-length 384 --stride 64 --batch-size 32 --max-steps 500 --eval-every 500 --lr 3e-4 --warmup-steps 50
python - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
pre = json.loads((runs / "pretrain" / "summary.json").read_text()) if (runs / "pretrain" / "summary.json").exists() else {}
out = {"pretrain": {k: pre.get(k) for k in ("steps", "tokens", "parameters", "val_loss", "val_bits_per_byte")}}
for name in ("sentiment", "pos", "retrieval"):
    f = runs / f"{name}.json"
    if f.exists():
        r = json.loads(f.read_text())
        strip = lambda d: {k: v for k, v in (d or {}).items() if k not in ("per_label", "per_tag")}
        out[name] = {"steps": r["steps"], "train": r["train_examples"], "eval": strip(r["eval"]),
                     "test": strip(r.get("test")), "test_baseline": r.get("test_baseline")}
print(json.dumps(out, indent=1))
(runs / "finetune_results.json").write_text(json.dumps(out, indent=1))
PY
echo "total $(( $(date +%s) - t0 )) s"
