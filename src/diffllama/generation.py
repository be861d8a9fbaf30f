"""Text generation for DiffLlama: a few small functions around a KV cache, and a streaming generator.

The chain (the shape of pytorch-labs/gpt-fast's generate.py; written here from scratch):

- :func:`prefill` runs the prompt once, fills the cache, returns the last position's logits;
- :func:`decode_one_token` runs one new token per row against the cache; :class:`DecodeStep` wraps it, optionally
  compiled with ``torch.compile`` and, on CUDA, captured once in a CUDA graph and replayed per token (the fast path:
  a :class:`~diffllama.cache.StaticCache` keeps every address fixed);
- :func:`next_tokens` turns logits into tokens (repetition penalty, temperature, top-k, top-p, in transformers'
  order; greedy when ``do_sample`` is False);
- :func:`stream_generate` yields each step's tokens, :func:`generate` collects them (and feeds a ``streamer``),
  :func:`stream_text` yields decoded text for one prompt.

Batches are left-padded: ``attention_mask`` (B, S) has zeros on the left. Position ids are the cumulative sum of the
mask minus one (padding at 1), as transformers' ``generate`` computes them, so greedy output equals
``transformers.DiffLlamaForCausalLM.generate`` token for token (one deliberate difference: with a repetition
penalty, transformers also penalises the pad id of a left-padded row's prompt; here only real tokens are). Each row stops at its first EOS (kept in the output);
later positions of that row hold ``pad_token_id``; generation ends when every row has stopped or after
``max_new_tokens`` (by default 20, as transformers: see :func:`resolve_lengths`).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch

from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import is_int, token_ids
from diffllama.decode import lambda_parameters, prepare_for_decode, refresh_lambda
from diffllama.inputs import FOUR_D_MASK_MESSAGE
from diffllama.rope import check_compile_supported

# New tokens when no length is given anywhere: transformers' GenerationConfig default (max_length=20), which its
# generate counts from the end of the prompt ("by default let's always generate 20 new tokens").
DEFAULT_MAX_NEW_TOKENS = 20


# ---- arguments ------------------------------------------------------------------------------------------------------

def _check_count(value, name: str, minimum: int) -> int:
    """``value`` as a Python int, checked to be an integer (not a bool) >= ``minimum``; errors name ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_sampling_args(*, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty) -> dict:
    """Validate generation arguments; return them as a dict of plain Python ``int``/``float`` (None kept), so that a
    numpy or other ``numbers.Integral``/``numbers.Real`` scalar acts exactly as the Python number of its value.

    ``max_new_tokens`` (None: not given, see :func:`resolve_lengths`) and ``top_k`` must be integers,
    ``temperature``, ``top_p`` and ``repetition_penalty`` real numbers; bool is refused for all of them. The reals
    must be finite (NaN or infinity is refused even when not sampling: a NaN temperature would otherwise silently
    mean greedy decoding).

    Raises:
        TypeError or ValueError: naming the argument, its bad value and what is expected.
    """
    if max_new_tokens is not None:
        max_new_tokens = _check_count(max_new_tokens, "max_new_tokens", 1)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if value is None and name == "top_p":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {temperature}; "
                         f"use do_sample=False for greedy decoding")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty!r}")
    return dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature),
                top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
                repetition_penalty=float(repetition_penalty))


# transformers' effective defaults of the sampling settings (GenerationConfig leaves them None).
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0}
# Generation-config settings this module does not implement: a checkpoint's own value is named in a warning.
UNSUPPORTED_SETTINGS = {"no_repeat_ngram_size": 0, "num_beams": 1, "min_p": None, "typical_p": 1.0,
                        "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                        "forced_bos_token_id": None, "forced_eos_token_id": None, "length_penalty": 1.0,
                        "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "exponential_decay_length_penalty": None}


def resolve_sampling(model, **given) -> dict:
    """``do_sample``, ``temperature``, ``top_k``, ``top_p`` and ``repetition_penalty``, each the argument when not
    None, else ``model.generation_config``'s (a checkpoint's generation_config.json, as transformers applies it),
    else :data:`SAMPLING_DEFAULTS` (greedy, temperature 1, no top-k / top-p, no penalty). A config's ``top_k`` of 0
    and ``top_p`` of 1 mean "off" there and become None. Settings of the config this module does not implement
    (:data:`UNSUPPORTED_SETTINGS`, e.g. ``no_repeat_ngram_size``) give a UserWarning naming them.

    Values are returned unchecked: :func:`check_sampling_args` checks them.
    """
    gen = _generation_config(model)
    out = {}
    for name, default in SAMPLING_DEFAULTS.items():
        value = given.get(name)
        if value is None:
            value = gen.get(name)
            if (name, value) in (("top_k", 0), ("top_p", 1.0)):
                value = None
        out[name] = default if value is None else value
    ignored = [f"{k}={gen[k]!r}" for k, off in UNSUPPORTED_SETTINGS.items() if gen.get(k) not in (None, off)]
    if ignored:
        warnings.warn(f"model.generation_config sets {', '.join(ignored)}, which diffllama's generate does not "
                      f"implement: ignored", UserWarning, stacklevel=4)
    return out


def _warn_ignored_sampling(*, do_sample, temperature=1.0, top_k=None, top_p=None, **_) -> None:
    """Warn (UserWarning) when greedy decoding is asked for with sampling settings it ignores, as transformers'
    ``GenerationConfig.validate`` does: the caller likely meant to sample. Their defaults (temperature 1, no top-k,
    no top-p) say nothing and do not warn."""
    if do_sample:
        return
    ignored = [f"{name}={value!r}" for name, value, default in (("temperature", temperature, 1.0),
                                                               ("top_k", top_k, None), ("top_p", top_p, None))
               if value != default]
    if ignored:
        warnings.warn(f"do_sample=False (greedy decoding) ignores {', '.join(ignored)}: these settings only apply "
                      f"to sampling; pass do_sample=True to use them, or leave them out", UserWarning,
                      stacklevel=4)  # past stream_generate and its inference_mode wrapper: its caller


def resolve_lengths(model, prompt_length: int, *, max_new_tokens=None, max_length=None,
                    min_new_tokens=None) -> tuple[int, int]:
    """The most and the fewest new tokens per row, ``(max_new_tokens, min_new_tokens)``, as transformers 5.17's
    ``generate`` derives them from its arguments and ``model.generation_config``.

    ``prompt_length`` is the (padded) width S of ``input_ids`` (or of ``inputs_embeds``). Each of
    ``max_new_tokens``, ``max_length`` and ``min_new_tokens`` is the argument when given, else the generation config's (a dict, as
    :func:`diffllama.hf_format.read_generation_config` returns; absent or {} for a model not loaded from a checkpoint). Then, as in
    transformers, the most new tokens is the first of:

    - ``max_new_tokens`` (an int >= 1), so it wins over any ``max_length``, even one given as an argument;
    - ``max_length``: the total length, prompt included, so ``max_length - S`` new tokens; it must exceed S;
    - transformers' default: 20 new tokens, but no more than make the total ``model.config.max_position_embeddings``
      (a prompt that already fills it is refused, as transformers refuses it).

    ``min_new_tokens`` (else 0): an int >= 0; until that many new tokens are produced, EOS cannot be picked
    (transformers' ``MinNewTokensLengthLogitsProcessor``). One above the most new tokens gives a UserWarning, as in
    transformers (generation then runs to the most).

    Raises:
        TypeError: ``max_new_tokens``, ``max_length`` or ``min_new_tokens`` not an int (bool refused), naming it and
            whether it came from ``model.generation_config``.
        ValueError: ``max_new_tokens`` < 1, ``max_length`` <= S, ``min_new_tokens`` < 0, or (no length given) a
            prompt of at least ``max_position_embeddings`` tokens.
    """
    gen = _generation_config(model)

    def pick(name, given):  # (value, name for errors)
        if given is not None:
            return given, name
        return gen.get(name), f"{name} (from model.generation_config)"

    new, new_name = pick("max_new_tokens", max_new_tokens)
    total, total_name = pick("max_length", max_length)
    fewest, fewest_name = pick("min_new_tokens", min_new_tokens)
    if total is not None:
        _check_count(total, total_name, 1)  # the type, even when max_new_tokens makes it unused
    if new is not None:
        most = _check_count(new, new_name, 1)
    elif total is not None:
        most = _total_to_new(total, total_name, prompt_length)
    else:
        limit = model.config.max_position_embeddings
        if prompt_length >= limit:
            raise ValueError(f"input_ids has {prompt_length} tokens, which fills max_position_embeddings={limit}: "
                             f"the default length ({DEFAULT_MAX_NEW_TOKENS} new tokens, at most "
                             f"max_position_embeddings in all, as transformers) leaves none; pass max_new_tokens "
                             f"or max_length")
        most = min(DEFAULT_MAX_NEW_TOKENS, limit - prompt_length)
    fewest = 0 if fewest is None else _check_count(fewest, fewest_name, 0)
    if fewest > most:
        warnings.warn(f"min_new_tokens={fewest} is more than the {most} new tokens generation may produce: EOS "
                      f"is suppressed throughout and generation runs to {most} new tokens", UserWarning,
                      stacklevel=4)  # past stream_generate and its inference_mode wrapper: its caller
    return most, fewest


def _total_to_new(max_length, name: str, prompt_length: int) -> int:
    """New tokens left by a total length ``max_length`` after a prompt of ``prompt_length`` tokens."""
    max_length = _check_count(max_length, name, 1)
    if max_length <= prompt_length:
        raise ValueError(f"{name} must be greater than the prompt length (input_ids has {prompt_length} tokens; "
                         f"max_length counts the prompt too, as in transformers), got {max_length}; or pass "
                         f"max_new_tokens")
    return max_length - prompt_length


def _generation_config(model) -> dict:
    """``model.generation_config`` as a dict ({} when unset); a transformers ``GenerationConfig`` works too."""
    gen = getattr(model, "generation_config", None) or {}
    if not isinstance(gen, dict):
        gen = gen.to_dict() if hasattr(gen, "to_dict") else vars(gen)
    return gen


def check_eos_token_id(value, vocab_size: int, name: str = "eos_token_id") -> list[int]:
    """``value`` as a list of EOS ids, checked: None (-> ``[]``), an int, or a list, tuple or 0-d/1-D integer tensor
    of ints; every id in [0, vocab_size). ``[]`` means no stop ids.

    Raises:
        TypeError: any other type, including bool, float, str, a float or bool tensor, a list holding a non-int.
        ValueError: a tensor of more than one dimension, or an id outside [0, vocab_size).
    """
    expected = "None, an int, or a list, tuple or 0-d/1-D integer tensor of ints"
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be {expected}, got a {value.dtype} tensor")
        if value.dim() > 1:
            raise ValueError(f"{name} must be {expected}, got a tensor of shape {tuple(value.shape)}")
        value = value.reshape(-1).tolist()
    return token_ids(value, vocab_size, name, expected=expected)


def resolve_special_ids(model, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int]:
    """EOS ids (a list, possibly empty) and the pad id for ``model``, checked against ``model.config.vocab_size``.

    Order of precedence: the arguments; ``model.generation_config`` (a dict, e.g. from
    :func:`diffllama.hf_format.read_generation_config`, when the attribute exists); ``model.config``. ``eos_token_id``: None, an int,
    or a list, tuple or 0-d/1-D integer tensor of ints, each in [0, vocab_size); ``[]`` disables stopping.
    ``pad_token_id``: None or an int in [0, vocab_size). The pad id falls back to the first EOS id, then 0 (it is
    only written after a row's EOS); a pad id from the configs outside [0, vocab_size) (e.g. -1, "no pad") falls
    back the same way.

    Raises:
        TypeError: an id of the wrong type (bool, float, str, ...), naming the argument and where it came from.
        ValueError: an EOS id, or a ``pad_token_id`` argument, outside [0, vocab_size).
    """
    eos, pad = _configured_special_ids(model, eos_token_id, pad_token_id)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, pad


def _configured_special_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """:func:`resolve_special_ids` before the pad id's fallback: None where no argument or config sets one."""
    vocab = model.config.vocab_size
    gen = _generation_config(model)
    config = getattr(model, "config", None)

    def first(name, given):  # (value, name for errors)
        if given is not None:
            return given, name
        if gen.get(name) is not None:
            return gen[name], f"{name} (from model.generation_config)"
        return getattr(config, name, None), f"{name} (from model.config)"

    value, name = first("eos_token_id", eos_token_id)
    eos = check_eos_token_id(value, vocab, name)
    pad, name = first("pad_token_id", pad_token_id)
    if pad is not None and not is_int(pad):
        raise TypeError(f"{name} must be None or an int in [0, vocab_size={vocab}), got {pad!r}")
    if pad is not None and not 0 <= pad < vocab:  # written after a row's EOS and fed back to the model: it must embed
        if pad_token_id is not None:
            raise ValueError(f"pad_token_id must lie in [0, vocab_size={vocab}) (it follows a row's EOS and is fed "
                             f"to the model), got {pad_token_id!r}")
        pad = None  # a config's -1 ("no pad"): as when unset
    return eos, None if pad is None else int(pad)


def infer_attention_mask(input_ids: torch.Tensor, pad_token_id: int | None, eos: list[int]) -> torch.Tensor | None:
    """The mask transformers' ``generate`` infers when none is given: ``input_ids != pad_token_id`` (B, S) int64,
    when a pad id is set (by the argument or a config), is not an EOS id and occurs in ``input_ids``; else None."""
    if pad_token_id is None or pad_token_id in eos or not bool((input_ids == pad_token_id).any()):
        return None
    return (input_ids != pad_token_id).long()


# ---- batching -------------------------------------------------------------------------------------------------------

def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int = 0, device=None,
              padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into ``(input_ids, attention_mask)``, both (B, max_len) int64: on the left (what
    ``generate`` needs) or on the right.

    Raises:
        ValueError: an empty batch, an empty sequence, or a ``padding_side`` other than "left"/"right".
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(sequences) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence must hold at least one token (an empty prompt cannot be continued)")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B, S) int64 positions: cumulative count of real tokens minus one, 1 at padding.

    The rule transformers' ``generate`` uses, so left padding does not shift positions.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _check_inputs(input_ids, attention_mask, vocab_size: int, inferred_from: int | None = None,
                  inputs_embeds=None, dtype: torch.dtype | None = None, hidden_size: int | None = None
                  ) -> torch.Tensor:
    """The checked (B, S) int64 0/1 mask of a prompt given as ``input_ids`` (B, S), ``inputs_embeds`` (B, S, D) of
    ``dtype`` with D = ``hidden_size``, or both (of the same B and S); errors name the argument."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids (B, S), inputs_embeds (B, S, hidden_size), or both")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must have shape (batch, seq) with batch, seq >= 1, got "
                             f"{tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in [{low}, {high}]")
    if inputs_embeds is not None:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point() \
                or inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != hidden_size or 0 in inputs_embeds.shape:
            raise ValueError(f"inputs_embeds must be a floating tensor of shape (batch, seq, hidden_size="
                             f"{hidden_size}) with batch, seq >= 1, got {_describe(inputs_embeds)}")
        if inputs_embeds.dtype != dtype:
            raise ValueError(f"inputs_embeds must have the model's dtype {dtype}, got {inputs_embeds.dtype}")
        if input_ids is not None and input_ids.shape != inputs_embeds.shape[:2]:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
                             f"must describe the same (batch, seq) prompt")
    shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
    device = (input_ids if input_ids is not None else inputs_embeds).device
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be None or a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 4:
        raise ValueError(FOUR_D_MASK_MESSAGE)
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids (or of inputs_embeds' batch and "
                         f"seq) {shape}, got {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_complex:  # as the model's forward
        raise TypeError(f"attention_mask must be a bool, integer or float (0/1) tensor, got {attention_mask.dtype}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):  # before the cast, which would truncate 0.5
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = attention_mask.to(device=device).long()
    source = "" if inferred_from is None else (
        f" (no attention_mask was given, so it was inferred as input_ids != pad_token_id={inferred_from}, as "
        f"transformers does; pass attention_mask to say which tokens are real)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (zeros only before the first real token of each row); "
                         "generation appends tokens on the right" + source)
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token (a 1)" + source)
    return mask


def _describe(value) -> str:
    """Shape and dtype of a tensor, else its type name, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    return type(value).__name__


# ---- sampling -------------------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858 §4.1): logits of tokens already seen are
    divided by ``penalty`` when positive, multiplied when negative.

    logits (B, V) float, seen (B, V) bool. Returns a new (B, V) tensor.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the sampling support to -inf: top-k first, then top-p (nucleus, Holtzman et al. 2019).

    top-k keeps the k largest logits of each row (ties at the k-th value are all kept). top-p keeps the smallest
    set of most probable tokens whose probability (softmax of the top-k-filtered logits) reaches ``top_p``: a token
    is kept when the mass of the strictly more probable tokens before it, in descending order, is below ``top_p``;
    the most probable token is always kept.

    Args:
        logits: (B, V) floating. top_k: None or >= 1 (values >= V keep everything). top_p: None or in (0, 1].

    Returns:
        (B, V) logits of the same dtype.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked before each one
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V); returns (B,) int64.

    Order as transformers' logits processors: repetition penalty (needs ``seen`` (B, V) bool), then (sampling
    only) temperature, top-k, top-p, and a draw from the softmax with ``generator``. Greedy: argmax (first index
    on ties). Sampling divides the logits minus their row max by ``temperature`` (> 0), so any tiny temperature is
    safe and picks the argmax (a uniform draw among tied maxima).
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1)
    # Shifted so the row max is 0: the scaled logits are <= 0 (finite or -inf) and a tiny temperature cannot
    # overflow them to inf (it then acts as greedy); below float32's smallest normal number it acts as that number.
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits = filter_logits(logits / max(temperature, torch.finfo(torch.float32).tiny), top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---- model steps ----------------------------------------------------------------------------------------------------

def prefill(model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor, cache, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt through ``model`` once, writing slots 0..S-1 of ``cache``; return last logits (B, V) float32.

    Args:
        input_ids: (B, S) int64, or None with ``inputs_embeds`` (B, S, D) in the model's dtype, which the model
            then reads instead (as transformers' generate: the embeddings win when both are given).
        attention_mask: (B, S) for a dynamic cache, (B, max_length) for a static one, or None (no padding).
        position_ids: (B, S) int64. cache: a DynamicCache or StaticCache.
    """
    cache_position = torch.arange(position_ids.shape[1], device=position_ids.device)
    return decode_one_token(model, cache, None if inputs_embeds is not None else input_ids, position_ids,
                            cache_position, attention_mask, inputs_embeds)


def decode_one_token(model, cache, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                     cache_position: torch.Tensor, attention_mask: torch.Tensor | None,
                     inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step: (B, 1) tokens at positions (B, 1), cache slot ``cache_position`` (1,) -> (B, V) float32.

    ``attention_mask`` covers every cache slot so far ((B, slot + 1) for a dynamic cache, (B, max_length) for a
    static one) or is None. Free of host synchronisation under ``torch.compile`` (the model's input checks are
    skipped there), so it can be captured in a CUDA graph. ``inputs_embeds`` (B, S, D) replaces ``input_ids`` (None
    then) for a prompt given as embeddings (:func:`prefill`).
    """
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=cache, use_cache=True, cache_position=cache_position,
                logits_to_keep=1)
    return out.logits[:, -1].float()


class DecodeStep:
    """``decode_one_token`` bound to a model and cache, optionally compiled and CUDA-graphed.

    ``compile=False``: plain eager calls. ``compile=True``: ``torch.compile(fullgraph=True, dynamic=False)`` of the
    step with Inductor's coordinate-descent tuning (``compile_mode`` replaces those options by a mode); Inductor
    fuses the norms, RoPE and the differential combination, and at batch 1 computes the projections with its own
    GEMV kernels, except those :mod:`diffllama.gemv` takes (the fused q/k/v product by default). On CUDA with a
    StaticCache the compiled
    step is then captured once in a ``torch.cuda.CUDAGraph`` (after warm-up on a side stream) and every call copies
    its inputs into the graph's static buffers and replays it: one launch per token instead of hundreds. The
    returned logits then live in a static buffer that the next call overwrites: consume them first.

    With ``fuse`` the model is prepared first (:func:`diffllama.decode.prepare_for_decode`): the compiled step reads
    each layer's fixed λ and its fused q/k/v and gate/up projections instead of recomputing λ and running five
    matmuls. Before each call the λ parameters' version counters are compared with the last call's (host-side, no
    synchronisation) and λ is refreshed in place if they changed; the fused projections are views of the
    parameters and follow in-place updates by themselves. Replacing parameters (not updating them in place) needs
    a new DecodeStep: the graph holds their addresses. Attention is the model's ``attn_implementation``:
    ``"auto"`` (or ``"flash"``) decodes with the fused flash kernel on CUDA (:mod:`diffllama.attention.flash_decode`,
    which reads the static cache in place), ``"sdpa"`` with SDPA.

    Args:
        model: a DiffLlamaForCausalLM. cache: the cache the step reads and writes. compile: see above.
        cuda_graph: capture a CUDA graph (default: when compiling on CUDA with a StaticCache).
        compile_mode: a ``torch.compile`` mode instead of the default options.
        fuse: call :func:`diffllama.decode.prepare_for_decode` first (default: when compiling). It changes no
            result and no parameter value.

    Raises:
        ValueError: ``compile`` with a RoPE type that cannot be compiled
            (:func:`diffllama.rope.check_compile_supported`), before the model is touched; ``cuda_graph`` without
            a StaticCache.
    """

    def __init__(self, model, cache, *, compile: bool = False, cuda_graph: bool | None = None,
                 compile_mode: str | None = None, fuse: bool | None = None) -> None:
        if compile:
            check_compile_supported(model.config)
        self.model, self.cache = model, cache
        if fuse is None:
            fuse = compile
        if fuse:
            prepare_for_decode(model)
        self.fn = decode_one_token
        if compile:
            # Coordinate-descent tuning also makes Inductor turn (1, K) x (K, N) matmuls (batch-1 decode) into its
            # own tuned Triton GEMV, which reads weights near the copy bandwidth where cuBLAS's skinny GEMMs do not.
            kwargs = {"mode": compile_mode} if compile_mode else {"options": {"coordinate_descent_tuning": True}}
            self.fn = torch.compile(decode_one_token, fullgraph=True, dynamic=False, **kwargs)
        if cuda_graph is None:
            cuda_graph = compile and isinstance(cache, StaticCache) and model.device.type == "cuda"
        if cuda_graph and not isinstance(cache, StaticCache):
            raise ValueError("cuda_graph=True needs a StaticCache (fixed addresses)")
        self.cuda_graph = cuda_graph
        self.graph = None
        self._static: tuple | None = None
        self._lambda_params = lambda_parameters(model)  # watched for in-place updates between calls
        self._lambda_seen = self._lambda_versions()

    def _run(self, *args) -> torch.Tensor:
        return self.fn(self.model, self.cache, *args)

    def __call__(self, input_ids, position_ids, cache_position, attention_mask=None) -> torch.Tensor:
        """(B, 1), (B, 1), (1,), mask or None -> (B, V) float32 logits (see :func:`decode_one_token`)."""
        if self._lambda_versions() != self._lambda_seen:
            # λ changed in place: the fixed λ is refreshed in place, where a captured graph reads it. (The fused
            # projections are views of the parameters: in-place updates reach them by themselves.)
            refresh_lambda(self.model)
            self._lambda_seen = self._lambda_versions()
        if not self.cuda_graph:
            return self._run(input_ids, position_ids, cache_position, attention_mask)
        if self.graph is None or (attention_mask is None) != (self._static[3] is None):
            self._capture(input_ids, position_ids, cache_position, attention_mask)
        ids, pos, cpos, mask, out = self._static
        ids.copy_(input_ids)
        pos.copy_(position_ids)
        cpos.copy_(cache_position)
        if mask is not None:
            mask.copy_(attention_mask)
        self.graph.replay()
        return out

    def _lambda_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._lambda_params)

    def _capture(self, input_ids, position_ids, cache_position, attention_mask) -> None:
        # Warm-up runs write the same slot with the same values as the real step that follows: harmless.
        static = [t.clone() for t in (input_ids, position_ids, cache_position)]
        static.append(None if attention_mask is None else attention_mask.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(*static)
        self.graph, self._static = graph, (*static, out)


# One reusable (cache, step) per model for the fast path, so repeated calls neither reallocate nor recompile.
_FAST_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATIC_ROUND = 256


def _make_cache_and_step(model, batch: int, total: int, static_cache: bool, compile: bool):
    dtype, device = model.dtype, model.device
    if not static_cache or not compile:
        cache = DynamicCache() if not static_cache else StaticCache.from_config(model.config, batch, total, dtype,
                                                                               device)
        return cache, DecodeStep(model, cache), total
    max_length = -(-total // _STATIC_ROUND) * _STATIC_ROUND  # round up: one graph serves many lengths
    key = (batch, max_length, dtype, device)
    state = _FAST_STATE.get(model)
    if state is None or state[0] != key:
        _FAST_STATE.pop(model, None)  # free the old cache and graph first
        cache = StaticCache.from_config(model.config, batch, max_length, dtype, device)
        state = (key, cache, DecodeStep(model, cache, compile=True))
        _FAST_STATE[model] = state
    return state[1], state[2], max_length


# ---- generation loop ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def stream_generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                    inputs_embeds: torch.Tensor | None = None,
                    max_new_tokens: int | None = None, max_length: int | None = None,
                    min_new_tokens: int | None = None, do_sample: bool | None = None,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float | None = None,
                    eos_token_id: int | Sequence[int] | torch.Tensor | None = None, pad_token_id: int | None = None,
                    seed: int | None = None, static_cache: bool = False, compile: bool = False,
                    sync_every: int = 1) -> Iterator[torch.Tensor]:
    """Return an iterator that yields the new tokens of each step, (B,) int64 on the model's device, until every row
    stopped.

    Arguments as :func:`generate`. ``sync_every``: how often (in steps) the loop reads back whether every row has
    stopped (each read waits for the GPU); with no EOS ids it never reads back. Every argument is checked, and the
    cache allocated, when this is called, before the iterator runs the model.

    Raises:
        ValueError/TypeError: see :func:`generate`.
    """
    given = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty)
    sampling = check_sampling_args(max_new_tokens=max_new_tokens, **resolve_sampling(model, **given))
    if not sampling["do_sample"]:  # greedy, yet sampling settings were passed: say they do nothing
        _warn_ignored_sampling(do_sample=False, **{k: given[k] for k in ("temperature", "top_k", "top_p")
                                                   if given[k] is not None})
    device = model.device
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    inputs_embeds = inputs_embeds.to(device) if isinstance(inputs_embeds, torch.Tensor) else inputs_embeds
    prompt = dict(vocab_size=model.config.vocab_size, inputs_embeds=inputs_embeds, dtype=model.dtype,
                  hidden_size=model.config.hidden_size)
    mask = _check_inputs(input_ids, attention_mask, **prompt)
    b, s = mask.shape
    sampling["max_new_tokens"], min_new_tokens = resolve_lengths(
        model, s, max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens)
    eos, pad = _configured_special_ids(model, eos_token_id, pad_token_id)
    if attention_mask is None and input_ids is not None:  # embeddings alone say nothing of padding
        inferred = infer_attention_mask(input_ids, pad, eos)
        if inferred is not None:
            mask = _check_inputs(input_ids, inferred, inferred_from=pad, **prompt)
    if input_ids is None and sampling["repetition_penalty"] != 1.0:
        warnings.warn("repetition_penalty with inputs_embeds and without input_ids penalises only the new tokens, "
                      "not the prompt (as transformers)", UserWarning, stacklevel=3)  # past inference_mode
    if pad is None:
        pad = eos[0] if eos else 0
    if compile and not static_cache:
        raise ValueError("compile=True needs static_cache=True (the compiled step must see fixed shapes)")
    if compile:
        check_compile_supported(model.config)
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed must be None or an int, got {seed!r}")
    if seed is not None and not 0 <= seed < 2 ** 64:  # torch.Generator.manual_seed's range, as train's seed
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed}")
    if not is_int(sync_every) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    refresh_lambda(model)  # λ written through .data since the last call bumps no version counter
    cache, step, cache_length = _make_cache_and_step(model, b, s + sampling["max_new_tokens"], static_cache,
                                                     compile)
    return _steps(model, None if input_ids is None else input_ids.long(), mask, cache, step, cache_length, eos, pad,
                  generator, **sampling, inputs_embeds=inputs_embeds, min_new_tokens=min_new_tokens,
                  static_cache=static_cache, sync_every=int(sync_every))


@torch.inference_mode()
def _steps(model, input_ids, mask, cache, step, cache_length, eos, pad, generator, *, inputs_embeds,
           max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, static_cache,
           sync_every) -> Iterator[torch.Tensor]:
    """The generation loop of :func:`stream_generate`, on checked arguments."""
    device = mask.device
    b, s = mask.shape
    has_padding = bool((mask == 0).any())
    positions = position_ids_from_mask(mask)
    if static_cache:  # one mask over every slot: real prompt tokens, then all new tokens
        full_mask = torch.ones(b, cache_length, dtype=torch.long, device=device)
        full_mask[:, :s] = mask
        prompt_mask = step_mask = full_mask if has_padding else None
    else:
        full_mask = torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
        prompt_mask = mask if has_padding else None
    logits = prefill(model, input_ids, prompt_mask, positions, cache, inputs_embeds)

    seen = None
    if repetition_penalty != 1.0:
        counts = torch.zeros(b, model.config.vocab_size, dtype=torch.long, device=device)
        if input_ids is not None:  # the prompt's tokens, padding excluded; embeddings alone have none
            counts.scatter_add_(1, input_ids, mask)
        seen = counts > 0  # (B, V)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1  # (B, 1)
    slots = torch.arange(s, s + max_new_tokens, device=device)
    for t in range(max_new_tokens):
        if t < min_new_tokens and eos_tensor is not None:
            # transformers' MinNewTokensLengthLogitsProcessor. Out of place: a CUDA-graphed step's logits live in
            # its static output buffer.
            logits = logits.index_fill(1, eos_tensor, float("-inf"))
        token = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seen=seen, generator=generator)
        if eos_tensor is not None:
            token = torch.where(finished, pad, token)
            finished = finished | torch.isin(token, eos_tensor)
        yield token
        if t == max_new_tokens - 1:
            break
        if eos_tensor is not None and (t + 1) % sync_every == 0 and bool(finished.all()):
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if not static_cache:
            step_mask = full_mask[:, :s + t + 1] if has_padding else None
        logits = step(token[:, None], next_position, slots[t:t + 1], step_mask)
        next_position = next_position + 1
    if isinstance(cache, StaticCache):
        cache.set_seq_length(s + max_new_tokens)


def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             inputs_embeds: torch.Tensor | None = None, max_new_tokens: int | None = None,
             max_length: int | None = None, min_new_tokens: int | None = None,
             do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, streamer=None, static_cache: bool = False, compile: bool = False,
             num_beams: int = 1, return_dict_in_generate: bool | None = False) -> torch.Tensor:
    """Continue left-padded prompts; returns the prompts plus new tokens, (B, S + n) int64, n <= the most new
    tokens (see ``max_new_tokens``); for a prompt given as ``inputs_embeds`` alone, the new tokens only (B, n).

    Args:
        model: a DiffLlamaForCausalLM (any device and dtype; put it in eval mode).
        input_ids: (B, S) integer token ids, left-padded. attention_mask: (B, S) 0/1 (2-D only: a 4-D mask is
            refused). None: as transformers, ``input_ids != pad_token_id`` when a pad id is set (argument or
            config), is not an EOS id and occurs in ``input_ids`` (:func:`infer_attention_mask`), else no padding.
        inputs_embeds: (B, S, hidden_size) in the model's dtype (soft prompts, prefix embeddings): the prompt the
            model reads, instead of embedding ``input_ids``. As transformers 5.17's generate: alone, the result
            holds only the new tokens, no mask is inferred, and the repetition penalty sees only new tokens (a
            UserWarning says so); with ``input_ids`` of the same (B, S), those are returned before the new tokens,
            give the inferred mask and the penalised prompt tokens. Lengths count S as the prompt's (one
            difference: with embeddings alone and no length given, transformers' 20 new tokens are capped at
            ``max_position_embeddings`` ignoring S; here at ``max_position_embeddings - S``, as for ids).
        max_new_tokens: the most new tokens per row, >= 1; n is smaller when every row stopped earlier.
        max_length: instead, the most total tokens per row, prompt included (transformers' meaning): > S, giving
            ``max_length - S`` new tokens; ``max_new_tokens`` wins when both are given. Either not given: that of
            ``model.generation_config``; neither anywhere: 20 new tokens, at most ``max_position_embeddings`` in
            all (transformers 5.17's default; see :func:`resolve_lengths`).
        min_new_tokens: EOS ids cannot be picked (their logits are -inf) until this many new tokens are produced
            (transformers' ``MinNewTokensLengthLogitsProcessor``); None: the generation config's, else 0.
        do_sample: sample (True) or take the argmax (False: greedy).
        temperature, top_k, top_p: sampling controls (temperature > 0, top_k >= 1, top_p in (0, 1]); with
            greedy decoding they are ignored, and one given (other than its default) gives a UserWarning.
        repetition_penalty: CTRL penalty over prompt (non-padding) and generated tokens; 1.0 is off.
            Each of these five left None takes ``model.generation_config``'s value, as transformers does, else
            greedy, temperature 1, no top-k / top-p, no penalty (:func:`resolve_sampling`).
        eos_token_id: ids that end a row (kept in the output): an int, or a list, tuple or 0-d/1-D integer tensor
            of ints, each in [0, vocab_size) (bool and float are refused); None takes ``model.generation_config``
            then ``model.config`` (checked the same way); ``[]`` never stops early.
        pad_token_id: written after a row's EOS: None or an int in [0, vocab_size); None takes the configs', else
            the first EOS id.
        seed: seeds a private ``torch.Generator`` for reproducible sampling (None: the global RNG).
        streamer: an object with ``put(tokens)`` and ``end()`` (transformers' ``TextStreamer`` protocol): called
            with the prompt ids (B, S) first, then each step's tokens (B,) on the CPU, then ``end()``.
        static_cache: preallocate a StaticCache (needed for ``compile``). compile: compile the decode step
            (and capture it in a CUDA graph on CUDA); the first call pays the compilation.
        num_beams: 1 only (accepted for transformers' signature): beam search is not implemented.
        return_dict_in_generate: False or None only: the result is always the tensor of token ids.

    Every check runs before the streamer is called or the model is run. The streamer's first ``put`` gets
    ``input_ids``, or an empty (B, 0) tensor for embeddings alone (as transformers).

    Raises:
        TypeError: naming the argument: ``input_ids`` not an integer tensor, a complex ``attention_mask``, a
            non-int ``max_new_tokens``/``seed``/``pad_token_id``, an ``eos_token_id`` of another type than above,
            a non-bool ``do_sample``, a non-number ``temperature``/``top_p``/``repetition_penalty``, a
            ``streamer`` without ``put``, a non-int ``max_length``/``min_new_tokens``/``num_beams``, a non-bool
            ``return_dict_in_generate``.
        NotImplementedError: ``num_beams`` > 1 or ``return_dict_in_generate=True``.
        ValueError: naming the argument: neither ``input_ids`` nor ``inputs_embeds``; bad shape of
            ``input_ids``/``inputs_embeds``/``attention_mask`` (right padding, all-padding rows, values other than 0
            and 1, a 4-D mask), ``inputs_embeds`` not of the model's dtype or not of ``input_ids``' (B, S), ids
            outside [0, vocab_size) in ``input_ids``, the EOS ids or ``pad_token_id``,
            ``max_new_tokens`` <= 0, ``max_length`` <= S, ``min_new_tokens`` < 0, ``num_beams`` < 1, no length
            given and S >= ``max_position_embeddings``, a NaN or infinite
            ``temperature``/``top_p``/``repetition_penalty``, ``temperature`` <= 0 when sampling, ``top_k`` not an int >= 1, ``top_p`` outside (0, 1],
            ``repetition_penalty`` <= 0, ``compile`` without ``static_cache``, ``compile`` with a RoPE type that
            cannot be compiled (``dynamic``: :func:`diffllama.rope.check_compile_supported`), a static cache too
            large for the memory.
    """
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise TypeError("streamer must have put(tokens) and end() methods")
    _check_unsupported(num_beams, return_dict_in_generate)
    # stream_generate checks every argument when called: before the streamer is called or the model run
    steps = stream_generate(model, input_ids, attention_mask, inputs_embeds=inputs_embeds,
                            max_new_tokens=max_new_tokens, max_length=max_length,
                            min_new_tokens=min_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, seed=seed, static_cache=static_cache, compile=compile,
                            sync_every=1 if streamer is not None else 16)
    if streamer is not None:
        b = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        streamer.put(input_ids.cpu() if input_ids is not None else torch.empty(b, 0, dtype=torch.long))
    eos, _ = resolve_special_ids(model, eos_token_id, pad_token_id)
    new = []
    for token in steps:
        new.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    out = torch.stack(new, dim=1)  # (B, n)
    if eos:  # drop trailing steps run after every row had stopped (the loop checks only every few steps)
        stopped = torch.isin(out, torch.tensor(eos, device=out.device)).cumsum(1) > 0  # (B, n)
        done = stopped.all(0)  # (n,)
        if bool(done.any()):
            out = out[:, :int(done.int().argmax()) + 1]
    if input_ids is None:  # transformers: embeddings alone give the new tokens only
        return out
    return torch.cat([input_ids.to(out.device).long(), out], dim=1)


def _check_unsupported(num_beams, return_dict_in_generate) -> None:
    """Accept transformers' ``num_beams=1`` and ``return_dict_in_generate=False``/None (what this module does);
    refuse, naming the argument, the beam search and output objects it does not implement."""
    if not is_int(num_beams):
        raise TypeError(f"num_beams must be an int, got {num_beams!r}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be 1 (beam search is not supported), got {num_beams}")
    if num_beams > 1:
        raise NotImplementedError(f"beam search is not supported: num_beams must be 1 (greedy or sampling, "
                                  f"do_sample=True), got {num_beams}")
    if return_dict_in_generate is not None and not isinstance(return_dict_in_generate, bool):
        raise TypeError(f"return_dict_in_generate must be a bool, got {return_dict_in_generate!r}")
    if return_dict_in_generate:
        raise NotImplementedError("return_dict_in_generate=True is not supported: generate returns the tensor of "
                                  "token ids (B, S + n); use return_dict_in_generate=False")


def stream_text(model, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yield the continuation of one text ``prompt`` piece by piece, as it is generated.

    ``tokenizer`` is a :class:`diffllama.tokenizer.Tokenizer`; its EOS id is the default after the model's
    (generation_config.json, then config.json). Multi-byte characters split across tokens are held back until
    complete. ``kwargs`` as :func:`stream_generate` (so not ``streamer``, ``num_beams`` or
    ``return_dict_in_generate``). A prompt
    that tokenizes to nothing starts from the tokenizer's BOS token (as transformers' ``generate()`` does without
    input); without a BOS token it raises ValueError.
    """
    tokens = tokenizer.encode(prompt)
    if not tokens:  # as transformers' generate() without input: start from BOS
        if tokenizer.bos_token_id is None:
            raise ValueError("prompt is empty (after tokenization the prompt has no tokens, and the tokenizer has no "
                             "BOS token to start from)")
        tokens = [tokenizer.bos_token_id]
    ids = torch.tensor([tokens], dtype=torch.long)
    eos, _ = resolve_special_ids(model, kwargs.get("eos_token_id"))
    if kwargs.get("eos_token_id") is None and not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    kwargs["eos_token_id"] = eos
    detok = tokenizer.detokenizer()
    eos_ids = set(eos)
    for token in stream_generate(model, ids, **kwargs):
        value = int(token[0])
        if value in eos_ids:
            break
        text = detok.add(value)
        if text:
            yield text
    rest = detok.flush()
    if rest:
        yield rest


def decode_n(step: DecodeStep, token: torch.Tensor, position_ids: torch.Tensor, first_slot: int, n: int,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy-decode ``n`` tokens after ``token`` (B, 1) with ``step``; returns (B, n) int64 (no host syncs).

    ``position_ids`` (B, 1) is the position of ``token``, written at cache slot ``first_slot``. Used by the
    benchmark to time the decode loop alone.
    """
    slots = torch.arange(first_slot, first_slot + n, device=token.device)
    out = []
    for t in range(n):
        logits = step(token, position_ids, slots[t:t + 1], attention_mask)
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
        position_ids = position_ids + 1
    return torch.cat(out, dim=1)
