"""Activation outliers (Ye et al., arXiv 2410.05258, §3.8, Table 5).

Over a set of sequences: the 1st, 2nd, 3rd, 10th and 100th largest value and the median of |attention logits|
(``q·kᵀ/√d`` of every query head, both maps of a differential pair pooled, allowed causal entries only) and of
|hidden states| (every decoder layer's output, before the final norm), each pooled over layers and sequences.
"""

from __future__ import annotations

import torch

from diffllama.eval.attention_maps import captured_maps

RANKS = (1, 2, 3, 10, 100)
MEDIAN_SAMPLE = 1 << 24  # values kept for the median: more would not fit torch.median's memory on large models


def outlier_stats(values: list[torch.Tensor]) -> dict:
    """``{"top1", "top2", "top3", "top10", "top100", "median", "count"}`` of the absolute values of ``values``.

    ``topK`` is the K-th largest |value| (nan when there are fewer than K values); ``median`` is the lower median
    (torch.median) of all |values|, or of an evenly strided subset of :data:`MEDIAN_SAMPLE` when there are more.

    Raises:
        ValueError: no values at all.
    """
    flat = torch.cat([v.detach().reshape(-1).abs().double().cpu() for v in values]) if values else torch.empty(0)
    if flat.numel() == 0:
        raise ValueError("outlier statistics need at least one value")
    top = torch.topk(flat, min(max(RANKS), flat.numel())).values
    out = {f"top{k}": float(top[k - 1]) if k <= top.numel() else float("nan") for k in RANKS}
    step = max(1, flat.numel() // MEDIAN_SAMPLE)
    out["median"] = float(flat[::step].median())
    out["count"] = int(flat.numel())
    return out


@torch.no_grad()
def activation_outliers(model, sequences: list[list[int]], maps_fn=None, progress: bool = True) -> dict:
    """:func:`outlier_stats` of the attention logits and hidden states over ``sequences`` (token-id lists).

    Only the largest values of each layer and sequence are kept (plus a strided sample for the median), so memory
    stays bounded. Returns ``{"attention_logits": stats, "hidden_states": stats, "sequences": n}``.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    logits, hidden = [], []
    base = model.model if hasattr(model, "model") else model
    handles = [layer.register_forward_hook(lambda mod, args, output: hidden.append(
        _reduced(output[0] if isinstance(output, tuple) else output))) for layer in base.layers]
    try:
        with captured_maps(model, maps_fn) as found:
            for seq in tqdm(sequences, desc="outliers", disable=not progress, leave=False):
                model(torch.tensor([seq], device=device), use_cache=False)
                for maps in found:
                    logits.append(_reduced(maps.logits.masked_select(maps.allowed)))
    finally:
        for handle in handles:
            handle.remove()
    return {"attention_logits": _merge(logits), "hidden_states": _merge(hidden), "sequences": len(sequences)}


def _reduced(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the top :data:`RANKS`-many |values|, a strided sample for the median, the count), on the CPU."""
    flat = values.detach().reshape(-1).abs().float()
    top = torch.topk(flat, min(max(RANKS), flat.numel())).values.cpu()
    step = max(1, flat.numel() // (MEDIAN_SAMPLE // 64))
    return top, flat[::step].cpu(), flat.numel()


def _merge(parts) -> dict:
    """:func:`outlier_stats` from per-layer :func:`_reduced` parts: exact top-K, median of the pooled samples."""
    stats = outlier_stats([top for top, _, _ in parts])
    stats["median"] = float(torch.cat([sample for _, sample, _ in parts]).double().median())
    stats["count"] = sum(count for _, _, count in parts)
    return stats
