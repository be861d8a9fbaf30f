"""Named training presets: a model shape plus the training settings that suit it.

Each preset is a dict with two parts: ``model`` (``DiffLlamaConfig`` fields) and ``train`` (``TrainConfig`` fields).
A YAML/TOML config file and CLI flags override a preset field by field (see :mod:`diffllama.train.config`).

- ``tiny``: 5.3 M parameters, vocab 4096, sequence 256, 160 steps of 16 x 256 tokens (0.66 M tokens). Built to
  train on 2 CPU cores in about 6.5 minutes (on the slower of the two machines it was measured on) on the bundled
  corpus to a validation loss well below the corpus' unigram entropy (measured figures: benchmarks/RESULTS.md). Untied embeddings: in a tied model this small the
  direct embedding-to-logit path favours repeating the current token, and it stayed on the unigram plateau longer
  (5.82 vs 5.58 nats after 614 k tokens in a side-by-side measurement).
- ``small``: about 40 M parameters, a quick single-GPU run.
- ``0.4b``: hidden 1024, 24 layers, 16 heads, intermediate 2816, sequence 2048 (the throughput benchmark shape).
- ``1b``: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256 (about 1.2 B parameters).

The two GPU presets compile each decoder layer (``compile: true``): on an H200 that took the 0.4b shape from 74.7k
to 136.6k tokens/s (benchmarks/RESULTS.md); pass ``--no-compile`` to skip the ~20 s compile.

A model ``vocab_size`` of ``None`` means "the tokenizer's vocabulary, rounded up to a multiple of 64".

Each preset is a matched trio, one member per architecture (``model_type``: DiffLlama V1, Differential Transformer
V2, Llama): the same hidden size, layers, heads and training settings, parameter counts within 2% (a test checks
every trio). V1 and Llama differ only by V1's four λ vectors per layer. V2's ``q_proj`` is twice as wide and it
adds ``lambda_proj`` (hidden x heads), about hidden² + hidden·heads parameters per layer, paid for by a narrower
MLP (:data:`ARCH_MODEL`: ``intermediate_size`` lowered by about (hidden + heads) / 3, rounded to a multiple of 32
or 128 so the matmuls stay aligned).
"""

from __future__ import annotations

import copy

from diffllama.config import MODEL_TYPE, MODEL_TYPES

PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "model": dict(vocab_size=None, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False),
        "train": dict(tokenizer_vocab_size=4096, seq_len=256, batch_size=16, grad_accum=1, max_steps=160,
                      lr=3e-3, warmup_steps=16, min_lr_ratio=0.1, weight_decay=0.1, eval_every=40, eval_batches=8,
                      save_every=80, log_every=10),
    },
    "small": {
        "model": dict(vocab_size=None, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=True),
        "train": dict(tokenizer_vocab_size=16384, seq_len=1024, batch_size=16, grad_accum=1, max_steps=2000,
                      lr=1e-3, warmup_steps=100, eval_every=250, eval_batches=16, save_every=500),
    },
    "0.4b": {
        "model": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False),
        "train": dict(tokenizer_vocab_size=32000, seq_len=2048, batch_size=8, grad_accum=1, max_steps=10000,
                      lr=6e-4, warmup_steps=500, eval_every=500, eval_batches=20, save_every=1000, compile=True),
    },
    "1b": {
        "model": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                      rope_theta=500000.0, tie_word_embeddings=False),
        "train": dict(tokenizer_vocab_size=32000, seq_len=4096, batch_size=4, grad_accum=1, max_steps=20000,
                      lr=3e-4, warmup_steps=1000, eval_every=1000, eval_batches=20, save_every=1000,
                      activation_checkpointing=False, compile=True),
    },
}

# The model fields of a preset's other trio members, over its ``model`` (V1's and Llama's are the same): parameter
# counts within 2% of the Llama member (V2: -0.5% tiny, -0.7% small, -0.7% 0.4b, +0.3% 1b).
ARCH_MODEL: dict[str, dict[str, dict]] = {
    "tiny": {"diffllama_v2": dict(intermediate_size=608)},
    "small": {"diffllama_v2": dict(intermediate_size=1216)},
    "0.4b": {"diffllama_v2": dict(intermediate_size=2432)},
    "1b": {"diffllama_v2": dict(intermediate_size=7552)},
}


def get_preset(name: str, model_type: str = MODEL_TYPE) -> dict[str, dict]:
    """A deep copy of preset ``name``'s member for ``model_type`` as ``{"model": {...}, "train": {...}}``; its
    ``model`` holds ``model_type`` too.

    Args:
        name: a key of :data:`PRESETS`.
        model_type: "diffllama" (V1, the default), "diffllama_v2" or "llama" (:data:`diffllama.config.MODEL_TYPES`).

    Raises:
        ValueError: for an unknown name or model_type, listing the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    preset = copy.deepcopy(PRESETS[name])
    preset["model"].update(ARCH_MODEL.get(name, {}).get(model_type, {}), model_type=model_type)
    return preset
