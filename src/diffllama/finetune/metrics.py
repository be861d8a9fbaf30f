"""Evaluation metrics of the fine-tuning tasks, in plain Python (no scikit-learn dependency).

- classification: accuracy and macro-F1 (the unweighted mean of each label's F1, labels seen in either the
  references or the predictions), plus per-label precision/recall/F1;
- tagging: token accuracy (over labelled words) and per-tag F1 (each tag scored as its own class over words);
- extractive QA: exact match and token F1 after SQuAD-style normalisation (lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed), the best over the gold answers of each question — the
  definitions of the SQuAD v1.1 evaluation, written here from the description in Rajpurkar et al. (2016).
"""

from __future__ import annotations

import re
import string
from collections import Counter


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}


def per_label_scores(references: list, predictions: list) -> dict:
    """Precision, recall, F1 and support (reference count) of every label in ``references`` ∪ ``predictions``.

    Args:
        references, predictions: equal-length sequences of hashable labels; a None prediction (no prediction, e.g.
            a word cut off by ``max_length``) counts as wrong for its reference label and is no label of its own.

    Returns:
        ``{label: {"precision", "recall", "f1", "support"}}``, labels sorted by their string form.

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    tp, fp, fn = Counter(), Counter(), Counter()
    for ref, pred in zip(references, predictions):
        if ref == pred:
            tp[ref] += 1
        else:
            if pred is not None:  # a missing prediction is a miss, not a false positive of a label "None"
                fp[pred] += 1
            fn[ref] += 1
    labels = sorted(set(references) | {p for p in predictions if p is not None}, key=str)
    return {label: _prf(tp[label], fp[label], fn[label]) for label in labels}


def classification_metrics(references: list, predictions: list) -> dict:
    """Accuracy, macro-F1 and per-label scores of single-label predictions.

    Returns:
        ``{"accuracy": float, "macro_f1": float, "per_label": {...}, "count": int}``; for empty input the
        scores are 0.0.

    Raises:
        ValueError: the two sequences differ in length.
    """
    per_label = per_label_scores(references, predictions)
    n = len(references)
    accuracy = sum(r == p for r, p in zip(references, predictions)) / n if n else 0.0
    macro = sum(s["f1"] for s in per_label.values()) / len(per_label) if per_label else 0.0
    return {"accuracy": accuracy, "macro_f1": macro, "per_label": per_label, "count": n}


def majority_baseline(train_labels: list, references: list) -> float:
    """Accuracy of always predicting the most frequent label of ``train_labels`` on ``references`` (0.0 if empty)."""
    if not train_labels or not references:
        return 0.0
    top = Counter(train_labels).most_common(1)[0][0]
    return sum(r == top for r in references) / len(references)


def tagging_metrics(references: list[list], predictions: list[list]) -> dict:
    """Token accuracy and per-tag F1 over sentences of word tags.

    Args:
        references, predictions: lists of sentences, each a list of tags; sentence lengths must match. A None
            predicted tag (a word past ``max_length``) is wrong for its reference tag and adds no tag of its own.

    Returns:
        ``{"token_accuracy", "macro_f1", "per_tag": {tag: {...}}, "tokens": int, "sentences": int}``.

    Raises:
        ValueError: a different number of sentences, or a sentence whose lengths differ (names its index).
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference sentences but {len(predictions)} predicted")
    flat_ref, flat_pred = [], []
    for i, (ref, pred) in enumerate(zip(references, predictions)):
        if len(ref) != len(pred):
            raise ValueError(f"sentence {i}: {len(ref)} reference tags but {len(pred)} predicted")
        flat_ref.extend(ref)
        flat_pred.extend(pred)
    scores = classification_metrics(flat_ref, flat_pred)
    return {"token_accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "per_tag": scores["per_label"],
            "tokens": len(flat_ref), "sentences": len(references)}


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the bags of normalised words of ``prediction`` and ``gold`` (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(golds: list[list[str]], predictions: list[str], groups: list | None = None) -> dict:
    """Exact match and token F1 (in percent), each the best over a question's gold answers, averaged.

    Args:
        golds: per question, its gold answer texts (at least one). predictions: the predicted texts.
        groups: optional per-question key (e.g. an insertion-depth bucket); adds ``"by_group": {key: {...}}``.

    Returns:
        ``{"exact_match": float, "f1": float, "count": int}`` (+ ``by_group``).

    Raises:
        ValueError: lengths differ, or a question without gold answers (names its index).
    """
    if len(golds) != len(predictions) or (groups is not None and len(groups) != len(golds)):
        raise ValueError(f"{len(golds)} questions, {len(predictions)} predictions"
                         + ("" if groups is None else f", {len(groups)} groups"))
    em, f1 = [], []
    for i, (answers, pred) in enumerate(zip(golds, predictions)):
        if not answers:
            raise ValueError(f"question {i} has no gold answer")
        em.append(max(exact_match(pred, a) for a in answers))
        f1.append(max(token_f1(pred, a) for a in answers))
    n = len(golds)
    out = {"exact_match": 100 * sum(em) / n if n else 0.0, "f1": 100 * sum(f1) / n if n else 0.0, "count": n}
    if groups is not None:
        by: dict = {}
        for key, e, f in zip(groups, em, f1):
            by.setdefault(key, []).append((e, f))
        out["by_group"] = {key: {"exact_match": 100 * sum(e for e, _ in v) / len(v),
                                 "f1": 100 * sum(f for _, f in v) / len(v), "count": len(v)}
                           for key, v in sorted(by.items(), key=lambda kv: str(kv[0]))}
    return out
