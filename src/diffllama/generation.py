"""Text generation for DiffLlama: settings resolved once, a few small functions around a KV cache, a streaming loop.

The chain (the shape of pytorch-labs/gpt-fast's generate.py; written here from scratch):

- :func:`resolve_generation_settings` turns transformers-style arguments and the model's configs into one frozen
  :class:`GenerationSettings`, checking everything once (the Python API and ``diffllama generate`` share it);
- :func:`prefill` runs the prompt once, fills the cache, returns the last position's logits;
- :func:`decode_one_token` runs one new token per row against the cache; :class:`DecodeStep` wraps it, optionally
  compiled with ``torch.compile`` and, on CUDA, captured once in a CUDA graph and replayed per token (the fast path:
  a :class:`~diffllama.cache.StaticCache` keeps every address fixed); the model keeps its compiled step and cache
  for reuse as its ``decode_state`` (:class:`DecodeState`);
- :func:`next_tokens` turns logits into tokens (repetition penalty, temperature, top-k, top-p, in transformers'
  order; greedy when ``do_sample`` is False);
- :func:`stream_generate` yields each step's tokens, :func:`generate` collects them (and feeds a ``streamer``),
  :func:`stream_text` yields decoded text for one prompt.

Batches are left-padded: ``attention_mask`` (B, S) has zeros on the left. Position ids are the cumulative sum of the
mask minus one (padding at 1), as transformers' ``generate`` computes them, so greedy output equals
``transformers.DiffLlamaForCausalLM.generate`` token for token (one deliberate difference: with a repetition
penalty, transformers also penalises the pad id of a left-padded row's prompt; here only real tokens are). Each row
stops at its first EOS (kept in the output); later positions of that row hold the pad id; generation ends when every
row has stopped or after the most new tokens (by default 20, as transformers: see
:func:`resolve_generation_settings`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import is_int, token_ids
from diffllama.decode import lambda_parameters, prepare_for_decode, refresh_lambda
from diffllama.inputs import FOUR_D_MASK_MESSAGE
from diffllama.rope import check_compile_supported

# New tokens when no length is given anywhere: transformers' GenerationConfig default (max_length=20), which its
# generate counts from the end of the prompt ("by default let's always generate 20 new tokens").
DEFAULT_MAX_NEW_TOKENS = 20


# ---- settings: every generation argument resolved and checked once --------------------------------------------------

# transformers' effective defaults of the sampling settings (GenerationConfig leaves them None).
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0}
# Generation-config settings this module does not implement: a checkpoint's own value is named in a warning.
UNSUPPORTED_SETTINGS = {"no_repeat_ngram_size": 0, "num_beams": 1, "min_p": None, "typical_p": 1.0,
                        "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                        "forced_bos_token_id": None, "forced_eos_token_id": None, "length_penalty": 1.0,
                        "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "exponential_decay_length_penalty": None}
# Warnings raised while resolving point at generate's / stream_generate's caller: past the helper, the resolver,
# _start, its inference_mode wrapper and the public function.
_CALLER = 6


@dataclass(frozen=True)
class GenerationSettings:
    """Every generation setting, resolved and checked: what one call of :func:`generate` / :func:`stream_generate`
    (or one ``diffllama generate`` run) does. Build it with :func:`resolve_generation_settings`.

    Attributes:
        max_new_tokens: the most new tokens per row (>= 1). min_new_tokens: EOS is suppressed until this many (>= 0).
        do_sample: sample (True) or argmax (False). temperature (> 0 when sampling), top_k (None or >= 1), top_p
            (None or in (0, 1]), repetition_penalty (> 0, 1.0 = off): Python floats/ints, as in transformers.
        eos_token_id: ids that end a row; () never stops early. pad_token_id: the configured pad id in
            [0, vocab_size), None where nothing sets one (then no attention mask is inferred).
        seed: None (global RNG) or an int in [0, 2**64). static_cache, compile: the fast decode path's switches.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None
    static_cache: bool = False
    compile: bool = False

    @property
    def fill_token_id(self) -> int:
        """The id written after a row's EOS (and in padding): the pad id, else the first EOS id, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0

    def sampling(self) -> dict:
        """The keyword arguments of :func:`next_tokens`."""
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty)


def resolve_generation_settings(config, generation_config=None, *, prompt_length: int | None = None,
                                names: Mapping[str, str] | None = None, max_new_tokens=None, max_length=None,
                                min_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None,
                                repetition_penalty=None, eos_token_id=None, pad_token_id=None, seed=None,
                                static_cache: bool = False, compile: bool = False) -> GenerationSettings:
    """The one place generation arguments are resolved and checked: each argument when not None, else
    ``generation_config``'s (a checkpoint's generation_config.json as a dict, or a transformers
    ``GenerationConfig``), else ``config``'s (EOS/pad ids), else transformers 5.17's default. The Python API
    (:func:`generate`, :func:`stream_generate`, :func:`stream_text`) and ``diffllama generate`` both call it.

    - Sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty`` default to greedy,
      1, no top-k / top-p, no penalty; a config's ``top_k`` 0 and ``top_p`` 1 mean off. Integers and reals may be
      any ``numbers.Integral``/``numbers.Real`` (numpy's too), returned as Python numbers; bool is refused; reals
      must be finite even when greedy. Greedy with non-default temperature/top-k/top-p arguments warns (as
      transformers' ``GenerationConfig.validate``); settings of :data:`UNSUPPORTED_SETTINGS` in the generation
      config warn too.
    - Lengths (as transformers' generate): ``max_new_tokens`` wins; else ``max_length`` (prompt included, so
      ``max_length - prompt_length`` new tokens, > 0); else 20 new tokens, at most ``max_position_embeddings`` in
      all. ``min_new_tokens`` (else 0) above the most warns. ``prompt_length`` S is needed unless
      ``max_new_tokens`` is set.
    - Special ids: ``eos_token_id`` None, an int, or a list, tuple or 0-d/1-D integer tensor of ints, each in
      [0, vocab_size); ``[]`` never stops. ``pad_token_id`` None or an int in [0, vocab_size); a config's pad
      outside it (e.g. -1, "no pad") counts as unset.
    - ``seed`` None or an int in [0, 2**64); ``compile`` needs ``static_cache`` and a compilable RoPE type
      (:func:`diffllama.rope.check_compile_supported`).

    ``names`` maps an argument name to the name its errors show (the CLI passes ``{"top_p": "--top-p", ...}``);
    values taken from a config are named with their source, e.g. ``"max_length (from model.generation_config)"``.

    Raises:
        TypeError or ValueError: naming the argument (or its source), the bad value and what is expected.
    """
    gen = _as_dict(generation_config)
    show = _namer(names)
    sampling = _resolve_sampling(gen, show, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty)
    most, fewest = _resolve_lengths(config, gen, show, prompt_length, max_new_tokens, max_length, min_new_tokens)
    eos, pad = _resolve_special_ids(config, gen, show, eos_token_id, pad_token_id)
    if seed is not None and not is_int(seed):
        raise TypeError(f"{show('seed')} must be None or an int, got {seed!r}")
    if seed is not None and not 0 <= seed < 2 ** 64:  # torch.Generator.manual_seed's range, as train's seed
        raise ValueError(f"{show('seed')} must be an integer in [0, 2**64 - 1], got {seed}")
    if compile and not static_cache:
        raise ValueError(f"{show('compile')}=True needs {show('static_cache')}=True (the compiled step must see "
                         f"fixed shapes)")
    if compile:
        check_compile_supported(config)
    return GenerationSettings(max_new_tokens=most, min_new_tokens=fewest, **sampling, eos_token_id=tuple(eos),
                              pad_token_id=pad, seed=None if seed is None else int(seed),
                              static_cache=bool(static_cache), compile=bool(compile))


def _namer(names: Mapping[str, str] | None):
    """name -> the name errors show for that argument."""
    names = names or {}
    return lambda name: names.get(name, name)


def _as_dict(generation_config) -> dict:
    """A generation config as a dict ({} for None); a transformers ``GenerationConfig`` works too."""
    gen = generation_config or {}
    if not isinstance(gen, dict):
        gen = gen.to_dict() if hasattr(gen, "to_dict") else vars(gen)
    return gen


def _check_count(value, name: str, minimum: int) -> int:
    """``value`` as a Python int, checked to be an integer (not a bool) >= ``minimum``; errors name ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _resolve_sampling(gen: dict, show, **given) -> dict:
    """The five sampling settings: arguments, else ``gen``'s, else :data:`SAMPLING_DEFAULTS`; checked."""
    out = {}
    for name, default in SAMPLING_DEFAULTS.items():
        value = given[name]
        if value is None:
            value = gen.get(name)
            if (name, value) in (("top_k", 0), ("top_p", 1.0)):
                value = None
        out[name] = default if value is None else value
    ignored = [f"{k}={gen[k]!r}" for k, off in UNSUPPORTED_SETTINGS.items() if gen.get(k) not in (None, off)]
    if ignored:
        warnings.warn(f"model.generation_config sets {', '.join(ignored)}, which diffllama's generate does not "
                      f"implement: ignored", UserWarning, stacklevel=_CALLER)
    out = _check_sampling(show, **out)
    passed = [f"{name}={given[name]!r}" for name, default in (("temperature", 1.0), ("top_k", None), ("top_p", None))
              if given[name] is not None and given[name] != default]
    if not out["do_sample"] and passed:  # the caller likely meant to sample: say these do nothing
        warnings.warn(f"{show('do_sample')}=False (greedy decoding) ignores {', '.join(passed)}: these settings only "
                      f"apply to sampling; pass do_sample=True to use them, or leave them out", UserWarning,
                      stacklevel=_CALLER)
    return out


def _check_sampling(show, *, do_sample, temperature, top_k, top_p, repetition_penalty) -> dict:
    """The sampling settings checked, as Python ``bool``/``int``/``float`` (None kept); errors name ``show(name)``."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"{show('do_sample')} must be a bool, got {do_sample!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if value is None and name == "top_p":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{show(name)} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{show(name)} must be a finite number, got {value!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"{show('temperature')} must be > 0 when sampling (do_sample=True), got {temperature}; "
                         f"use do_sample=False for greedy decoding")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"{show('top_k')} must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{show('top_p')} must be None or in (0, 1], got {top_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"{show('repetition_penalty')} must be > 0 (1.0 = off), got {repetition_penalty!r}")
    return dict(do_sample=do_sample, temperature=float(temperature), top_k=None if top_k is None else int(top_k),
                top_p=None if top_p is None else float(top_p), repetition_penalty=float(repetition_penalty))


def _resolve_lengths(config, gen: dict, show, prompt_length, max_new_tokens, max_length,
                     min_new_tokens) -> tuple[int, int]:
    """``(most, fewest)`` new tokens per row, as transformers 5.17's generate derives them (see
    :func:`resolve_generation_settings`)."""

    def pick(name, given):  # (value, name for errors)
        if given is not None:
            return given, show(name)
        return gen.get(name), f"{name} (from model.generation_config)"

    new, new_name = pick("max_new_tokens", max_new_tokens)
    total, total_name = pick("max_length", max_length)
    fewest, fewest_name = pick("min_new_tokens", min_new_tokens)
    if total is not None:
        _check_count(total, total_name, 1)  # the type, even when max_new_tokens makes it unused
    if new is not None:
        most = _check_count(new, new_name, 1)
    elif prompt_length is None:
        raise ValueError("prompt_length is needed to resolve the length unless max_new_tokens is given")
    elif total is not None:
        most = _check_count(total, total_name, 1) - prompt_length
        if most <= 0:
            raise ValueError(f"{total_name} must be greater than the prompt length (input_ids has {prompt_length} "
                             f"tokens; max_length counts the prompt too, as in transformers), got {total}; or pass "
                             f"max_new_tokens")
    else:
        limit = config.max_position_embeddings
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
                      stacklevel=_CALLER)
    return most, fewest


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


def _resolve_special_ids(config, gen: dict, show, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """EOS ids and the configured pad id (None where unset): arguments, else ``gen``'s, else ``config``'s."""
    vocab = config.vocab_size

    def first(name, given):  # (value, name for errors)
        if given is not None:
            return given, show(name)
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
            raise ValueError(f"{show('pad_token_id')} must lie in [0, vocab_size={vocab}) (it follows a row's EOS "
                             f"and is fed to the model), got {pad_token_id!r}")
        pad = None  # a config's -1 ("no pad"): as when unset
    return eos, None if pad is None else int(pad)


def with_tokenizer_eos(model, tokenizer) -> dict:
    """``model.generation_config`` as a dict, with the tokenizer's EOS id when neither it nor ``model.config`` sets
    one (the defaults :func:`stream_text` and ``diffllama generate`` resolve against)."""
    gen = _as_dict(getattr(model, "generation_config", None))
    configured = gen.get("eos_token_id")
    if configured is None:
        configured = getattr(model.config, "eos_token_id", None)
    if (configured is None or isinstance(configured, (list, tuple)) and not configured) \
            and tokenizer.eos_token_id is not None:
        gen = {**gen, "eos_token_id": tokenizer.eos_token_id}
    return gen


def infer_attention_mask(input_ids: torch.Tensor, pad_token_id: int | None, eos: Sequence[int]
                         ) -> torch.Tensor | None:
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


def prepare_inputs_for_generation(input_ids: torch.Tensor | None = None, past_key_values=None,
                                  attention_mask: torch.Tensor | None = None,
                                  inputs_embeds: torch.Tensor | None = None, use_cache: bool = True,
                                  **kwargs) -> dict:
    """The keyword arguments of the next forward call in a generation loop, as transformers'
    ``GenerationMixin.prepare_inputs_for_generation`` gives them: only the tokens the cache does not hold yet,
    position ids from the attention mask (left padding counts from each row's first real token), and
    ``inputs_embeds`` instead of ids on the first step when given. PEFT (``task_type="CAUSAL_LM"``) reads this
    hook from the model; :func:`generate` does not use it.

    Args:
        input_ids: (B, S) int64, every token so far. past_key_values: a diffllama cache, or None.
        attention_mask: (B, S) 0/1 over the same tokens, or None. inputs_embeds: (B, S, D) for the first step.
        kwargs: other forward arguments, passed on (None values dropped).

    Returns:
        A dict for ``model(**inputs)``: ``input_ids`` (B, S_new) or ``inputs_embeds``, ``attention_mask``,
        ``position_ids`` (B, S_new) int64, ``past_key_values``, ``use_cache``.
    """
    cached = past_key_values.get_seq_length() if past_key_values is not None else 0
    inputs = {k: v for k, v in kwargs.items() if v is not None}
    inputs.update(past_key_values=past_key_values, use_cache=use_cache, attention_mask=attention_mask)
    if inputs_embeds is not None and cached == 0:
        inputs["inputs_embeds"] = inputs_embeds
        length = inputs_embeds.shape[1]
    else:
        inputs["input_ids"] = input_ids[:, cached:]
        length = inputs["input_ids"].shape[1]
    if attention_mask is not None:
        inputs["position_ids"] = position_ids_from_mask(attention_mask)[:, -length:]
    return inputs


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


# ---- the fast path's reusable state ---------------------------------------------------------------------------------

_STATIC_ROUND = 256  # static caches are rounded up to a multiple of this: one compiled step serves many lengths


class DecodeState:
    """The compiled fast path of one model, kept for reuse: a StaticCache of shape ``key`` = (batch, max_length,
    dtype, device) and the compiled :class:`DecodeStep` over it.

    It lives on the model, as its ``decode_state`` attribute (set by :func:`cache_and_step`; absent until the first
    ``compile=True`` call), not in a module global: repeated ``generate(compile=True)`` calls of one shape neither
    reallocate the cache nor recompile, and the state is freed with the model. A copy of the model
    (``copy.deepcopy``, pickling) starts without one, since the step and its CUDA graph hold the original's
    tensors.
    """

    def __init__(self, key: tuple, cache: StaticCache, step: DecodeStep) -> None:
        self.key, self.cache, self.step = key, cache, step

    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return type(None), ()


def cache_and_step(model, batch: int, total: int, settings: GenerationSettings):
    """``(cache, step, cache_length)`` for ``batch`` rows of up to ``total`` tokens: a DynamicCache, or a StaticCache
    of ``total`` slots, with an eager :class:`DecodeStep`; with ``settings.compile``, the model's
    :class:`DecodeState` (rebuilt when the shape, dtype or device changed, the old one freed first)."""
    if not settings.compile:
        cache = DynamicCache() if not settings.static_cache else StaticCache.from_config(
            model.config, batch, total, model.dtype, model.device)
        return cache, DecodeStep(model, cache), total
    max_length = -(-total // _STATIC_ROUND) * _STATIC_ROUND
    key = (batch, max_length, model.dtype, model.device)
    state = getattr(model, "decode_state", None)
    if state is None or state.key != key:
        model.decode_state = None  # free the old cache and graph before allocating the new ones
        cache = StaticCache.from_config(model.config, batch, max_length, model.dtype, model.device)
        model.decode_state = state = DecodeState(key, cache, DecodeStep(model, cache, compile=True))
    return state.cache, state.step, max_length


# ---- generation loop ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def _start(model, input_ids, attention_mask, inputs_embeds, settings, arguments: dict, sync_every,
           defaults=None) -> tuple[GenerationSettings, Iterator[torch.Tensor]]:
    """Check the prompt, resolve the settings (unless given; against ``defaults``, else
    ``model.generation_config``), allocate the cache: ``(settings, the iterator of each step's tokens)``. Nothing
    runs the model before the iterator is advanced."""
    device = model.device
    input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
    inputs_embeds = inputs_embeds.to(device) if isinstance(inputs_embeds, torch.Tensor) else inputs_embeds
    prompt = dict(vocab_size=model.config.vocab_size, inputs_embeds=inputs_embeds, dtype=model.dtype,
                  hidden_size=model.config.hidden_size)
    mask = _check_inputs(input_ids, attention_mask, **prompt)
    b, s = mask.shape
    if settings is None:
        defaults = getattr(model, "generation_config", None) if defaults is None else defaults
        settings = resolve_generation_settings(model.config, defaults, prompt_length=s, **arguments)
    elif not isinstance(settings, GenerationSettings) or arguments:
        raise TypeError(f"settings must be a GenerationSettings, passed without generation arguments; got "
                        f"{type(settings).__name__} and {sorted(arguments)}")
    if attention_mask is None and input_ids is not None:  # embeddings alone say nothing of padding
        inferred = infer_attention_mask(input_ids, settings.pad_token_id, settings.eos_token_id)
        if inferred is not None:
            mask = _check_inputs(input_ids, inferred, inferred_from=settings.pad_token_id, **prompt)
    if input_ids is None and settings.repetition_penalty != 1.0:
        warnings.warn("repetition_penalty with inputs_embeds and without input_ids penalises only the new tokens, "
                      "not the prompt (as transformers)", UserWarning, stacklevel=4)  # past inference_mode
    if not is_int(sync_every) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    generator = None if settings.seed is None else torch.Generator(device=device).manual_seed(settings.seed)
    refresh_lambda(model)  # λ written through .data since the last call bumps no version counter
    cache, step, cache_length = cache_and_step(model, b, s + settings.max_new_tokens, settings)
    steps = _steps(model, None if input_ids is None else input_ids.long(), inputs_embeds, mask, settings, cache, step,
                   cache_length, generator, int(sync_every))
    return settings, steps


def _attention_masks(mask: torch.Tensor, max_new_tokens: int, cache_length: int, static_cache: bool):
    """The prefill's mask and a function of the step t giving that step's, from the (B, S) prompt mask: None
    without padding; with a static cache one (B, cache_length) mask over every slot (real prompt tokens, then all
    new tokens); with a dynamic one the slots written so far."""
    b, s = mask.shape
    if not bool((mask == 0).any()):
        return None, lambda t: None
    if static_cache:
        full = torch.ones(b, cache_length, dtype=torch.long, device=mask.device)
        full[:, :s] = mask
        return full, lambda t: full
    full = torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
    return mask, lambda t: full[:, :s + t + 1]


def _seen_tokens(vocab_size: int, input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: the prompt's real (non-padding) tokens, for the repetition penalty; none for embeddings alone."""
    counts = torch.zeros(mask.shape[0], vocab_size, dtype=torch.long, device=mask.device)
    if input_ids is not None:
        counts.scatter_add_(1, input_ids, mask)
    return counts > 0


@torch.inference_mode()
def _steps(model, input_ids, inputs_embeds, mask, settings: GenerationSettings, cache, step, cache_length,
           generator, sync_every) -> Iterator[torch.Tensor]:
    """Prefill, then pick a token and run one decode step per new token, until every row stopped (see
    :func:`stream_generate`)."""
    b, s = mask.shape
    n = settings.max_new_tokens
    positions = position_ids_from_mask(mask)
    prompt_mask, step_mask = _attention_masks(mask, n, cache_length, settings.static_cache)
    logits = prefill(model, input_ids, prompt_mask, positions, cache, inputs_embeds)
    seen = _seen_tokens(model.config.vocab_size, input_ids, mask) if settings.repetition_penalty != 1.0 else None
    eos = torch.tensor(settings.eos_token_id, dtype=torch.long, device=mask.device) if settings.eos_token_id else None
    finished = torch.zeros(b, dtype=torch.bool, device=mask.device)
    next_position = positions[:, -1:] + 1  # (B, 1)
    slots = torch.arange(s, s + n, device=mask.device)
    for t in range(n):
        if t < settings.min_new_tokens and eos is not None:
            # transformers' MinNewTokensLengthLogitsProcessor. Out of place: a CUDA-graphed step's logits live in
            # its static output buffer.
            logits = logits.index_fill(1, eos, float("-inf"))
        token = next_tokens(logits, **settings.sampling(), seen=seen, generator=generator)
        if eos is not None:
            token = torch.where(finished, settings.fill_token_id, token)
            finished = finished | torch.isin(token, eos)
        yield token
        if t == n - 1 or eos is not None and (t + 1) % sync_every == 0 and bool(finished.all()):
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = step(token[:, None], next_position, slots[t:t + 1], step_mask(t))
        next_position = next_position + 1
    if isinstance(cache, StaticCache):
        cache.set_seq_length(s + n)


def stream_generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                    inputs_embeds: torch.Tensor | None = None, settings: GenerationSettings | None = None,
                    sync_every: int = 1, **arguments) -> Iterator[torch.Tensor]:
    """Return an iterator that yields the new tokens of each step, (B,) int64 on the model's device, until every row
    stopped.

    Arguments as :func:`generate`. ``sync_every``: how often (in steps) the loop reads back whether every row has
    stopped (each read waits for the GPU); with no EOS ids it never reads back. Every argument is checked, and the
    cache allocated, when this is called, before the iterator runs the model.

    Raises:
        ValueError/TypeError: see :func:`generate`; ``sync_every`` not an int >= 1.
    """
    return _start(model, input_ids, attention_mask, inputs_embeds, settings, arguments, sync_every)[1]


def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             inputs_embeds: torch.Tensor | None = None, settings: GenerationSettings | None = None, streamer=None,
             num_beams: int = 1, return_dict_in_generate: bool | None = False, **arguments) -> torch.Tensor:
    """Continue left-padded prompts; returns the prompts plus new tokens, (B, S + n) int64, n <= the most new
    tokens; for a prompt given as ``inputs_embeds`` alone, the new tokens only (B, n). Greedy output equals
    transformers' ``DiffLlamaForCausalLM.generate`` token for token (see the module docstring).

    Args:
        model: a DiffLlamaForCausalLM (any device and dtype; put it in eval mode).
        input_ids: (B, S) integer token ids, left-padded. attention_mask: (B, S) 0/1, left-padded (a 4-D mask is
            refused). None: as transformers, ``input_ids != pad_token_id`` when a pad id is set, is not an EOS id
            and occurs in ``input_ids`` (:func:`infer_attention_mask`), else no padding.
        inputs_embeds: (B, S, hidden_size) in the model's dtype (soft prompts): read instead of embedding
            ``input_ids``. As transformers 5.17: alone, the result holds only the new tokens, no mask is inferred,
            and the repetition penalty sees only new tokens (a UserWarning says so); with ``input_ids`` of the same
            (B, S), those are returned first, give the inferred mask and the penalised prompt tokens.
        arguments: transformers' generation arguments ``max_new_tokens``, ``max_length``, ``min_new_tokens``,
            ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``,
            ``pad_token_id``, plus ``seed`` (a private ``torch.Generator``), ``static_cache`` and ``compile`` (the
            compiled, on CUDA also CUDA-graphed, decode step; the first call pays the compilation, later ones of the
            same shape reuse it: :class:`DecodeState`). Each left None takes ``model.generation_config``'s, then
            ``model.config``'s, then transformers' default: :func:`resolve_generation_settings` says how.
        settings: instead of ``arguments``, settings resolved already (as ``diffllama generate`` does).
        streamer: an object with ``put(tokens)`` and ``end()`` (transformers' ``TextStreamer`` protocol): called
            with the prompt ids (B, S) (an empty (B, 0) tensor for embeddings alone), then each step's tokens (B,)
            on the CPU, then ``end()``.
        num_beams: 1 only; return_dict_in_generate: False or None only (transformers' signature).

    Every check runs before the streamer is called or the model is run.

    Raises:
        TypeError / ValueError: naming the argument: a bad prompt (type, shape, ids outside [0, vocab_size), a mask
            not 0/1 or not left-padded, all-padding rows, embeddings of another dtype), a ``streamer`` without
            ``put``/``end``, any bad generation argument (see :func:`resolve_generation_settings`).
        NotImplementedError: ``num_beams`` > 1 or ``return_dict_in_generate=True``.
    """
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise TypeError("streamer must have put(tokens) and end() methods")
    _check_unsupported(num_beams, return_dict_in_generate)
    settings, steps = _start(model, input_ids, attention_mask, inputs_embeds, settings, arguments,
                             1 if streamer is not None else 16)
    if streamer is not None:
        b = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        streamer.put(input_ids.cpu() if input_ids is not None else torch.empty(b, 0, dtype=torch.long))
    new = []
    for token in steps:
        new.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    out = _drop_steps_after_stop(torch.stack(new, dim=1), settings.eos_token_id)  # (B, n)
    if input_ids is None:  # transformers: embeddings alone give the new tokens only
        return out
    return torch.cat([input_ids.to(out.device).long(), out], dim=1)


def _drop_steps_after_stop(out: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """(B, n) new tokens without the trailing steps run after every row had stopped (the loop reads back only every
    few steps)."""
    if not eos:
        return out
    stopped = torch.isin(out, torch.tensor(eos, device=out.device)).cumsum(1) > 0  # (B, n)
    done = stopped.all(0)  # (n,)
    return out[:, :int(done.int().argmax()) + 1] if bool(done.any()) else out


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


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """``prompt`` encoded by ``tokenizer``; a prompt that encodes to nothing starts from the BOS token, as
    transformers' ``generate()`` does without input.

    Raises:
        ValueError: the prompt encodes to nothing and the tokenizer has no BOS token.
    """
    tokens = tokenizer.encode(prompt)
    if tokens:
        return tokens
    if tokenizer.bos_token_id is None:
        raise ValueError("prompt is empty (after tokenization the prompt has no tokens, and the tokenizer has no "
                         "BOS token to start from)")
    return [tokenizer.bos_token_id]


def stream_text(model, tokenizer, prompt: str | Sequence[int], *, settings: GenerationSettings | None = None,
                sync_every: int = 1, **arguments) -> Iterator[str]:
    """Yield the continuation of one ``prompt`` piece by piece, as it is generated, up to its first EOS.

    ``tokenizer`` is a :class:`diffllama.tokenizer.Tokenizer`; ``prompt`` its text (encoded by
    :func:`prompt_tokens`: an empty one starts from BOS) or its token ids, encoded already. ``arguments`` or
    ``settings`` as :func:`generate` (not ``streamer``, ``num_beams`` or ``return_dict_in_generate``); the
    tokenizer's EOS id is the default after the model's (:func:`with_tokenizer_eos`). Multi-byte characters split
    across tokens are held back until complete.

    Raises:
        ValueError: an empty text prompt without a BOS token; and as :func:`generate`.
    """
    tokens = prompt_tokens(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    settings, steps = _start(model, torch.tensor([tokens], dtype=torch.long), None, None, settings, arguments,
                             sync_every, defaults=with_tokenizer_eos(model, tokenizer))
    detok = tokenizer.detokenizer()
    for token in steps:
        value = int(token[0])
        if value in settings.eos_token_id:
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


class GenerationMixin:
    """transformers' generation methods on :class:`~diffllama.modeling.DiffLlamaForCausalLM`: ``generate`` and the
    ``prepare_inputs_for_generation`` hook (PEFT's ``task_type="CAUSAL_LM"`` wrapper needs it)."""

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Continue left-padded prompts (B, S) -> (B, S + n) int64, or (B, n) for ``inputs_embeds`` alone; see
        :func:`generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor | None = None, **kwargs) -> dict:
        """The next forward call's keyword arguments; see :func:`prepare_inputs_for_generation`."""
        return prepare_inputs_for_generation(input_ids, **kwargs)
