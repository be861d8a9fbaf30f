"""A key-information-retrieval QA set built from real text: one fact hidden at a chosen depth of a real passage.

Each example takes a passage of ``passage_words`` consecutive words from a real document (by default the bundled
State of the Union corpus, :func:`diffllama.train.data.bundled_corpus`), inserts one fact sentence between two
words at a depth drawn from ``depths`` (0 = before the first word, 1 = after the last; the actual fraction of
words before the fact is recorded as ``depth``), and asks for the fact's value. The answer is a span of the
context (a random number, which the passage cannot predict), so the task is extractive QA whose difficulty is
finding the one relevant sentence, as in "needle in a haystack" evaluations. Output: SQuAD-format JSON whose
questions carry ``depth``; :func:`diffllama.finetune.data.read_squad` keeps it, and the QA task reports exact
match per depth.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from diffllama.io import atomic_write_text

NAMES = ("Adams", "Baker", "Carter", "Dalton", "Ellis", "Foster", "Garcia", "Harper", "Irving", "Jensen", "Keller",
         "Lawson", "Monroe", "Nolan", "Owens", "Porter", "Quinn", "Reyes", "Sutton", "Turner", "Upton", "Vaughn",
         "Walsh", "Young", "Zimmer")
TEMPLATES = (
    ("The secret code of agent {key} is {value}.", "What is the secret code of agent {key}?"),
    ("The locker number assigned to {key} is {value}.", "What locker number is assigned to {key}?"),
    ("The password chosen by {key} was {value}.", "What password did {key} choose?"),
)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_retrieval_qa(documents: list[str], count: int, *, passage_words: int = 120, seed: int = 0,
                       depths: tuple[float, ...] = DEFAULT_DEPTHS, prefix: str = "kir", distractors: int = 0) -> dict:
    """Build ``count`` retrieval questions from ``documents`` (real texts, each split on whitespace).

    Args:
        documents: texts; those shorter than ``passage_words`` words are skipped.
        count: questions to make. passage_words: words of real text around the fact.
        seed: the random seed (same arguments → same set). depths: the insertion depths to draw from.
        prefix: question ids are ``{prefix}-{i}``.
        distractors: facts of the same kind about other keys, inserted at random places of the passage (so the
            question's key must be matched, not just the pattern found).

    Returns:
        A SQuAD-format dict ``{"version": ..., "data": [{"title": ..., "paragraphs": [...]}]}``; each question
        carries ``depth`` (fraction of passage words before the fact) and ``depth_bucket`` (the drawn depth).

    Raises:
        ValueError: no document has ``passage_words`` words, or ``count`` < 1.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    words = [d.split() for d in documents]
    words = [w for w in words if len(w) >= passage_words]
    if not words:
        raise ValueError(f"no document has {passage_words} words")
    rng = random.Random(seed)
    paragraphs = []
    for i in range(count):
        doc = rng.choice(words)
        begin = rng.randrange(0, len(doc) - passage_words + 1)
        passage = list(doc[begin:begin + passage_words])
        bucket = rng.choice(depths)
        statement, question = rng.choice(TEMPLATES)
        keys = rng.sample(NAMES, distractors + 1)
        key, value = keys[0], str(rng.randrange(1000, 100000))
        fact = statement.format(key=key, value=value)
        for other in keys[1:]:  # distractors go in as single 'words' so the depth arithmetic stays exact
            spot = rng.randrange(0, len(passage) + 1)
            passage.insert(spot, statement.format(key=other, value=rng.randrange(1000, 100000)))
        context, fact_start, depth = insert_at_depth(passage, fact, bucket)
        answer_start = fact_start + fact.index(value)
        assert context[answer_start:answer_start + len(value)] == value
        paragraphs.append({"context": context, "qas": [{
            "id": f"{prefix}-{i}", "question": question.format(key=key),
            "answers": [{"text": value, "answer_start": answer_start}],
            "depth": depth, "depth_bucket": bucket}]})
    return {"version": "diffllama-retrieval-1", "data": [{"title": "key information retrieval",
                                                           "paragraphs": paragraphs}]}


def insert_at_depth(words: list[str], fact: str, depth: float) -> tuple[str, int, float]:
    """Join ``words`` with spaces, with ``fact`` inserted after ``round(depth · len(words))`` of them.

    Returns ``(context, fact_start, actual_depth)``: the text, the character offset of ``fact`` in it, and the
    fraction of words before the fact. Shared by this QA set and the needle evaluation
    (:mod:`diffllama.eval.needle`).
    """
    cut = round(depth * len(words))
    before, after = " ".join(words[:cut]), " ".join(words[cut:])
    context = " ".join(part for part in (before, fact, after) if part)
    return context, (len(before) + 1 if before else 0), cut / max(len(words), 1)


def write_retrieval_qa(path: str | Path, documents: list[str], count: int, **kwargs) -> Path:
    """:func:`build_retrieval_qa` written as JSON to ``path`` atomically (parent folders created). Returns the path.

    Raises:
        ValueError: as :func:`build_retrieval_qa`, before any folder or file is created.
    """
    path = Path(path)
    text = json.dumps(build_retrieval_qa(documents, count, **kwargs)) + "\n"  # first: bad arguments write nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
