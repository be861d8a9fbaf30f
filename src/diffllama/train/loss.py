"""Chunked LM head + cross-entropy that never holds float32 logits for the whole batch.

The forward pass walks the tokens in chunks of ``chunk_size``: for each chunk it computes the logits
``h_c · Wᵀ`` (in the compute dtype), their log-sum-exp and the target log-probability in float32, and — when a
gradient is needed — at once the gradient of the summed loss with respect to the chunk's logits,
``softmax − onehot``, from which it accumulates ``∂L/∂h_c = g · W`` and ``∂L/∂W += gᵀ · h_c``. The chunk's
logits are then dropped. Backward only scales the stored gradients by the incoming scalar gradient, which is exact
because the loss is a (scaled) sum. Peak extra memory: one chunk's logits (chunk × vocab, float32, a few copies)
plus ∂L/∂h (tokens × hidden) and ∂L/∂W (vocab × hidden, float32); compute: the three matrix products of a plain
LM head + backward, with no recomputation.

The idea of fusing the LM head with the loss and precomputing the gradient in forward is the one behind "fused
linear cross-entropy" kernels (e.g. Liger-Kernel, Apple's cut-cross-entropy); this is a plain-PyTorch version.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's float32 logits stay near 256 MiB (at least 256 tokens)."""
    return max(256, (1 << 26) // max(vocab_size, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    """autograd.Function behind :func:`linear_cross_entropy`; casts to the compute dtype inside, so the
    gradients come back in the inputs' own dtypes (∂L/∂W accumulated in float32 all the way)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_size, dtype):
        in_dtypes = (hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        n = hidden.shape[0]
        needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]                       # (C, D)
            t = targets[start:start + chunk_size]                      # (C,)
            logits = (h @ weight.t()).float()                          # (C, V) float32
            lse = torch.logsumexp(logits, dim=-1)                      # (C,)
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)      # (C,)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if needs:
                grad = logits.sub_(lse[:, None]).exp_()                # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad *= (valid.to(grad.dtype) * scale)[:, None]
                grad = grad.to(hidden.dtype)
                grad_hidden[start:start + chunk_size] = grad @ weight
                grad_weight += (grad.t() @ h).float()
            del logits
        if needs:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.in_dtypes = in_dtypes
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.in_dtypes
        gh = (grad_hidden * grad_output).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         scale: float | torch.Tensor = 1.0, chunk_size: int = 0) -> torch.Tensor:
    """``scale × Σ_t CE(hidden_t · weightᵀ, targets_t)`` without materialising all logits.

    Args:
        hidden: (..., D) final hidden states (any float dtype). weight: (V, D) LM-head weight.
        targets: (...) int64 next-token ids in [0, V), ``-100`` = ignored.
        scale: multiplies the summed loss (e.g. 1 / global target count, for a mean over all ranks).
        chunk_size: tokens per chunk; 0 = :func:`default_chunk_size`.

    Compute dtype: under CUDA/CPU autocast, the autocast dtype; else the dtypes of the inputs (promoted). The
    log-sum-exp, the loss and ∂L/∂W accumulate in float32.

    Returns:
        A float32 scalar tensor; differentiable with respect to ``hidden`` and ``weight``.

    Raises:
        ValueError: mismatched shapes.
    """
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
                         f"{tuple(targets.shape)} do not match: need (..., D), (V, D), (...)")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
            scale.float() if isinstance(scale, torch.Tensor) else float(scale), chunk_size, dtype)


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            scale: float = 1.0) -> torch.Tensor:
    """The plain version (full float32 logits), for tests: ``scale × Σ CE``."""
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum") * scale
