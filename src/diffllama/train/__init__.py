"""Training: raw text to a DiffLlama checkpoint, on one device or many (torchrun + DDP / FSDP2).

Modules: :mod:`~diffllama.train.config` (TrainConfig, presets + file + flags), :mod:`~diffllama.train.data`
(BPE, packed shards, batch plan), :mod:`~diffllama.train.loss` (chunked LM head + cross-entropy),
:mod:`~diffllama.train.loop` (Trainer), :mod:`~diffllama.train.checkpoint`, :mod:`~diffllama.train.distributed`,
:mod:`~diffllama.train.metrics` (reading ``metrics.jsonl``), :mod:`~diffllama.train.plot` (``diffllama plot``).
"""

from diffllama.train.config import TrainConfig, resolve_config
from diffllama.train.loop import FitResult, Trainer, run_training

__all__ = ["TrainConfig", "resolve_config", "Trainer", "FitResult", "run_training"]
