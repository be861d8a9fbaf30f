"""DiffLlamaConfig: the model's hyper-parameters, read and written as transformers' ``config.json``.

Fields, names and defaults are those of transformers' ``DiffLlamaConfig`` (5.x). RoPE settings live in
``rope_parameters`` (a dict holding ``rope_type``, ``rope_theta`` and the type's own keys); the legacy pair
``rope_theta`` + ``rope_scaling`` is accepted on input and folded into it, so checkpoints of either age load.
Keys this class does not model (``transformers_version``, ``architectures`` and so on) are kept in ``extra`` and
written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from diffllama.hub import resolve_checkpoint_dir
from diffllama.io import atomic_write_text, new_folder, read_json_object

MODEL_TYPE = "diffllama"  # DiffLlama V1, transformers' DiffLlama (the default)
# The architectures, by the CLI spelling (``--arch``) -> config.json's model_type (DESIGN.md §2). V2 has no
# transformers class: its own model_type makes transformers refuse such a checkpoint by name.
ARCHITECTURES = {"diffllama": MODEL_TYPE, "diffllama-v2": "diffllama_v2", "llama": "llama"}
MODEL_TYPES = tuple(ARCHITECTURES.values())
# Keys only DiffLlama V1's config.json holds (transformers' DiffLlamaConfig): left out of the other two.
DIFFLLAMA_ONLY_KEYS = ("lambda_std_dev",)
# transformers' LlamaConfig defaults where they differ from DiffLlamaConfig's, for a llama config.json that leaves
# keys out (transformers writes them all, hand-written files may not), and the two Llama keys DiffLlama lacks.
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "rms_norm_eps": 1e-6}
LLAMA_ONLY_KEYS = {"mlp_bias": False, "pretraining_tp": 1}
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh", "sigmoid", "gelu_accurate",
               "gelu_fast", "quick_gelu", "relu2", "relu6", "leaky_relu", "mish", "hardswish", "linear")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash", "auto")
# Keys each RoPE type requires, beyond rope_type and rope_theta (transformers' modeling_rope_utils).
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (),  # factor may be derived from max_position_embeddings / original_max_position_embeddings
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
DEFAULT_ROPE_THETA = 10000.0


@dataclass
class DiffLlamaConfig:
    """Hyper-parameters of a DiffLlama model, field for field those of transformers' ``DiffLlamaConfig``.

    ``model_type`` selects the architecture (DESIGN.md §2): ``"diffllama"`` (V1, the default), ``"diffllama_v2"``
    (Differential Transformer V2) or ``"llama"`` (transformers' ``LlamaConfig`` keys: config.json leaves out
    ``lambda_std_dev`` and adds ``mlp_bias: false`` and ``pretraining_tp: 1``; the constructor's defaults stay
    DiffLlama's, :meth:`from_dict` fills a llama file's missing keys with Llama's). Head counts: V1 needs an even
    ``num_attention_heads`` (heads pair up), V2 a ``2 * num_attention_heads`` (its query heads) that
    ``num_key_value_heads`` divides, Llama an ``num_attention_heads`` that it divides.

    Derived fields: ``num_key_value_heads`` defaults to ``num_attention_heads``; ``head_dim`` defaults to
    ``hidden_size // num_attention_heads``; ``rope_parameters`` is filled from ``rope_theta``/``rope_scaling`` when
    given the legacy way. ``attn_implementation`` is one of ``"eager"``, ``"sdpa"``, ``"flash"``, ``"auto"`` and is
    not written to config.json (as in transformers).

    As in transformers, the constructor also takes ``num_labels=n``: labels ``LABEL_0`` .. ``LABEL_{n-1}`` when
    ``id2label`` is not given (see :func:`label_maps`); the :attr:`num_labels` property reads the count back.

    Raises:
        ValueError: naming the field, for an odd or zero ``num_attention_heads`` (heads are used in pairs),
            ``num_attention_heads`` not a multiple of ``num_key_value_heads``, ``hidden_size`` not divisible by
            ``num_attention_heads`` when ``head_dim`` is unset, a non-positive size, an unknown ``hidden_act``, an
            unknown RoPE type or missing RoPE keys, an unknown ``attn_implementation``, a wrong ``model_type``, a
            ``bos_token_id`` or ``eos_token_id`` outside [0, vocab_size), a bad ``num_labels``; a non-number (a
            string, say) or an out-of-range value for ``rms_norm_eps``, ``rope_theta`` (a finite number > 0),
            the RoPE ``factor``, ``attention_dropout``/``classifier_dropout`` (in [0, 1)), ``initializer_range`` or
            ``lambda_std_dev``.
    """

    model_type: ClassVar[str] = MODEL_TYPE  # read by PEFT and transformers' tools, as on transformers' configs

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    lambda_std_dev: float = 0.1
    head_dim: int | None = None
    # Task heads (transformers' PreTrainedConfig keys).
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    # Legacy RoPE keys: folded into rope_parameters by __post_init__.
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    attn_implementation: str = "sdpa"
    model_type: str = MODEL_TYPE
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"config model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._check_heads()
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not set")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in ("initializer_range", "lambda_std_dev"):  # standard deviations of the initial weights
            _check_number(name, getattr(self, name), lambda v: v >= 0, "a finite number >= 0 (a standard deviation)")
        pad = self.pad_token_id
        if pad is not None and (not is_int(pad) or not -self.vocab_size <= pad < self.vocab_size):
            raise ValueError(f"pad_token_id must be None or a token id below vocab_size={self.vocab_size} (a "
                             f"negative id counts from the end, down to -vocab_size), got {pad!r}")
        # generate() would refuse such an EOS id only once the model is loaded; refuse it (and a BOS id the
        # embedding cannot hold) with the config. Type errors too are ValueErrors here, as for every field.
        try:
            token_ids(self.bos_token_id, self.vocab_size, "bos_token_id", many=False)
            token_ids(self.eos_token_id, self.vocab_size, "eos_token_id")
        except TypeError as error:
            raise ValueError(str(error)) from None
        for name in ("tie_word_embeddings", "attention_bias", "use_cache"):  # "false" would act as True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (a bool), got {getattr(self, name)!r}")
        for name in ("rope_parameters", "rope_scaling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be None or a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                                 f"got {value!r}")
        _check_number("rms_norm_eps", self.rms_norm_eps, lambda v: v > 0, "a finite number > 0")
        _check_number("attention_dropout", self.attention_dropout, lambda v: 0 <= v < 1, "a number in [0, 1)")
        if self.classifier_dropout is not None:
            _check_number("classifier_dropout", self.classifier_dropout, lambda v: 0 <= v < 1,
                          "None or a number in [0, 1)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        self.rope_parameters = self._resolve_rope()
        self.rope_theta, self.rope_scaling = self.rope_parameters["rope_theta"], None
        if self.label2id is not None and not isinstance(self.label2id, dict):
            raise ValueError(f"label2id must be a dict of label names to ids, got {self.label2id!r}")
        if self.id2label is None and self.label2id is not None:  # label2id alone names the labels too
            self.id2label = {v: k for k, v in self.label2id.items()}
        if self.id2label is not None:
            self.id2label = _label_map(self.id2label)
            inverse = {v: k for k, v in self.id2label.items()}
            if self.label2id is not None and _label_map({v: k for k, v in self.label2id.items()}) != self.id2label:
                raise ValueError(f"label2id must be the inverse of id2label {self.id2label}, got {self.label2id!r}")
            self.label2id = inverse  # ids as ints, whichever form config.json held them in
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ValueError(
                "problem_type must be None, 'regression', 'single_label_classification' or "
                f"'multi_label_classification', got {self.problem_type!r}")

    def _check_heads(self) -> None:
        """The head counts each architecture can pair and group (DESIGN.md §2)."""
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if self.model_type == MODEL_TYPE and heads % 2:
            raise ValueError(f"num_attention_heads must be even (differential attention uses heads in pairs), "
                             f"got {heads}")
        if self.model_type == "diffllama_v2":  # 2h query heads share the KV heads
            if 2 * heads % kv_heads:
                raise ValueError(f"2 * num_attention_heads ({2 * heads}, the query heads of diffllama_v2) must be a "
                                 f"multiple of num_key_value_heads ({kv_heads})")
        elif heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        if self.extra.get("mlp_bias", False) is not False:  # transformers' Llama option; no model here has it
            raise ValueError(f"mlp_bias must be false (MLP biases are not supported), got "
                             f"{self.extra['mlp_bias']!r}")

    def _resolve_rope(self) -> dict:
        # transformers' precedence: a legacy rope_scaling given beside rope_parameters replaces it.
        params = dict(self.rope_scaling or self.rope_parameters or {})
        if "type" in params and "rope_type" not in params:  # the oldest spelling
            params["rope_type"] = params["type"]
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else DEFAULT_ROPE_THETA)
        rope_type = params["rope_type"]
        if rope_type not in ROPE_REQUIRED_KEYS:
            raise ValueError(
                f"rope_parameters['rope_type'] must be one of {tuple(ROPE_REQUIRED_KEYS)}, got {rope_type!r}")
        if "partial_rotary_factor" in self.extra:  # a top-level key, which transformers moves into the dict
            params.setdefault("partial_rotary_factor", self.extra["partial_rotary_factor"])
        if rope_type in ("llama3", "yarn", "longrope"):
            # As transformers: a top-level original_max_position_embeddings (Phi-3 style configs) wins over the
            # dict's own; without either, the pretraining length is max_position_embeddings.
            if "original_max_position_embeddings" in self.extra:
                params["original_max_position_embeddings"] = self.extra["original_max_position_embeddings"]
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            _check_number("original_max_position_embeddings", params["original_max_position_embeddings"],
                          lambda v: v >= 1, "a number >= 1 (the pretraining context length)")
        if "partial_rotary_factor" in params:
            _check_number("rope_parameters['partial_rotary_factor']", params["partial_rotary_factor"],
                          lambda v: 0 < v <= 1 and int(self.head_dim * v) % 2 == 0 and self.head_dim * v >= 2,
                          f"a number in (0, 1] giving an even number >= 2 of rotated dims of head_dim="
                          f"{self.head_dim}")
        missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if k not in params]
        if missing:
            raise ValueError(f"rope_parameters of type {rope_type!r} is missing required key(s) {missing}")
        for key, holds, expected in _ROPE_NUMBERS:
            if params.get(key) is not None:
                _check_number(f"rope_parameters['{key}']", params[key], holds, expected)
        if rope_type == "llama3" and not params["high_freq_factor"] > params["low_freq_factor"]:
            raise ValueError(f"rope_parameters['high_freq_factor'] must be > low_freq_factor "
                             f"({params['low_freq_factor']}), got {params['high_freq_factor']}")
        if rope_type == "dynamic" and self.head_dim < 4:  # the NTK exponent dim / (dim - 2) needs dim > 2
            raise ValueError(f"dynamic RoPE needs head_dim >= 4, got {self.head_dim}")
        if params.get("truncate") is not None and not isinstance(params["truncate"], bool):
            raise ValueError(f"rope_parameters['truncate'] must be a bool, got {params['truncate']!r}")
        _check_number("rope_parameters['rope_theta']", params["rope_theta"], lambda v: v > 0, "a finite number > 0")
        if params.get("factor") is not None:
            low = 0 if rope_type == "longrope" else 1
            _check_number("rope_parameters['factor']", params["factor"], lambda v: v >= low,
                          f"a finite number >= {low} for {rope_type!r}")
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                value = params[key]
                if not isinstance(value, (list, tuple)) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                        for v in value):
                    raise ValueError(f"rope_parameters['{key}'] must be a list of finite numbers > 0, got {value!r}")
                if len(params[key]) != self.head_dim // 2:
                    raise ValueError(
                        f"rope_parameters['{key}'] must have head_dim // 2 = {self.head_dim // 2} entries, "
                        f"got {len(params[key])}")
        return params

    @property
    def num_labels(self) -> int:
        """Number of output labels of the task heads (``len(id2label)``, 2 when unset, as in transformers)."""
        return len(self.id2label) if self.id2label is not None else 2

    # ---- dict / JSON round trip -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> DiffLlamaConfig:
        """Build a config from a transformers-style ``config.json`` dict; unknown keys go to ``extra``.

        ``overrides`` replace entries of ``data``; they must be field names (or ``num_labels``, as in
        transformers), since a misspelt keyword would otherwise land silently in ``extra``.

        A ``model_type`` of ``"llama"`` takes transformers' ``LlamaConfig`` defaults for the keys ``data`` leaves
        out (:data:`LLAMA_DEFAULTS`); a missing ``model_type`` means ``"diffllama"``.

        Raises:
            ValueError: if ``model_type`` is not one of :data:`MODEL_TYPES`, an override is not a field, or any
                field is invalid.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object (a dict of fields), got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(overrides) - names - {"num_labels"})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}: keyword arguments must be DiffLlamaConfig fields "
                             f"(e.g. attn_implementation, rope_theta, pad_token_id) or num_labels")
        data = {**data, **overrides}
        if data.get("model_type") == "llama":
            data = {**LLAMA_DEFAULTS, **data}
        known = {k: v for k, v in data.items() if k in names}
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in names and k != "extra"}}
        num_labels = extra.pop("num_labels", None)
        labels = known.get("id2label")
        if num_labels is not None and labels is not None and "id2label" not in overrides and len(labels) != num_labels:
            if "num_labels" in overrides:  # a num_labels keyword replaces the checkpoint's labels (as in transformers)
                known["id2label"], known["label2id"] = None, overrides.get("label2id")
            else:  # both from the file: its id2label wins (as in transformers)
                num_labels = None
        if "_attn_implementation" in extra:
            extra.pop("_attn_implementation")
        return cls(**known, num_labels=num_labels, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers writes it: ``rope_parameters`` only, no legacy or runtime-only keys."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_theta", "rope_scaling", "attn_implementation"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.id2label is None:
            out.pop("id2label"), out.pop("label2id")
        else:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        for optional in ("problem_type", "classifier_dropout"):
            if out[optional] is None:
                out.pop(optional)
        if self.model_type != MODEL_TYPE:
            for key in DIFFLLAMA_ONLY_KEYS:
                out.pop(key)
        if self.model_type == "llama":
            out = {**LLAMA_ONLY_KEYS, **out}
        return out

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **overrides: Any) -> DiffLlamaConfig:
        """Read ``config.json`` from a checkpoint directory, a path to the file itself, or a hub repo id (resolved as
        the model's: :func:`diffllama.hub.resolve_checkpoint_dir`).

        Raises:
            FileNotFoundError: if there is no config.json there (or the path or repo id does not resolve).
            ValueError: as :meth:`from_dict`, or for bad JSON.
        """
        path = Path(path_or_repo_id).expanduser()
        if not path.is_file():
            path = resolve_checkpoint_dir(path_or_repo_id)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            # transformers' Trainer.save_model and its checkpoints write only the weights of a model that is not
            # a transformers PreTrainedModel, which is the case of diffllama's classes.
            raise FileNotFoundError(f"no config.json at {file}: a folder written by transformers' Trainer "
                                    "(save_model or a checkpoint) holds the weights only; save diffllama models "
                                    "with model.save_pretrained(folder) (after Trainer: "
                                    "trainer.model.save_pretrained(folder)), which writes config.json too, or train with "
                                    "diffllama.integrations.transformers.DiffLlamaTrainer")
        return cls.from_dict(read_json_object(file), **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` atomically (temp file, then rename). Returns the file path.

        On failure the folders this call created are removed again (:func:`new_folder`)."""
        with new_folder(directory) as folder:
            return atomic_write_text(folder / "config.json",
                                     json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_fields_init = DiffLlamaConfig.__init__


def _init_with_num_labels(self, *args, num_labels: int | None = None, **kwargs) -> None:
    # transformers' configs take num_labels=n. It cannot be a dataclass field (an InitVar) here: the num_labels
    # property would clash with it, and dataclasses.replace() would pass the property's value back in.
    if num_labels is not None:
        kwargs["id2label"], kwargs["label2id"] = label_maps(num_labels, kwargs.get("id2label"),
                                                            kwargs.get("label2id"))
    _fields_init(self, *args, **kwargs)


DiffLlamaConfig.__init__ = _init_with_num_labels


def model_type_for_arch(arch: str) -> str:
    """The config ``model_type`` of the CLI's ``--arch`` spelling: ``"diffllama"`` -> ``"diffllama"``,
    ``"diffllama-v2"`` -> ``"diffllama_v2"``, ``"llama"`` -> ``"llama"`` (:data:`ARCHITECTURES`).

    Raises:
        ValueError: naming ``arch`` and the accepted values, for anything else (the model_type spelling
            ``"diffllama_v2"`` included, so that one spelling is used on the command line).
    """
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch]


def architecture_name(class_name: str, model_type: str) -> str:
    """The class name config.json's ``architectures`` lists for a model of ``model_type``: transformers' name for a
    llama (``DiffLlamaForCausalLM`` -> ``LlamaForCausalLM``), ``DiffLlamaV2...`` for diffllama_v2, else unchanged."""
    new_prefix = {"llama": "Llama", "diffllama_v2": "DiffLlamaV2"}.get(model_type)
    if new_prefix is None or not class_name.startswith("DiffLlama"):
        return class_name
    return new_prefix + class_name.removeprefix("DiffLlama")


def label_maps(num_labels: int, id2label: dict | None, label2id: dict | None) -> tuple[dict, dict | None]:
    """``(id2label, label2id)`` for transformers' ``num_labels`` keyword: ``{i: "LABEL_i"}`` for i < ``num_labels``
    and the given ``label2id`` (None: derived later) when ``id2label`` is None, else both unchanged.

    Raises:
        ValueError: ``num_labels`` not an int >= 1 (bool refused), or an ``id2label`` of another length.
    """
    if not is_int(num_labels) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
    if id2label is None:
        return {i: f"LABEL_{i}" for i in range(num_labels)}, label2id
    if len(id2label) != num_labels:
        raise ValueError(f"num_labels={num_labels} disagrees with the {len(id2label)} entries of id2label")
    return id2label, label2id


def is_int(value) -> bool:
    """Whether ``value`` is an integer (Python or numpy, any ``numbers.Integral``) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Optional numeric RoPE keys (transformers' modeling_rope_utils): name, condition, what the error says.
_ROPE_NUMBERS = (
    ("low_freq_factor", lambda v: v > 0, "a finite number > 0"),
    ("high_freq_factor", lambda v: v > 0, "a finite number > 0"),
    ("beta_fast", lambda v: v > 0, "a finite number > 0"),
    ("beta_slow", lambda v: v > 0, "a finite number > 0"),
    ("mscale", lambda v: True, "a finite number"),
    ("mscale_all_dim", lambda v: True, "a finite number"),
    ("attention_factor", lambda v: v > 0, "a finite number > 0"),
)


def _label_map(id2label) -> dict[int, str]:
    """``id2label`` with int keys (config.json stores them as strings); ValueError unless a dict of int-like keys
    (an int or a string of one) to strings."""
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict of label ids to names, such as {{0: 'neg', 1: 'pos'}}, got "
                         f"{id2label!r}")
    out = {}
    for key, name in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = None
        if index is None or isinstance(key, bool) or str(index) != str(key).strip() or not isinstance(name, str):
            raise ValueError(f"id2label must map integer ids to string names, got the entry {key!r}: {name!r}")
        out[index] = name
    return out


def _check_number(name: str, value, holds, expected: str) -> None:
    """Raise ValueError "``name`` must be ``expected``, got ``value``" unless ``value`` is a finite int or float (not
    a bool; those two are what config.json can hold) for which ``holds(value)`` is true. The type is checked
    first: comparing a string would raise a bare TypeError."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and holds(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def token_ids(value, vocab_size: int, name: str, *, many: bool = True,
              expected: str | None = None) -> list[int]:
    """``value`` as a list of token ids, each checked to lie in [0, vocab_size): None gives ``[]``, an int ``[it]``,
    and (when ``many``) a list or tuple of ints the list of them.

    ``expected`` describes the accepted forms in the TypeError (default: from ``many``).

    Raises:
        TypeError: naming ``name``: any other value (bool and float included).
        ValueError: naming ``name``, the range and the ids outside it.
    """
    if value is None:
        return []
    if is_int(value):
        ids = [value]
    elif many and isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
        ids = list(value)
    else:
        expected = expected or ("None, an int or a list of ints" if many else "None or an int")
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} must {'hold ids' if many else 'be an id'} in [0, vocab_size={vocab_size}), "
                         f"got {bad if many else bad[0]}")
    return ids
