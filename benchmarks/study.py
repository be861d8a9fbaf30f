"""The small-scale study of issue 17: train each architecture at equal parameters and tokens for several seeds,
evaluate every model in the run that trained it, and keep one JSON per run under benchmarks/results/study/.

A run's JSON holds its settings, the training metrics (every logged step and validation pass), the final summary
and every :mod:`diffllama.eval` figure; checkpoints are deleted afterwards (too large to keep). A run whose JSON
exists is skipped, so the study accumulates and resumes run by run; ``--commit`` commits each JSON as it lands.

Architectures: ``diffllama`` (DiffLlama V1), ``diffllama-v2`` and ``llama``, the ``--arch`` names of ``diffllama train``;
each trains its preset's trio member (same hidden size, layers and tokens, parameters within 2%).

One run of about 3 minutes on one H100 (the ``small`` shape: 8 layers, hidden 512, about 40 M parameters,
1000 steps of 16 x 1024 tokens = 16.4 M tokens, then the evaluations):

    python benchmarks/study.py --arch diffllama --seeds 0 --max-steps 1000

The full study (3 seeds; each run under 10 minutes, evaluations included), on real text fetched beforehand with
``scripts/fetch_corpora.sh all corpora``:

    python benchmarks/study.py --arch diffllama diffllama-v2 llama --seeds 0 1 2 --data corpora/sotu corpora/kjv --commit

Prints one line per run and the table of mean ± standard deviation over seeds (``--table`` prints it alone).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffllama.config import ARCHITECTURES as LIBRARY_ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "study"
# --arch name -> the model fields that select it; the preset gives each its trio member (equal parameters, V2's
# narrower MLP paying for its doubled q_proj: diffllama.presets).
ARCHITECTURES = {arch: {"model_type": model_type} for arch, model_type in LIBRARY_ARCHITECTURES.items()}


def run_name(arch: str, seed: int, tag: str) -> str:
    """The JSON file name of one run."""
    return f"{arch}_{tag}_seed{seed}.json"


def train_and_evaluate(arch: str, seed: int, args) -> dict:
    """Train one model, evaluate it, and return the run's record (the checkpoint is deleted)."""
    import torch

    from diffllama.eval import EvalSettings, evaluate
    from diffllama.modeling import DiffLlamaForCausalLM
    from diffllama.tokenizer import Tokenizer
    from diffllama.train.config import resolve_config
    from diffllama.train.loop import run_training
    from diffllama.train.metrics import read_metrics_file

    overrides = {"seed": seed, "max_steps": args.max_steps, "data": args.data or None, "save_every": 0,
                 "model": {**ARCHITECTURES[arch], "attn_implementation": "auto"}}
    if args.eval_every:
        overrides["eval_every"] = args.eval_every
    cfg = resolve_config(args.preset, None, overrides)
    work = Path(tempfile.mkdtemp(prefix=f"study-{arch}-{seed}-"))
    try:
        started = time.perf_counter()
        result = run_training(cfg, work / "run", quiet=True)
        train_s = time.perf_counter() - started
        records, _ = read_metrics_file(work / "run" / "metrics.jsonl")
        model_dir = result.model_dir
        gpu = torch.cuda.is_available()
        model = DiffLlamaForCausalLM.from_pretrained(model_dir, dtype="bfloat16" if gpu else "float32",
                                                     device="cuda" if gpu else "cpu").eval()
        tokenizer = Tokenizer.from_pretrained(model_dir)
        settings = EvalSettings(samples=args.samples, outlier_sequences=16, max_tokens=args.eval_tokens,
                                quantization_tokens=args.eval_tokens or 16384)
        started = time.perf_counter()
        evaluation = evaluate(str(model_dir), work / "eval", settings, model=model, tokenizer=tokenizer,
                              progress=False)
        eval_s = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"arch": arch, "seed": seed, "tag": args.tag, "preset": args.preset, "max_steps": args.max_steps,
            "parameters": model.num_parameters(), "data": args.data or ["bundled"],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "commit": _git("rev-parse", "HEAD"), "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "summary": result.metrics.get("summary"), "metrics": records, "eval": evaluation}


def _git(*args) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def headline(record: dict) -> dict[str, float]:
    """The figures compared across architectures, from one run's record (nan where an evaluation is absent)."""
    ev = record["eval"]
    nan = float("nan")
    needle = ev.get("needle", {})
    figures = {"val_bits_per_byte": (record.get("summary") or {}).get("val_bits_per_byte", nan),
               "ppl_bits_per_byte": ev.get("perplexity", {}).get("bits_per_byte", nan),
               "attn_answer": ev.get("attention", {}).get("answer", nan),
               "attn_noise": ev.get("attention", {}).get("noise", nan),
               "logit_top1": ev.get("outliers", {}).get("attention_logits", {}).get("top1", nan),
               "hidden_top1": ev.get("outliers", {}).get("hidden_states", {}).get("top1", nan),
               "icl_spread": ev.get("icl", {}).get("spread", nan)}
    for cell, data in needle.items():
        figures[f"needle_{cell.replace(',', '_')}"] = data["overall"]
    for width, data in ev.get("quantization", {}).items():
        figures[f"loss_q{width}"] = data["loss"]
    return {k: (nan if v is None else v) for k, v in figures.items()}


def table(folder: Path = RESULTS) -> str:
    """Mean ± standard deviation over seeds of each headline figure, one row per (architecture, tag)."""
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        groups.setdefault((record["arch"], record["tag"]), []).append(headline(record))
    lines = []
    for (arch, tag), rows in groups.items():
        lines.append(f"{arch} [{tag}], {len(rows)} seed(s):")
        for key in rows[0]:
            values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else float("nan")
                lines.append(f"  {key:<20} {statistics.mean(values):10.4f} ± {spread:.4f}  (n={len(values)})")
    return "\n".join(lines) or "no runs yet"


def main(argv=None) -> None:
    """Parse the flags, run every missing (architecture, seed), print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["diffllama"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--preset", default="small", help="Model shape and training settings (diffllama presets).")
    parser.add_argument("--max-steps", type=int, default=1000, help="Optimizer steps (equal for every run).")
    parser.add_argument("--eval-every", type=int, default=0, help="Validation interval (0 = the preset's).")
    parser.add_argument("--data", nargs="*", default=[], help="Corpus files/folders (default: the bundled one).")
    parser.add_argument("--samples", type=int, default=2, help="Needle samples per cell, length and depth.")
    parser.add_argument("--eval-tokens", type=int, default=0,
                        help="Held-out tokens for perplexity and the quantised losses (0 = all).")
    parser.add_argument("--tag", default="small1k", help="Names this configuration in the file names and table.")
    parser.add_argument("--out", default=str(RESULTS), help="Folder of the per-run JSON files.")
    parser.add_argument("--commit", action="store_true", help="git commit each run's JSON as it lands.")
    parser.add_argument("--table", action="store_true", help="Only print the table of the runs so far.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(out))
        return
    if args.max_steps < 1 or args.samples < 1 or args.eval_tokens < 0:
        parser.error("--max-steps and --samples must be >= 1, --eval-tokens >= 0")
    out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        for seed in args.seeds:
            path = out / run_name(arch, seed, args.tag)
            if path.exists():
                print(f"{path.name}: done already, skipped")
                continue
            record = train_and_evaluate(arch, seed, args)
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(f"{path.name}: train {record['train_s']} s, eval {record['eval_s']} s, "
                  f"{json.dumps({k: round(v, 4) for k, v in headline(record).items()})}", flush=True)
            if args.commit:
                subprocess.run(["git", "add", str(path)], cwd=ROOT, check=True)
                subprocess.run(["git", "commit", "-q", "-m", f"study: {path.stem}"], cwd=ROOT, check=True)
    print(table(out))


if __name__ == "__main__":
    sys.exit(main())
