"""Helpers for the training tests: a small corpus cut from the bundled one and a micro model config."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from diffllama.train.config import resolve_config
from diffllama.train.data import bundled_corpus

MICRO_MODEL = dict(vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def small_corpus(folder: Path, documents: int = 30, chars: int = 3000) -> Path:
    """Write the first ``documents`` addresses of the bundled corpus, cut to ``chars`` characters, as JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small.jsonl"
    with gzip.open(bundled_corpus(), "rt", encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        for _, line in zip(range(documents), src):
            record = json.loads(line)
            dst.write(json.dumps({"text": record["text"][:chars]}) + "\n")
    return path


def micro_config(corpus: Path, cache: Path, **overrides):
    """A TrainConfig for a 2-layer hidden-32 model on ``corpus``: seq 32, batch 4, vocab 320, float32 CPU."""
    settings = dict(data=[str(corpus)], cache_dir=str(cache), tokenizer_vocab_size=320, seq_len=32, batch_size=4,
                    grad_accum=1, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, log_every=1,
                    save_every=3, keep_last=5, device="cpu", val_fraction=0.1, tensorboard=False, model=MICRO_MODEL)
    settings.update(overrides)
    return resolve_config("tiny", overrides=settings)
