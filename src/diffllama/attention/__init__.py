"""Differential attention: dispatch by ``attn_implementation`` over backends that share one contract
(:mod:`diffllama.attention.contract`: the mask, the input checks, the head pairing; re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffllama.attention import eager, sdpa
from diffllama.attention.contract import AttentionMask, check_inputs, combine_pairs, pair_values, repeat_kv

__all__ = ["AttentionMask", "ChosenBackend", "check_inputs", "combine_pairs", "get_backend", "get_plain_backend",
           "pair_values", "repeat_kv", "resolve_implementation"]

BACKENDS = ("eager", "sdpa", "flash")


def get_backend(name: str):
    """The attention function for ``attn_implementation`` ``name`` ("eager", "sdpa" or "flash").

    Raises:
        ValueError: for an unknown name. ImportError/RuntimeError from the flash backend when Triton or a GPU is
        missing (raised by that module).
    """
    if name == "eager":
        return eager.attention
    if name == "sdpa":
        return sdpa.attention
    if name == "flash":
        from diffllama.attention import flash  # lazy: Triton is optional and slow to import
        return flash.attention
    raise ValueError(f"attn_implementation must be one of {BACKENDS} or 'auto', got {name!r}")


def get_plain_backend(name: str):
    """The plain (unpaired) attention function for ``attn_implementation`` ``name``, for the Llama and V2 attention
    modules: ``eager.plain_attention`` for "eager", ``sdpa.plain_attention`` for "sdpa" and for "flash".

    "flash" (and "auto" on a GPU, which resolves to it) means the fastest kernels: for plain attention those are
    SDPA's (FlashAttention-2 for training and prefill, and decode too). The Triton kernels here, the split-key
    decode kernel included, compute the differential form over paired 2d-wide values; used for plain attention
    they would read every value head twice, so they are not.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "eager":
        return eager.plain_attention
    if name in ("sdpa", "flash"):
        return sdpa.plain_attention
    raise ValueError(f"attn_implementation must be one of {BACKENDS} or 'auto', got {name!r}")


def resolve_implementation(name: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` into a backend for ``device``: flash on a CUDA GPU where Triton imports, else sdpa.

    For inference and training alike: the flash backward is checked against float32/float64 eager on the GPU and
    runs 1.7-2.2x faster than sdpa there at 4k-16k tokens (benchmarks/RESULTS.md). Flash itself falls back to sdpa
    for float32/float64 inputs, dropout and head_dim > 256. Any other name is returned as is: :func:`get_backend`
    refuses an unknown one.
    """
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash"
    return "sdpa"


class ChosenBackend:
    """A model's attention function, chosen once: ``config.attn_implementation`` resolved for a device type
    (:func:`resolve_implementation`) and imported (:func:`get_backend`) on the first call, then returned as is. It is
    chosen again only when the configured name or the device type changes (e.g. ``model.config.attn_implementation
    = "eager"``, or the model moved from CPU to CUDA).

    Args:
        config: any object with an ``attn_implementation`` attribute (a :class:`diffllama.DiffLlamaConfig`).
        plain: choose among the plain attention functions (:func:`get_plain_backend`, for Llama and V2) instead
            of the differential ones (:func:`get_backend`).
    """

    def __init__(self, config, *, plain: bool = False) -> None:
        self.config = config
        self.plain = plain
        self._key: tuple[str, str] | None = None
        self._function: Callable | None = None

    def __call__(self, device: torch.device) -> Callable:
        """The attention function for tensors on ``device``; errors as :func:`get_backend` /
        :func:`get_plain_backend`."""
        key = (self.config.attn_implementation, device.type)
        if key != self._key:
            getter = get_plain_backend if self.plain else get_backend
            self._function, self._key = getter(resolve_implementation(*key)), key
        return self._function
