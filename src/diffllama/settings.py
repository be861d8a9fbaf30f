"""Debug overrides of the kernel variants: the only place that reads ``DIFFLLAMA_*`` environment variables.

The variants are keyword arguments of the launchers (:func:`diffllama.attention.flash.attention`: ``dq_mode``,
``bwd_mode``, ``autotune``, ``debug``; :func:`diffllama.gemv.linear`: ``sites``). Their defaults are the
constants below: the built-in value, or the environment's when a variable is set (read once, at import). A caller
that passes an argument overrides both.

=============================  =========================================================  ===========
variable                       values                                                     default
=============================  =========================================================  ===========
``DIFFLLAMA_GEMV``             comma-separated subset of ``qkv, o, gate_up, down,         ``qkv``
                               lm_head``, or ``none``: the batch-1 products that run as
                               diffllama's Triton GEMV (:mod:`diffllama.gemv`)
``DIFFLLAMA_FLASH_DQ``         ``kernel`` | ``atomic``: how the flash backward gets dQ     ``kernel``
``DIFFLLAMA_FLASH_BWD``        ``auto`` | ``fused`` | ``split``: how it launches dK/dV'     ``auto``
``DIFFLLAMA_FLASH_AUTOTUNE``   ``1`` | ``0``: autotune the flash kernels, or take each      ``1``
                               kernel's first candidate configuration
``DIFFLLAMA_FLASH_DEBUG``      ``0`` | ``1``: print each flash kernel's chosen config        ``0``
=============================  =========================================================  ===========

A bad value does not stop the import (the command-line tool must be able to report it as one line): it is
recorded, the default is used meanwhile, and :func:`check` raises. Building a model calls :func:`check`, and so
does every ``diffllama`` command before any other work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

GEMV_SITE_NAMES = ("qkv", "o", "gate_up", "down", "lm_head")
_CHOICES = {
    "DIFFLLAMA_FLASH_DQ": ("kernel", "atomic"),
    "DIFFLLAMA_FLASH_BWD": ("auto", "fused", "split"),
    "DIFFLLAMA_FLASH_AUTOTUNE": ("1", "0"),
    "DIFFLLAMA_FLASH_DEBUG": ("0", "1"),
}


def read(environ: Mapping[str, str]) -> tuple[dict[str, object], list[str]]:
    """Parse the variables above from ``environ``: (values by variable name, one error line per bad variable).

    Values: ``DIFFLLAMA_GEMV`` a frozenset of site names, the others their string choice; a bad variable keeps
    its default and adds an error line naming the variable, the value and what is expected.
    """
    values: dict[str, object] = {}
    errors: list[str] = []
    for name, allowed in _CHOICES.items():
        raw = environ.get(name, allowed[0])
        value = raw.strip()
        if value not in allowed:
            errors.append(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
            value = allowed[0]
        values[name] = value
    raw = environ.get("DIFFLLAMA_GEMV", "qkv")
    names = [s.strip() for s in raw.split(",")]
    unknown = [n for n in names if n not in GEMV_SITE_NAMES and n != "none"]
    if unknown or ("none" in names and len(names) > 1):
        problem = f"unknown site(s) {', '.join(map(repr, unknown))}" if unknown else "none mixed with sites"
        errors.append(f"DIFFLLAMA_GEMV={raw!r}: {problem}; expected a comma-separated subset of "
                      f"{', '.join(GEMV_SITE_NAMES)}, or none")
        names = ["qkv"]
    sites = frozenset(names) - {"none"}
    values["DIFFLLAMA_GEMV"] = sites
    return values, errors


VALUES, ERRORS = read(os.environ)
GEMV_SITES: frozenset[str] = VALUES["DIFFLLAMA_GEMV"]  # default ``sites`` of diffllama.gemv.linear / call
FLASH_DQ_MODES = _CHOICES["DIFFLLAMA_FLASH_DQ"]
FLASH_BWD_MODES = _CHOICES["DIFFLLAMA_FLASH_BWD"]
FLASH_DQ_MODE: str = VALUES["DIFFLLAMA_FLASH_DQ"]  # default ``dq_mode`` of diffllama.attention.flash.attention
FLASH_BWD_MODE: str = VALUES["DIFFLLAMA_FLASH_BWD"]  # default ``bwd_mode``
FLASH_AUTOTUNE: bool = VALUES["DIFFLLAMA_FLASH_AUTOTUNE"] == "1"  # default ``autotune``
FLASH_DEBUG: bool = VALUES["DIFFLLAMA_FLASH_DEBUG"] == "1"  # default ``debug``


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors, for
    development and tests. Read live, not at import, since tests switch it."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check() -> None:
    """Raise when an environment variable above had a bad value at import.

    Raises:
        ValueError: naming every bad variable, its value and the values it accepts.
    """
    if ERRORS:
        raise ValueError("bad environment: " + "; ".join(ERRORS))
