"""Multi-needle retrieval (Ye et al., arXiv 2410.05258, §3.4, Table 2 and Fig. 5; the LWM / Gemini protocol).

A sample hides N needles, sentences ``"The magic number of {city} is {number}."``, in a haystack of real text
(consecutive words of the bundled State of the Union corpus, :func:`diffllama.train.data.bundled_corpus`), and asks
for R of them, one prompt per queried needle: ``context + "\\n" + "What is the magic number of {city}? The magic
number of {city} is"``. The target needle (the first queried one) sits at the chosen depth (0 = before the first
word, 1 = after the last; :func:`diffllama.finetune.retrieval.insert_at_depth`); the other needles, the R − 1 other
queried ones and N − R distractors, sit at random places. Each prompt is sized to ``length`` tokens with room for
the answer. Scoring: greedy decoding of as many tokens as the answer has plus one; the first run of digits in the
generated text must equal the number (exact match). A sample's accuracy is the mean over its R queries.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from diffllama.finetune.data import answer_token_span
from diffllama.finetune.retrieval import insert_at_depth
from diffllama.eval.scoring import greedy_continuation
from diffllama.train.data import bundled_corpus, iter_documents

CITIES = ("Paris", "Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Madrid", "Athens", "Warsaw", "Berlin",
          "Helsinki", "Geneva", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Houston", "Phoenix", "Atlanta")
NEEDLE = "The magic number of {city} is {number}."
QUESTION = "What is the magic number of {city}? The magic number of {city} is"
CELLS = ((1, 1), (2, 2), (4, 2), (6, 2))
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class PromptTooLong(ValueError):
    """A needle prompt does not fit its length even without haystack (too many needles for too few tokens)."""


@dataclass
class NeedleQuery:
    """One prompt of a sample: its token ids, the city asked for and the number expected."""

    input_ids: list[int]
    city: str
    answer: str


@dataclass
class NeedleSample:
    """A haystack with N needles and R queries.

    Attributes:
        num_needles, num_queries, length, depth: the cell (N, R), the target token length and the depth bucket.
        actual_depth: fraction of haystack words before the target needle.
        queries: R prompts; ``queries[0]`` asks for the target needle.
        answer_span: (first, last) token index, inclusive, of the target needle sentence in ``queries[0]``.
        needle_spans: the (first, last) token spans of all N needles in ``queries[0]`` (target first).
        context_tokens: tokens of ``queries[0]`` before the question (the question tokens are the query rows).
    """

    num_needles: int
    num_queries: int
    length: int
    depth: float
    actual_depth: float
    queries: list[NeedleQuery]
    answer_span: tuple[int, int]
    needle_spans: list[tuple[int, int]]
    context_tokens: int
    results: list[bool] = field(default_factory=list)


@lru_cache(maxsize=1)
def haystack_words() -> tuple[str, ...]:
    """Every word of the bundled corpus, documents in file order (cached)."""

    return tuple(word for doc in iter_documents([bundled_corpus()]) for word in doc.split())


def default_lengths(max_length: int) -> list[int]:
    """Context lengths: 1024, 2048, ... up to ``max_length`` (which is included); for a model shorter than 1024
    tokens, half and all of it (a quarter of the tiny preset's 256 cannot hold six needles and a question).

    Raises:
        ValueError: ``max_length`` < 64.
    """
    if max_length < 64:
        raise ValueError(f"max_length must be >= 64 tokens for needle prompts, got {max_length}")
    if max_length < 1024:
        return [max_length // 2, max_length]
    lengths = [1024]
    while lengths[-1] * 2 <= max_length:
        lengths.append(lengths[-1] * 2)
    return lengths if lengths[-1] == max_length else lengths + [max_length]


def build_sample(tokenizer, num_needles: int, num_queries: int, length: int, depth: float, seed: int,
                 words: tuple[str, ...] | None = None) -> NeedleSample:
    """One :class:`NeedleSample` whose longest prompt has at most ``length`` tokens including the answer.

    Args:
        tokenizer: a :class:`diffllama.tokenizer.Tokenizer`. num_needles, num_queries: N >= R >= 1, N <= 20.
        length: target tokens (prompt + answer + 1), >= 64. depth: target needle depth in [0, 1].
        seed: the sample's seed (same arguments, same sample). words: the haystack (default :func:`haystack_words`).

    Raises:
        ValueError: bad N/R or depth outside [0, 1]; :class:`PromptTooLong` for a length too short to hold the
        needles and a question.
    """
    if not 1 <= num_queries <= num_needles <= len(CITIES):
        raise ValueError(f"need 1 <= num_queries <= num_needles <= {len(CITIES)}, got N={num_needles}, "
                         f"R={num_queries}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if length < 64:
        raise ValueError(f"length must be >= 64 tokens, got {length}")
    words = words or haystack_words()
    rng = random.Random(seed)
    cities = rng.sample(CITIES, num_needles)
    numbers = [str(rng.randrange(10000, 100000)) for _ in cities]
    needles = [NEEDLE.format(city=c, number=n) for c, n in zip(cities, numbers)]
    answer_room = max(len(tokenizer.encode(" " + n, add_special_tokens=False)) for n in numbers) + 1
    begin = rng.randrange(0, len(words) - 4 * length)
    spots = [rng.random() for _ in needles[1:]]

    def build(n_words: int):
        haystack = list(words[begin:begin + n_words])
        for needle, spot in zip(needles[1:], spots):  # inserted as single 'words': the depth arithmetic stays exact
            haystack.insert(round(spot * len(haystack)), needle)
        context, _, actual = insert_at_depth(haystack, needles[0], depth)
        prompts = [context + "\n" + QUESTION.format(city=c) for c in cities[:num_queries]]
        longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts) + answer_room
        return context, actual, prompts, longest

    overhead = build(0)[3]
    if overhead > length:
        raise PromptTooLong(f"length {length} tokens cannot hold {num_needles} needles and a question "
                         f"({overhead} tokens without any haystack)")
    rate = 1.5  # haystack tokens per word: a first guess, then measured
    n_words = int((length - overhead) / rate)
    for _ in range(8):
        context, actual, prompts, longest = build(n_words)
        if length - 4 <= longest <= length or n_words == 0:
            break
        rate = max(0.2, (longest - overhead) / n_words)
        n_words = max(0, min(4 * length, n_words + int((length - longest) / rate)))
    while longest > length:  # the estimate overshot: drop words until it fits
        n_words = max(0, n_words - max(1, int((longest - length) / rate)))
        context, actual, prompts, longest = build(n_words)
    ids, offsets = tokenizer.encode_with_offsets(prompts[0])
    spans = [answer_token_span(offsets, context.index(n), context.index(n) + len(n)) for n in needles]
    queries = [NeedleQuery(tokenizer.encode(p, add_special_tokens=False), c, n)
               for p, c, n in zip(prompts, cities, numbers)]
    context_tokens = next(i for i, (a, b) in enumerate(offsets) if b > len(context))
    return NeedleSample(num_needles, num_queries, length, depth, actual, queries, spans[0], spans,
                        context_tokens)


def build_samples(tokenizer, lengths: list[int], samples_per_cell: int = 1, cells=CELLS, depths=DEPTHS,
                  seed: int = 0) -> tuple[list[NeedleSample], list[str]]:
    """Every (cell, length, depth) × ``samples_per_cell`` sample, seeded from ``seed`` and its position.

    Returns ``(samples, skipped)``: ``skipped`` names as ``"N,R@length"`` the combinations whose needles and
    question alone exceed the length (:class:`PromptTooLong`), which have no samples.
    """
    if samples_per_cell < 1:
        raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}")
    words = haystack_words()
    out, skipped = [], []
    for n, r in cells:
        for length in lengths:
            try:
                for depth in depths:
                    for i in range(samples_per_cell):
                        key = hash((seed, n, r, length, depth, i)) & 0xFFFFFFFF  # ints/floats hash stably
                        out.append(build_sample(tokenizer, n, r, length, depth, key, words))
            except PromptTooLong:
                out = [s for s in out if (s.num_needles, s.num_queries, s.length) != (n, r, length)]
                skipped.append(f"{n},{r}@{length}")
    return out, skipped


def generated_number(text: str) -> str | None:
    """The first run of digits in ``text`` (None when there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def score_samples(model, tokenizer, samples: list[NeedleSample], progress: bool = True, desc: str = "needle",
                  use_cache: bool = True) -> list[NeedleSample]:
    """Fill each sample's ``results`` (one bool per query: exact match of the generated number); returns them.
    ``use_cache=False`` decodes by full forward passes (needed under the hooks of the quantisation path)."""
    from tqdm.auto import tqdm


    for sample in tqdm(samples, desc=desc, disable=not progress, leave=False):
        sample.results = []
        for query in sample.queries:
            n_new = len(tokenizer.encode(" " + query.answer, add_special_tokens=False)) + 1
            text = tokenizer.decode(greedy_continuation(model, query.input_ids, n_new, use_cache))
            sample.results.append(generated_number(text) == query.answer)
    return samples


def accuracy_table(samples: list[NeedleSample]) -> dict:
    """``{"N,R": {"by_length_depth": {length: {depth: acc}}, "by_length": {...}, "overall": acc}}``; accuracies
    in [0, 1], means over samples of each sample's mean over its queries."""
    table: dict = {}
    for s in samples:
        cell = table.setdefault(f"{s.num_needles},{s.num_queries}", {"by_length_depth": {}, "_all": []})
        acc = sum(s.results) / len(s.results)
        cell["by_length_depth"].setdefault(str(s.length), {}).setdefault(f"{s.depth:.2f}", []).append(acc)
        cell["_all"].append((s.length, acc))
    for cell in table.values():
        grid = cell["by_length_depth"]
        cell["by_length"] = {k: _mean([a for v in d.values() for a in v]) for k, d in grid.items()}
        cell["by_length_depth"] = {k: {dk: _mean(dv) for dk, dv in d.items()} for k, d in grid.items()}
        cell["overall"] = _mean([a for _, a in cell.pop("_all")])
    return table


def _mean(values) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def plot_heatmaps(table: dict, folder) -> list:
    """One depth × length accuracy heatmap PNG per (N, R) cell, ``needle_N{n}_R{r}.png`` in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    paths = []
    for cell, data in table.items():
        grid = data["by_length_depth"]
        lengths = sorted(grid, key=int)
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        values = [[grid[length].get(d, float("nan")) for length in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 3.2))
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("answer depth")
        n, r = cell.split(",")
        ax.set_title(f"needle retrieval N={n}, R={r}: {data['overall']:.2f}")
        fig.colorbar(image, ax=ax, label="exact match")
        fig.tight_layout()
        path = Path(folder) / f"needle_N{n}_R{r}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
