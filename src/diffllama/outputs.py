"""Model outputs with transformers' field names, read the way transformers' ``ModelOutput`` is read.

Each output is a dataclass whose set (non-None) fields also behave as an ordered mapping: ``out.logits``,
``out["logits"]``, ``out[0]`` (the first set field), ``out.to_tuple()``, ``keys()``/``values()``/``items()``, and
``return_dict=False`` on any model's forward returns ``to_tuple()`` (transformers' ``can_return_tuple``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch


class ModelOutput:
    """Mapping-style access to a dataclass output's set fields, in declaration order (transformers' semantics:
    ``None`` fields are absent from keys, tuple and integer indexing)."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, object]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple:
        """The set fields' values, in order (loss first when present, as transformers)."""
        return tuple(self.values())

    def __getitem__(self, key):
        """``out["logits"]`` (KeyError when unset, as transformers), or ``out[i]`` / ``out[i:j]`` over
        :meth:`to_tuple`."""
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())  # as a dict (transformers' ModelOutput is an OrderedDict)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    """What :meth:`diffllama.DiffLlamaModel.forward` returns (transformers' ``modeling_outputs`` class of the same
    name). Tensors are in the model's dtype (the activation dtype under autocast).

    Fields:
        last_hidden_state: (B, S, D), the final RMSNorm's output.
        past_key_values: the ``diffllama.cache`` DynamicCache or StaticCache holding the keys and values of all
            P + S positions, when ``use_cache``; else None.
        hidden_states: when ``output_hidden_states``: L + 1 tensors (B, S, D), the embedding output and each
            layer's output, the last one normed (so equal to ``last_hidden_state``); else None.
        attentions: when ``output_attentions`` (eager backend): L tensors (B, H, S, Sk) of attention
            probabilities, Sk the keys attended (P + S; a StaticCache's max_length); else None.
    """

    last_hidden_state: torch.Tensor
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    """What :meth:`diffllama.DiffLlamaForCausalLM.forward` returns (transformers' ``modeling_outputs`` class of
    the same name).

    Fields:
        loss: 0-d float32 next-token cross-entropy, when ``labels`` were given; else None.
        logits: (B, S_kept, vocab_size) in the model's dtype (S_kept from ``logits_to_keep``; S by default).
        past_key_values, hidden_states, attentions: as :class:`BaseModelOutputWithPast`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(CausalLMOutputWithPast):
    """What :meth:`diffllama.DiffLlamaForSequenceClassification.forward` returns (transformers'
    ``modeling_outputs`` class of the same name): the fields of :class:`CausalLMOutputWithPast`, except

    Fields:
        loss: 0-d, in the logits' dtype, by ``config.problem_type`` (MSE, cross-entropy or BCE), when ``labels``
            were given; else None.
        logits: (B, num_labels) in the model's dtype, each row's logits at its last non-pad token.
    """


@dataclass
class TokenClassifierOutput(ModelOutput):
    """What :meth:`diffllama.DiffLlamaForTokenClassification.forward` returns (transformers' ``modeling_outputs``
    class of the same name; no cache field).

    Fields:
        loss: 0-d float32 cross-entropy over the tokens whose label is not -100, when ``labels`` were given; else
            None.
        logits: (B, S, num_labels) in the model's dtype.
        hidden_states, attentions: as :class:`BaseModelOutputWithPast`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    """What :meth:`diffllama.DiffLlamaForQuestionAnswering.forward` returns (transformers' ``modeling_outputs``
    class of the same name; no cache field).

    Fields:
        loss: 0-d, in the logits' dtype, the mean of the start and end cross-entropies, when both
            ``start_positions`` and ``end_positions`` were given; else None.
        start_logits, end_logits: (B, S) each, in the model's dtype: per-token scores of the answer span's first and
            last token.
        hidden_states, attentions: as :class:`BaseModelOutputWithPast`.
    """

    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def can_return_tuple(forward):
    """Give ``forward`` a keyword ``return_dict`` (None or True: the output object; False: ``output.to_tuple()``),
    as transformers' decorator of the same name (which also reads a ``return_dict`` config entry; this does not).

    Raises:
        TypeError: ``return_dict`` not None or a bool.
    """

    @functools.wraps(forward)
    def wrapper(self, *args, return_dict: bool | None = None, **kwargs):
        if return_dict is None:
            return_dict = True
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict must be None or a bool, got {return_dict!r}")
        output = forward(self, *args, **kwargs)
        return output if return_dict else output.to_tuple()

    return wrapper
