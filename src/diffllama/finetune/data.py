"""Fine-tuning data: readers for the formats users have, and encoders that turn examples into padded batches.

Readers (each error is a :class:`DataError` whose message names the file and the row or line):

- :func:`read_text_classification`: CSV/TSV (header row; ``text_column`` and ``label_column`` configurable) or
  JSONL (one object per line). Rows count from 1 = the first data row (CSV) or the first line (JSONL).
- :func:`read_tagged`: CoNLL-style files (one word per line, the word in the first column and its tag in the last,
  columns split by tabs or spaces, a blank line between sentences, ``-DOCSTART-`` lines skipped) or JSONL with a
  list of tokens and a list of tags (``tokens_column`` / ``tags_column``).
- :func:`read_squad`: SQuAD-format JSON (``data`` → articles → ``paragraphs`` → ``context`` + ``qas`` with
  ``question``, ``id``, ``answers`` [{``text``, ``answer_start``}]); an optional numeric ``depth_bucket`` (else ``depth``) per
  question is kept (the retrieval set of :mod:`diffllama.finetune.retrieval` records where its fact was inserted).

Encoders (tokenizer from :class:`diffllama.tokenizer.Tokenizer`, character offsets from
:meth:`~diffllama.tokenizer.Tokenizer.encode_with_offsets`):

- padding: batches are right-padded with :func:`batch_pad_id` (the tokenizer's PAD, else its EOS), the id the
  model's ``config.pad_token_id`` is set to, so a text is pooled at the same token in any batch.
- classification: the text's tokens, cut to ``max_length`` (the start is kept); the model pools the last one.
- tagging, label alignment: the words are joined by single spaces and tokenized once; every token belongs to the
  word holding its last character; **the first sub-token of each word carries the word's tag, the other
  sub-tokens carry -100** (ignored by the loss and by prediction). Words past ``max_length`` tokens are cut and get
  no prediction (``None``).
- extractive QA: ``question tokens + [EOS] + context window``; the question comes first so that, under causal
  attention, every context token has read it. The question is kept whole (one that leaves no room for more than
  ``stride`` context tokens is refused). Contexts longer than the room left are split into windows that
  overlap by ``stride`` tokens. A window holding the whole first gold answer is labelled with its token span; a
  window without it is labelled (0, 0) (position 0: "not in this window"). Answer character spans map to the
  tokens whose character spans overlap them.
"""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffllama.train.data import jsonl_records


class DataError(ValueError):
    """Bad fine-tuning data: a missing file or column, an empty file, an unknown label, an answer not in its
    context. The message names the file and the row (or line)."""


# ---- examples ----------------------------------------------------------------------------------------------------

@dataclass
class TextExample:
    """One text to classify: ``label`` is None when unlabelled; ``row`` is the 1-based data row in its file."""

    text: str
    label: str | None
    row: int


@dataclass
class TaggedExample:
    """One sentence: ``words`` and their ``tags`` (None when untagged); ``row`` is the sentence's first line."""

    words: list[str]
    tags: list[str] | None
    row: int


@dataclass
class QAExample:
    """One question about a context; ``answers``/``answer_starts`` are gold texts and character offsets (may be
    empty when unlabelled); ``depth``: where the retrieval set inserted its fact (0 = start, 1 = end), else None."""

    qid: str
    question: str
    context: str
    answers: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)
    row: int = 0
    depth: float | None = None


def check_file(path: Path) -> None:
    """Raise DataError unless ``path`` is an existing file (naming it)."""
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory; expected a file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


@contextmanager
def _open_lines(path: Path, lines=None, **open_args):
    """``lines`` when given (left open), else ``path`` opened for reading as UTF-8 (closed on leaving); a leading
    byte-order mark (Excel writes one) is dropped rather than read into the first column's name."""
    if lines is not None:
        yield lines
    else:
        with open(path, encoding="utf-8-sig", **open_args) as handle:
            try:
                yield handle
            except UnicodeDecodeError as error:
                raise DataError(f"{path} is not UTF-8 text: {error}") from error


def _jsonl_rows(path: Path, lines=None):
    """(line number, dict) for each non-blank line of a JSONL file (or of ``lines``)."""
    # A regular JSON array ("[" alone on a line, or the whole array on one) is the likeliest wrong format: say so.
    array = ("{path}: line {number} starts a JSON array; expected JSON Lines: one JSON object per line, "
             "e.g. {{\"text\": \"...\", \"label\": \"...\"}}, without the enclosing [ ] and commas")

    def invalid(number, error):
        if error.doc.lstrip().startswith("["):
            return DataError(array.format(path=path, number=number))
        return DataError(f"{path}: line {number} is not valid JSON: {error}")
    with _open_lines(path, lines) as handle:
        for number, record in jsonl_records(handle, invalid):
            if isinstance(record, list):
                raise DataError(array.format(path=path, number=number))
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            yield number, record


def read_text_classification(path: str | Path, text_column: str = "text", label_column: str = "label", *,
                             require_labels: bool = True, lines=None) -> list[TextExample]:
    """Read texts (and labels) from a CSV/TSV file with a header row, a JSONL file, or (unlabelled) plain text.

    Args:
        path: the file (``.csv``, ``.tsv``, JSON Lines as ``.jsonl``/``.ndjson``/``.json``, or ``.txt`` / ``-``
            for one text per line, unlabelled).
        text_column, label_column: column names (CSV header) or keys (JSONL). Labels are kept as strings.
        require_labels: raise when a row has no label; when False, labels are read if the column exists.
        lines: read these lines instead of opening ``path`` (stdin for ``diffllama predict``).

    Returns:
        The examples in file order.

    Raises:
        DataError: missing file, empty file, missing column (naming the columns found), a column name given twice
            in the CSV header, a CSV row with more fields than the header, malformed CSV (a quote left open), empty
            text or label.
    """
    path = Path(path)
    examples: list[TextExample] = []
    suffix = path.suffix.lower()
    if lines is None:
        check_file(path)
    if suffix in (".csv", ".tsv"):
        with _open_lines(path, lines, newline="") as handle:
            delimiter = "\t" if suffix == ".tsv" else ","
            # strict: a quote left open raises csv.Error instead of swallowing the rest of the file into one field
            reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
            try:
                examples = _csv_examples(path, reader, delimiter, text_column, label_column, require_labels)
            except csv.Error as error:
                raise DataError(f"{path} is not valid {suffix[1:].upper()} (reading stopped at line "
                                f"{reader.reader.line_num}: {error}); a field that opens with a quote must close "
                                f"with one, and a quote inside a quoted field is written twice") from error
    elif _is_jsonl(path) or suffix == ".json":
        for number, record in _jsonl_rows(path, lines):
            if text_column not in record:
                raise DataError(f"{path}: row {number} has no {text_column!r} key; keys: {sorted(record)} "
                                f"(choose one with --text-column)")
            if require_labels and label_column not in record:
                raise DataError(f"{path}: row {number} has no {label_column!r} key; keys: {sorted(record)} "
                                f"(choose one with --label-column)")
            examples.append(_text_example(path, number, record, text_column, label_column, require_labels,
                                          label_column in record))
    else:
        if require_labels:
            raise DataError(f"{path}: labelled data must be .csv, .tsv, or JSON Lines (.jsonl, .ndjson or .json: "
                            f"one object per line), got {path.name!r}")
        with _open_lines(path, lines) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    examples.append(TextExample(line.rstrip("\n"), None, number))
    if not examples:
        raise DataError(f"{path} is empty: no data rows")
    return examples


def _csv_examples(path, reader, delimiter, text_column, label_column, require_labels) -> list[TextExample]:
    columns = reader.fieldnames or []
    if not columns:
        raise DataError(f"{path} is empty: expected a header row with columns "
                        f"{text_column!r} and {label_column!r}")
    # DictReader keeps the last of two same-named columns: the other one's values would be dropped without a word.
    repeated = sorted({name for name in columns if name.strip() and columns.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: row 0 (header) names column(s) {repeated} more than once; columns: {columns}; "
                        f"expected each column name once")
    if text_column not in columns:
        raise DataError(f"{path}: row 0 (header) has no text column {text_column!r}; columns: {columns} "
                        f"(choose one with --text-column)")
    has_labels = label_column in columns
    if require_labels and not has_labels:
        raise DataError(f"{path}: row 0 (header) has no label column {label_column!r}; columns: {columns} "
                        f"(choose one with --label-column)")
    examples = []
    for number, record in enumerate(reader, 1):
        if None in record:  # DictReader files fields beyond the header under the key None
            raise DataError(f"{path}: row {number} has {len(columns) + len(record[None])} fields but the "
                            f"header has {len(columns)} ({columns}); quote fields that contain {delimiter!r}")
        examples.append(_text_example(path, number, record, text_column, label_column,
                                      require_labels and has_labels, has_labels))
    return examples


def _text_example(path, number, record, text_column, label_column, require_label, has_label) -> TextExample:
    text = record.get(text_column)
    if text is None or not str(text).strip():
        raise DataError(f"{path}: row {number} has an empty {text_column!r}")
    label = record.get(label_column) if has_label else None
    if label is not None:
        label = str(label).strip()
        if not label:
            label = None
    if require_label and label is None:
        raise DataError(f"{path}: row {number} has an empty {label_column!r}")
    return TextExample(str(text), label, number)


def read_tagged(path: str | Path, tokens_column: str = "tokens", tags_column: str = "tags", *,
                require_tags: bool = True, lines=None) -> list[TaggedExample]:
    """Read sentences of words and tags from a CoNLL-style file or a JSONL file of token and tag lists.

    Without tags (``require_tags=False``) a CoNLL line may hold just the word, and a JSONL object just the tokens;
    plain text (``.txt`` / stdin given as ``lines``) with ``require_tags=False`` is read as one sentence per line,
    words split on whitespace.

    Returns:
        The sentences; ``row`` is the line of each sentence's first word (CoNLL) or its JSONL line.

    Raises:
        DataError: missing or empty file, a line without a tag, a missing key, token/tag lists of different length,
            an empty (or null) tag, an empty token list, a token that is not a non-empty string.
    """
    path = Path(path)
    if lines is None:
        check_file(path)
    examples: list[TaggedExample] = []
    if _is_jsonl(path) or path.suffix.lower() == ".json":
        for number, record in _jsonl_rows(path, lines):
            if tokens_column not in record:
                raise DataError(f"{path}: row {number} has no {tokens_column!r} key; keys: {sorted(record)} "
                                f"(choose one with --tokens-column)")
            words = record[tokens_column]
            tags = record.get(tags_column)
            if require_tags and tags is None:
                raise DataError(f"{path}: row {number} has no {tags_column!r} key; keys: {sorted(record)} "
                                f"(choose one with --tags-column)")
            if not isinstance(words, list) or (tags is not None and not isinstance(tags, list)):
                raise DataError(f"{path}: row {number}: {tokens_column!r} and {tags_column!r} must be lists")
            if tags is not None and len(tags) != len(words):
                raise DataError(f"{path}: row {number} has {len(words)} tokens but {len(tags)} tags")
            if tags is not None and any(t is None or not str(t).strip() for t in tags):
                raise DataError(f"{path}: row {number} has an empty tag in {tags}")
            # A word that is not text (null would become the word "None") or holds no characters has no token
            # to carry its tag: training would fail mid-run, so it is refused here.
            if not words:
                raise DataError(f"{path}: row {number} has an empty {tokens_column!r} list; expected the "
                                f"sentence's words")
            bad = [i for i, w in enumerate(words) if not isinstance(w, str) or not w.strip()]
            if bad:
                raise DataError(f"{path}: row {number}: token {bad[0] + 1} of {tokens_column!r} is "
                                f"{words[bad[0]]!r}; expected each token to be a non-empty string")
            examples.append(TaggedExample(list(words), None if tags is None else [str(t) for t in tags], number))
    elif path.suffix.lower() == ".txt" and not require_tags:
        with _open_lines(path, lines) as handle:
            for number, line in enumerate(handle, 1):
                if line.split():
                    examples.append(TaggedExample(line.split(), None, number))
    else:
        words: list[str] = []
        tags: list[str] = []
        start = 0

        def flush():
            if words:
                examples.append(TaggedExample(list(words), list(tags) if len(tags) == len(words) else None, start))
            words.clear()
            tags.clear()
        with _open_lines(path, lines) as handle:
            for number, line in enumerate(handle, 1):
                parts = line.split()
                if not parts or parts[0] == "-DOCSTART-":
                    flush()
                    continue
                if not words:
                    start = number
                if len(parts) < 2:
                    if require_tags:
                        raise DataError(f"{path}: line {number} has no tag (expected 'WORD<tab>TAG'): {line.strip()!r}")
                else:
                    tags.append(parts[-1])
                words.append(parts[0])
            flush()
    if not examples:
        raise DataError(f"{path} is empty: no sentences")
    return examples


def read_squad(path: str | Path, *, require_answers: bool = True, lines=None) -> list[QAExample]:
    """Read extractive QA examples from SQuAD-format JSON, or (for prediction) JSONL ``{question, context}``.

    Each gold answer must occur in its context: at ``answer_start`` if given (an integer, or a string or float
    holding one), else anywhere (the first occurrence is used). Rows count the questions of the file from 1, in
    order.

    Raises:
        DataError: missing/empty/invalid file, a question without ``question``/``context``, no answers (when
            required), an answer not found in its context, or not at its ``answer_start`` (naming the file, row,
            question id, the given start and the text found there).
    """
    path = Path(path)
    if lines is None:
        check_file(path)
    examples: list[QAExample] = []
    if _is_jsonl(path) or lines is not None:
        for number, record in _jsonl_rows(path, lines):
            for key in ("question", "context"):
                if not isinstance(record.get(key), str):
                    raise DataError(f"{path}: row {number} has no {key!r} string")
            answers = record.get("answers") or []
            if isinstance(answers, dict):  # {"text": [...], "answer_start": [...]} (the datasets layout)
                texts = answers.get("text") or []
                starts = answers.get("answer_start")
                if starts is None:  # no offsets: each answer's first occurrence (zip would drop every answer)
                    starts = [None] * len(texts)
                if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                    raise DataError(f"{path}: row {number}: answers 'text' {texts!r} and 'answer_start' "
                                    f"{starts!r} must be lists of the same length")
                answers = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
            examples.append(_qa_example(path, number, str(record.get("id", number)), record["question"],
                                        record["context"], answers, require_answers, record.get("depth")))
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text: {error}") from error
        if not text.strip():
            raise DataError(f"{path} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise DataError(f"{path} is not SQuAD format: expected an object with a 'data' list of articles")
        number = 0
        for article in data["data"]:
            for paragraph in article.get("paragraphs", []):
                context = paragraph.get("context")
                for qa in paragraph.get("qas", []):
                    number += 1
                    if not isinstance(context, str) or not isinstance(qa.get("question"), str):
                        raise DataError(f"{path}: row {number} (question id {qa.get('id')!r}) lacks a "
                                        f"'question' or its paragraph's 'context'")
                    examples.append(_qa_example(path, number, str(qa.get("id", number)), qa["question"], context,
                                                qa.get("answers") or [], require_answers,
                                                qa.get("depth_bucket", qa.get("depth"))))
    if not examples:
        raise DataError(f"{path} is empty: no questions")
    return examples


def _qa_example(path, number, qid, question, context, answers, require_answers, depth) -> QAExample:
    if require_answers and not answers:
        raise DataError(f"{path}: row {number} (question id {qid!r}) has no answers")
    texts, starts = [], []
    for answer in answers:
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {number} (question id {qid!r}) has an answer without text")
        given = answer.get("answer_start")
        if given is None:  # no offset given: the first occurrence
            start = context.find(text)
            if start < 0:
                raise DataError(f"{path}: row {number} (question id {qid!r}): answer {text!r} is not found in the "
                                f"context")
        else:
            # A wrong offset is refused, not searched for: the text may occur elsewhere too, and the first
            # occurrence would then train and score the model on another span than the one the data names.
            start = _answer_start(given)
            if start is None:
                raise DataError(f"{path}: row {number} (question id {qid!r}): answer {text!r} has answer_start "
                                f"{given!r}; expected a character offset (an integer >= 0)")
            found = context[start:start + len(text)]
            if found != text:
                raise DataError(f"{path}: row {number} (question id {qid!r}): answer {text!r} is not at its "
                                f"answer_start {given!r} (the context has {found!r} there); expected the offset of "
                                f"the answer's first character in the context (leave answer_start out to use its "
                                f"first occurrence)")
        texts.append(text)
        starts.append(start)
    return QAExample(qid, question, context, texts, starts, number, None if depth is None else float(depth))


def _answer_start(value) -> int | None:
    """``answer_start`` as an int (SQuAD writers give ints, some strings such as "39" or floats such as 39.0), or
    None when it is not a whole number >= 0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():  # not "³", which int() refuses
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


# ---- labels ------------------------------------------------------------------------------------------------------

def build_label_set(labels, given: list[str] | None = None) -> list[str]:
    """The label list: ``given`` (kept in its order) or the sorted distinct ``labels``.

    Raises:
        DataError: fewer than two labels.
    """
    found = list(given) if given else sorted({label for label in labels if label is not None})
    if len(found) < 2:
        raise DataError(f"need at least two distinct labels, found {found}")
    return found


def check_labels(path, rows_and_labels, label2id: dict[str, int]) -> None:
    """Raise DataError naming the file and row of the first label not in ``label2id``.

    Args:
        rows_and_labels: iterable of (row, label or list of labels).
    """
    for row, labels in rows_and_labels:
        for label in ([labels] if isinstance(labels, str) else labels or []):
            if label not in label2id:
                known = list(label2id)
                shown = known if len(known) <= 20 else known[:20] + ["..."]
                raise DataError(f"{path}: row {row}: label {label!r} is not in the label set {shown}")


# ---- encoding ----------------------------------------------------------------------------------------------------

def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to ``max_length`` (the start is kept); an empty encoding becomes [EOS]."""
    out = []
    for ids in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = ids[:max_length] or [tokenizer.eos_token_id]
        out.append(ids)
    return out


def align_words(tokenizer, words: list[str], max_length: int) -> tuple[list[int], list[int], list[bool]]:
    """Tokenize ``words`` joined by spaces; return (ids, word index of each token, is-first-sub-token flags).

    The token → word map takes the word holding each token's last character. Cut at ``max_length`` tokens.
    """
    text = " ".join(words)
    word_of_char = np.empty(max(len(text), 1), dtype=np.int64)
    position = 0
    for index, word in enumerate(words):
        word_of_char[position:position + len(word) + 1] = index  # the word and the space after it
        position += len(word) + 1
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids, offsets = ids[:max_length], offsets[:max_length]
    word_ids, first = [], []
    previous = -1
    for start, end in offsets:
        w = int(word_of_char[max(end - 1, 0)]) if end > start else previous
        word_ids.append(w)
        first.append(w != previous)
        previous = w
    return ids, word_ids, first


def answer_token_span(offsets: list[tuple[int, int]], start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last token whose character span overlaps ``[start_char, end_char)``; None when no token does."""
    first = last = None
    for i, (a, b) in enumerate(offsets):
        if b > start_char and a < end_char and b > a:
            if first is None:
                first = i
            last = i
    return None if first is None else (first, last)


@dataclass
class QAFeature:
    """One window of one QA example: ``input_ids``; ``start``/``end`` label positions (0 = not in the window);
    ``example``: index of its example; ``context_start``: position of the first context token; ``offsets``:
    character spans (in the example's context) of the window's context tokens."""

    input_ids: list[int]
    start: int
    end: int
    example: int
    context_start: int
    offsets: list[tuple[int, int]]


def encode_qa(tokenizer, examples: list[QAExample], max_length: int, stride: int) -> list[QAFeature]:
    """Windows of ``question + [EOS] + context`` of at most ``max_length`` tokens, overlapping by ``stride``.

    The question is never cut (a cut question asks something else): each window holds all of it, so a question
    may take up to ``max_length - stride - 2`` tokens.

    Raises:
        ValueError: a question leaves no room for progress (``max_length - question - 1 - stride <= 0``), naming
            its row and id.
    """
    sep = tokenizer.eos_token_id
    features: list[QAFeature] = []
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question, add_special_tokens=False)
        prefix = question + [sep]
        room = max_length - len(prefix)
        if room - stride <= 0:
            raise ValueError(f"max_length {max_length} leaves {room} context tokens per window after the "
                             f"{len(question)}-token question of row {example.row} (question id {example.qid!r}); "
                             f"that must exceed the stride {stride}: questions are kept whole, so a question may "
                             f"take at most --max-length - --stride - 2 = {max_length - stride - 2} tokens (raise "
                             f"--max-length or lower --stride)")
        ids, offsets = tokenizer.encode_with_offsets(example.context)
        span = None
        if example.answers:
            s = example.answer_starts[0]
            span = answer_token_span(offsets, s, s + len(example.answers[0]))
        begin = 0
        while True:
            window = slice(begin, begin + room)
            start = end = 0
            if span is not None and span[0] >= begin and span[1] < begin + room:
                start, end = len(prefix) + span[0] - begin, len(prefix) + span[1] - begin
            features.append(QAFeature(prefix + ids[window], start, end, index, len(prefix), offsets[window]))
            if begin + room >= len(ids):
                break
            begin += room - stride
    return features


def batch_pad_id(tokenizer, source="the tokenizer") -> int:
    """The token id that pads batches: the tokenizer's PAD, else its EOS (Llama-style tokenizers have no PAD).

    The model's ``config.pad_token_id`` must be this same id (sequence classification pools the last token that is
    not ``config.pad_token_id``); :class:`~diffllama.finetune.run.FineTuneTrainer` and
    :func:`~diffllama.finetune.predict.load_for_task` set it on the model.

    Raises:
        ValueError: the tokenizer has neither (``source`` names it in the message).
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{source} has neither a pad nor an EOS token to pad batches with")
    return pad


def right_pad(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad int sequences to the longest: (B, S_max) int64 tensor filled with ``pad_id`` (-100 for label
    rows, which :func:`diffllama.generation.pad_batch`'s ids-and-mask padding is not made for)."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Features:
    """An indexable set of encoded examples with a collate function: what the trainer's batch plan draws from.

    Args:
        items: encoded features (any objects). collate: ``collate(list of items) -> (inputs, targets)`` tensors.
    """

    def __init__(self, items: list, collate) -> None:
        self.items = items
        self.collate = collate

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``collate([items[i] for i in indices])``: (inputs (B, S) int64, targets) on CPU."""
        return self.collate([self.items[int(i)] for i in indices])
