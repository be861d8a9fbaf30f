"""diffllama: DiffLlama (Llama with differential attention) models, kernels, training and generation.

The model classes load and save checkpoints in transformers' layout and match its ``DiffLlama*`` classes
number for number; ``config.model_type`` also selects Differential Transformer V2 (``"diffllama_v2"``) or a plain
Llama whose checkpoints are transformers' ``LlamaForCausalLM`` ones (``"llama"``); :mod:`diffllama.convert` turns a
Llama checkpoint into either differential architecture. Source paper: Ye et al., "Differential Transformer", arXiv 2410.05258.
"""

from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import ARCHITECTURES, DiffLlamaConfig, model_type_for_arch
from diffllama.modeling import (
    DiffLlamaForCausalLM,
    DiffLlamaForQuestionAnswering,
    DiffLlamaForSequenceClassification,
    DiffLlamaForTokenClassification,
    DiffLlamaModel,
    DiffLlamaPreTrainedModel,
)
from diffllama.generation import GenerationSettings, generate, resolve_generation_settings, stream_generate, stream_text
from diffllama.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "DiffLlamaConfig",
    "DiffLlamaModel",
    "DiffLlamaPreTrainedModel",
    "DiffLlamaForCausalLM",
    "DiffLlamaForSequenceClassification",
    "DiffLlamaForTokenClassification",
    "DiffLlamaForQuestionAnswering",
    "DynamicCache",
    "GenerationSettings",
    "StaticCache",
    "Tokenizer",
    "generate",
    "model_type_for_arch",
    "resolve_generation_settings",
    "stream_generate",
    "stream_text",
]
