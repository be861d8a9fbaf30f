"""Robustness of in-context learning to the order of the demonstrations (Ye et al., arXiv 2410.05258, §3.6, Fig. 7).

A fixed set of ``k`` labelled demonstrations (drawn once with ``seed``) is shown in ``orders`` random orders; for each
order every test text is classified by the label whose continuation is most likely after the prompt
``"Review: {text}\\nSentiment: {label}\\n\\n" × k + "Review: {test}\\nSentiment:"`` (labels as ``" {label}"``).
Reported: the accuracy per order, and best − worst (the paper's measure of order sensitivity). Texts are cut to
``max_words`` words so that the demonstrations fit a short context; prompts still too long lose tokens at the left.
Data: any labelled CSV/JSONL :func:`diffllama.finetune.data.read_text_classification` reads (the tests use the
Rotten Tomatoes slices shipped in ``diffllama/data``).
"""

from __future__ import annotations

import random

from diffllama.eval.scoring import continuation_logprobs, next_token_logprobs
from diffllama.finetune.data import read_text_classification


def build_prompts(demos: list[tuple[str, str]], tests: list[str], max_words: int) -> list[str]:
    """The prompt for each test text after ``demos`` ((text, label) pairs, in order), texts cut to ``max_words``."""
    cut = lambda text: " ".join(text.split()[:max_words])  # noqa: E731
    prefix = "".join(f"Review: {cut(t)}\nSentiment: {label}\n\n" for t, label in demos)
    return [f"{prefix}Review: {cut(t)}\nSentiment:" for t in tests]


def icl_order_robustness(model, tokenizer, train_path, test_path, *, k: int = 4, n_test: int = 64, orders: int = 5,
                         max_words: int = 25, seed: int = 0, batch_size: int = 16, text_column: str = "text",
                         label_column: str = "label", progress: bool = True) -> dict:
    """Accuracy of ``k``-shot classification under ``orders`` permutations of the demonstrations.

    Args:
        train_path: labelled data the demonstrations come from. test_path: labelled data scored (its first
            ``n_test`` rows). k, n_test, orders: >= 1 (orders >= 2 for a spread). max_words: words kept per text.

    Returns:
        ``{"accuracies": [per order], "mean", "best", "worst", "spread": best − worst, "labels", "k", "n_test",
        "chance": share of the most common test label}``.

    Raises:
        ValueError: a count below 1, fewer than ``k`` training rows, or a test label the demonstrations' label set
        lacks. :class:`diffllama.finetune.data.DataError`: an unreadable file.
    """
    from tqdm.auto import tqdm


    for name, value in (("k", k), ("n_test", n_test), ("orders", orders), ("max_words", max_words)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    train = read_text_classification(train_path, text_column, label_column)
    test = read_text_classification(test_path, text_column, label_column)[:n_test]
    if len(train) < k:
        raise ValueError(f"k={k} demonstrations need {k} training rows, {train_path} has {len(train)}")
    labels = sorted({e.label for e in train})
    unknown = {e.label for e in test} - set(labels)
    if unknown:
        raise ValueError(f"test labels {sorted(unknown)} are not among the training labels {labels}")
    rng = random.Random(seed)
    demos = [(e.text, e.label) for e in rng.sample(train, k)]
    limit = model.config.max_position_embeddings
    label_ids = [tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
    single_token = all(len(ids) == 1 for ids in label_ids)
    accuracies = []
    for order in tqdm(range(orders), desc="icl orders", disable=not progress, leave=False):
        shuffled = random.Random(seed * 1000 + order).sample(demos, k)
        prompts = build_prompts(shuffled, [e.text for e in test], max_words)
        pairs = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            if single_token:  # one-token labels: one pass over the prompt scores them all
                pairs.append((ids[-(limit - 1):], label_ids[0]))
            else:
                pairs.extend((ids[-(limit - len(c)):], c) for c in label_ids)
        if single_token:
            scores = [s for dist in next_token_logprobs(model, [c for c, _ in pairs], batch_size)
                      for s in dist[[c[0] for c in label_ids]].tolist()]
        else:
            scores = [score for score, _ in continuation_logprobs(model, pairs, batch_size)]
        correct = 0
        for i, example in enumerate(test):
            options = scores[i * len(labels):(i + 1) * len(labels)]
            correct += labels[options.index(max(options))] == example.label
        accuracies.append(correct / len(test))
    most_common = max(sum(e.label == label for e in test) for label in labels)
    return {"accuracies": accuracies, "mean": sum(accuracies) / len(accuracies), "best": max(accuracies),
            "worst": min(accuracies), "spread": max(accuracies) - min(accuracies), "labels": labels, "k": k,
            "n_test": len(test), "chance": most_common / len(test)}
