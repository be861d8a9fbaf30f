"""The heads' losses, as transformers' ``loss_utils`` (``ForCausalLMLoss``, ``ForSequenceClassificationLoss``,
``ForQuestionAnsweringLoss``) computes them; the labels are checked beforehand (:mod:`diffllama.inputs`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffllama.inputs import check_tensor


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Shifted next-token cross-entropy in float32, ignore index -100 (transformers' ``ForCausalLMLoss``).

    logits (B, S, V), labels (B, S) int64. Mean over counted targets, or sum / ``num_items_in_batch``.
    """
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def problem_type(labels: torch.Tensor, configured: str | None, num_labels: int) -> str:
    """``configured`` (``config.problem_type``), or the one transformers infers from ``num_labels`` and the
    labels' dtype. TypeError unless ``labels`` is a tensor."""
    check_tensor("labels", labels)
    if configured is not None:
        return configured
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, problem: str) -> torch.Tensor:
    """Pooled logits (B, N) against labels for ``problem``: cross-entropy (ignore -100), MSE or BCE with logits."""
    n = pooled.shape[-1]
    labels = labels.to(pooled.device)
    if problem == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, n), labels, ignore_index=-100)
    labels = labels.to(pooled.dtype).view(pooled.shape[0], n)
    if problem == "regression":
        return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
    return F.binary_cross_entropy_with_logits(pooled, labels)


def question_answering_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
                            end_positions: torch.Tensor,
                            num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the start and end cross-entropies over (B, S) logits; positions (B,) or (B, 1) are clamped to
    [0, S] and S is ignored. Each a mean over counted rows, or a sum / ``num_items_in_batch``."""
    s = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, s).to(start_logits.device)
    end = end_positions.reshape(-1).clamp(0, s).to(start_logits.device)
    # No float32 upcast here, as in transformers: the QA loss keeps the logits' dtype.
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = (F.cross_entropy(start_logits, start, ignore_index=s, reduction=reduction)
            + F.cross_entropy(end_logits, end, ignore_index=s, reduction=reduction)) / 2
    return loss if num_items_in_batch is None else loss / num_items_in_batch
