"""What the machine can run, checked before a run starts: a training memory estimate against free memory, and
whether the CPU has bfloat16 instructions.

The estimate is deliberately simple (AdamW in float32, activations kept for the backward pass) and meant to
catch settings that cannot fit by a wide margin, e.g. ``--seq-len 100000`` on CPU, whose attention scores
alone need terabytes; it is not a promise that a run under it fits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# Bytes per parameter of a training run: float32 weights (4), their gradients (4), AdamW's two moments (8).
TRAIN_BYTES_PER_PARAM = 16
# Measured: a bf16 matmul on a CPU without AVX512-BF16/AMX (or Arm's BF16) runs about 30x slower than float32.
BF16_SLOWDOWN = 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs; each field in bytes.

    Attributes:
        parameters: the float32 weights. optimizer: their gradients and AdamW's two moments.
        activations: what one micro-batch keeps for the backward pass (layers, attention scores where the
            backend materialises them, logits).
    """

    parameters: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """The sum of the three parts, bytes."""
        return self.parameters + self.optimizer + self.activations

    def describe(self) -> str:
        """One line, e.g. ``"12.3 GB (parameters 0.1 GB, gradients + optimizer 0.2 GB, activations 12.0 GB)"``."""
        return (f"{_gb(self.total)} (parameters {_gb(self.parameters)}, gradients + optimizer "
                f"{_gb(self.optimizer)}, activations {_gb(self.activations)})")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def estimate_training_memory(config, *, batch_size: int, seq_len: int, quadratic_attention: bool,
                             activation_checkpointing: bool = False,
                             activation_dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    """Estimate the memory of training a causal LM of ``config`` on micro-batches of ``batch_size`` x ``seq_len``.

    Per token and layer the backward keeps about 10·hidden + 4·intermediate activations (norm outputs, q/k/v,
    attention output, residuals, the SwiGLU's gate/up/product) in ``activation_dtype``; with
    ``quadratic_attention`` (eager, or SDPA's math kernel on CPU) also two float32 (B, H, S, S) score tensors per
    layer; the logits take three float32 (B, S, vocab) tensors (logits, log-softmax, gradient). Activation
    checkpointing keeps one layer's worth plus each layer's input.

    Args:
        config: a :class:`diffllama.DiffLlamaConfig` (its sizes are read). batch_size, seq_len: ints >= 1.
        quadratic_attention: whether the attention backend materialises the scores. activation_dtype: float32,
            or the autocast dtype.

    Returns:
        a :class:`MemoryEstimate`.

    Raises:
        ValueError: ``batch_size`` or ``seq_len`` below 1.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    embed = config.vocab_size * d
    attn = d * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = attn + 3 * d * inter + 2 * d + 4 * config.head_dim
    params = embed * (1 if config.tie_word_embeddings else 2) + layers * per_layer + d
    tokens = batch_size * seq_len
    element = torch.finfo(activation_dtype).bits // 8
    layer = tokens * (10 * d + 4 * inter) * element
    if quadratic_attention:
        layer += 2 * 4 * batch_size * config.num_attention_heads * seq_len * seq_len
    kept = layer + layers * tokens * d * element if activation_checkpointing else layers * layer
    logits = 3 * 4 * tokens * config.vocab_size
    return MemoryEstimate(parameters=4 * params, optimizer=(TRAIN_BYTES_PER_PARAM - 4) * params,
                          activations=kept + logits)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device``: the GPU's free memory (``torch.cuda.mem_get_info``), the host's
    ``MemAvailable`` (Linux ``/proc/meminfo``) for CPU, else None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return None


def check_fits(estimate: MemoryEstimate, device: torch.device, hint: str) -> None:
    """Refuse a run whose ``estimate`` exceeds the free memory of ``device`` (nothing when it is unknown).

    Raises:
        MemoryError: naming the estimate, the free memory and ``hint`` (which settings to lower).
    """
    free = free_memory(device)
    if free is not None and estimate.total > free:
        where = "GPU" if device.type == "cuda" else "RAM"
        raise MemoryError(f"this run needs about {estimate.describe()}, more than the {_gb(free)} of free {where} "
                          f"on {device}: {hint}")


def cpu_has_bf16() -> bool | None:
    """Whether the CPU has bfloat16 matmul instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), from
    ``/proc/cpuinfo``; None where that file is missing (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_slow_bf16(device: torch.device, dtype, what: str) -> None:
    """Warn (UserWarning) that bfloat16 on a CPU without bf16 instructions runs about 30x slower than float32.

    Args:
        device: where the run computes. dtype: the dtype asked for (a torch dtype or its name). what: the setting
            to name in the message, e.g. "--dtype bfloat16".
    """
    if device.type != "cpu" or dtype not in (torch.bfloat16, "bfloat16"):
        return
    if cpu_has_bf16() is False:
        warnings.warn(f"{what} on this CPU (no AVX512-BF16/AMX/BF16 instructions) runs about {BF16_SLOWDOWN}x "
                      f"slower than float32: use float32 on CPU", UserWarning, stacklevel=2)
