#!/usr/bin/env bash
# Decode tokens/s and the training step of two source trees side by side, on one GPU, in one call (issue 15:
# "not slower than before, measured side by side with the previous commit"):
#   bash benchmarks/ab_speed.sh OLD_SRC [OUTDIR]
# OLD_SRC is the previous commit's src/ (e.g. `git archive OLD src benchmarks | tar -x -C .old`, then .old/src);
# the new tree is ./src. Each round runs old then new (ROUNDS rounds, default 1, alternating, so clock and thermal
# drift hit both alike) with the benchmark scripts of the new tree:
# - decode: benchmarks/decode.py, the 0.37B shape at batch 1, the compiled fast path, no transformers run;
# - training: benchmarks/train.py, the 0.4b preset's compiled flash step.
# PARTS (default "decode train") picks the measurements; TRAIN_CASE (default ours-flash-compile) the train.py case.
# Logs and JSON go to OUTDIR (default $OUT, else benchmarks/results/ab).
set -uo pipefail
old="${1:?usage: ab_speed.sh OLD_SRC [OUTDIR]}"
out="${2:-${OUT:-benchmarks/results/ab}}"
[ -d "$old/diffllama" ] || { echo "OLD_SRC must hold the diffllama package: $old/diffllama not found" >&2; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader) new=$(git rev-parse --short HEAD 2>/dev/null)"
for round in $(seq "${ROUNDS:-1}"); do
  for tree in old new; do
    src=$([ "$tree" = old ] && echo "$old" || echo src)
    mkdir -p "$out/$tree$round"
    if [[ " ${PARTS:-decode train} " == *" decode "* ]]; then
      echo "== decode $tree (round $round)"
      PYTHONPATH="$src" timeout 150 python3 benchmarks/decode.py --shapes 0.37b --batches 1 --new 256 --no-hf \
        --out "$out/$tree$round" 2>&1 | grep -i "tokens/s\|error" | head -5
    fi
    if [[ " ${PARTS:-decode train} " == *" train "* ]]; then
      echo "== train $tree (round $round)"
      PYTHONPATH="$src" timeout 150 python3 benchmarks/train.py --cases "${TRAIN_CASE:-ours-flash-compile}" \
        --warmup 3 --steps 8 2>&1 | tail -2
    fi
  done
done 2>&1 | tee "$out/ab_speed.log"
