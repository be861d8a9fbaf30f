"""Attention allocation on the needle samples (Ye et al., arXiv 2410.05258, §3.4, Table 3).

For each sample's first prompt (:class:`diffllama.eval.needle.NeedleSample`, whose target needle sits at the
sample's depth) one forward pass records every layer's attention map (:mod:`diffllama.eval.attention_maps`). The
query rows are the question's tokens (everything after the context). For each row the map is normalised to a
distribution over keys, then

- **answer** = its mass on the target needle sentence's tokens,
- **noise** = its mass on the context tokens outside every needle (the haystack),

averaged over the query rows, the output heads and the samples; reported per layer and as the mean over layers.

Normalisation. Plain attention rows are probabilities already. A differential map ``softmax1 − λ·softmax2`` has rows
summing to 1 − λ with negative entries, which no "share of attention" describes; we take its positive part and
renormalise each row to sum 1: ``a = relu(m) / Σ relu(m)`` (a row with no positive entry is skipped). So the
figures are the share of the positive (signal) mass, comparable with a softmax's, and 1 when all of it falls on
the answer.
"""

from __future__ import annotations

import torch

from diffllama.eval.attention_maps import captured_maps


def normalised_rows(combined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, Sq, Sk) map -> (its rows as distributions ``relu(m)/Σ relu(m)``, (…, Sq) bool: rows kept)."""
    positive = combined.clamp_min(0)
    total = positive.sum(dim=-1, keepdim=True)
    return positive / total.clamp_min(torch.finfo(positive.dtype).tiny), total.squeeze(-1) > 0


def allocation(combined: torch.Tensor, query_rows: slice, answer: torch.Tensor, noise: torch.Tensor
               ) -> tuple[float, float]:
    """(answer share, noise share) of one layer's map.

    Args:
        combined: (B, Hout, Sq, Sk) :meth:`AttentionMaps.combined`. query_rows: the rows (query positions) to
            average. answer, noise: (Sk,) bool key sets.

    Returns:
        The two shares in [0, 1], means over the kept query rows of every head and batch row (nan if none).
    """
    rows, kept = normalised_rows(combined[:, :, query_rows].double())
    answer_share = rows[..., answer].sum(-1)[kept]
    noise_share = rows[..., noise].sum(-1)[kept]
    if answer_share.numel() == 0:
        return float("nan"), float("nan")
    return float(answer_share.mean()), float(noise_share.mean())


@torch.no_grad()
def attention_allocation(model, samples, maps_fn=None, progress: bool = True) -> dict:
    """Answer and noise shares per layer over ``samples`` (:class:`~diffllama.eval.needle.NeedleSample`).

    Returns:
        ``{"per_layer": [{"layer": l, "answer": a, "noise": n}, ...], "answer": mean, "noise": mean,
        "samples": count}`` (shares in [0, 1]; the means are over layers).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sums = None
    with captured_maps(model, maps_fn) as found:
        for sample in tqdm(samples, desc="attention", disable=not progress, leave=False):
            ids = sample.queries[0].input_ids
            model(torch.tensor([ids], device=device), use_cache=False)
            answer = torch.zeros(len(ids), dtype=torch.bool, device=device)
            answer[sample.answer_span[0]:sample.answer_span[1] + 1] = True
            noise = torch.zeros_like(answer)
            noise[:sample.context_tokens] = True
            for first, last in sample.needle_spans:
                noise[first:last + 1] = False
            shares = [allocation(maps.combined(), slice(sample.context_tokens, len(ids)), answer, noise)
                      for maps in found]
            sums = shares if sums is None else [(a + x, n + y) for (a, n), (x, y) in zip(sums, shares)]
    count = len(samples)
    per_layer = [{"layer": i, "answer": a / count, "noise": n / count} for i, (a, n) in enumerate(sums or [])]
    return {"per_layer": per_layer, "answer": sum(p["answer"] for p in per_layer) / max(len(per_layer), 1),
            "noise": sum(p["noise"] for p in per_layer) / max(len(per_layer), 1), "samples": count}


def plot_allocation(result: dict, path) -> None:
    """Bar chart of the answer and noise shares per layer, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [p["layer"] for p in result["per_layer"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 2), 3.4))
    width = 0.4
    ax.bar([x - width / 2 for x in layers], [p["answer"] for p in result["per_layer"]], width, label="answer")
    ax.bar([x + width / 2 for x in layers], [p["noise"] for p in result["per_layer"]], width, label="noise")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention")
    ax.set_ylim(0, 1)
    ax.set_title(f"attention allocation (mean over layers)\nanswer {result['answer']:.3f}, noise {result['noise']:.3f}",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
