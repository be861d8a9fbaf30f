"""The three fine-tuning tasks as parameters of one training loop: how to read and encode the data, which head
class to load, how to compute the loss, how to predict and how to score.

A :class:`Task` is handed to :class:`diffllama.finetune.run.FineTuneTrainer` (a :class:`diffllama.train.loop.Trainer`
that takes its data and model from the task); nothing else differs between tasks. Loss contract (the trainer's):
``task.loss(model, inputs, targets, scale)`` returns ``scale × Σ per-target losses``, where the trainer counts
targets as ``(targets != -100).sum()`` over the global batch — so the gradient is that of the mean over labelled
targets however the batch is split over micro-batches and ranks:

- ``sequence-classification``: targets (B,) class ids; one cross-entropy per text.
- ``token-classification``: targets (B, S), -100 except on each word's first sub-token.
- ``question-answering``: targets (B, 2) start/end positions; the loss sums the start and end cross-entropies,
  and the 2 targets per window make it their mean, as transformers' QA head does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffllama.finetune import data as D
from diffllama.finetune import metrics as M
from diffllama.modeling import (DiffLlamaForQuestionAnswering, DiffLlamaForSequenceClassification,
                                DiffLlamaForTokenClassification)


@dataclass
class TaskOptions:
    """Data settings shared by the tasks (each task reads the ones it needs).

    text_column/label_column: CSV/JSONL names (classification). tokens_column/tags_column: JSONL keys (tagging).
    labels: the label set in order (default: the sorted labels of the training data); each label non-empty and
    given once (else ValueError).
    max_length: tokens per sequence (window, for QA), >= 1. stride: overlap of QA windows, in tokens, >= 0.
    max_answer_tokens: longest predicted answer span (QA), >= 1. A bad number is a ValueError naming the field
    (and its command-line flag) before any work; :class:`QuestionAnswering` also needs ``max_length >= stride + 3``.
    """

    text_column: str = "text"
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    labels: list[str] | None = None
    max_length: int = 256
    stride: int = 64
    max_answer_tokens: int = 30

    def __post_init__(self) -> None:
        for name, flag, least, meaning in (
                ("max_length", "--max-length", 1, "a positive number of tokens per sequence"),
                ("stride", "--stride", 0, ">= 0 (overlap in tokens of consecutive QA context windows)"),
                ("max_answer_tokens", "max_answer_tokens", 1, "a positive number of tokens (longest QA answer)")):
            value = getattr(self, name)
            # bool is an int to Python, and True would quietly mean 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                shown = name if flag == name else f"{flag} ({name})"
                raise ValueError(f"{shown} must be {meaning}, got {value!r}")
        # A repeated label would get two ids but one label2id entry (the saved id2label and label2id disagree);
        # an empty one comes from a stray comma. Refused here, before any data is read.
        if self.labels is not None:
            labels = list(self.labels)
            for index, label in enumerate(labels):
                if not isinstance(label, str) or not label.strip():
                    raise ValueError(f"--labels: label {index + 1} of {labels} is empty; give each label once, "
                                     f"separated by single commas")
                if label in labels[:index]:
                    raise ValueError(f"--labels: label {label!r} is given more than once in {labels}; give each "
                                     f"label once")
            self.labels = labels


class Task:
    """Base class: a fine-tuning task. Subclasses set ``name``, ``model_class`` and ``has_labels`` (whether the head
    predicts from a label set: config.json's ``id2label``)."""

    name = ""
    model_class = None
    has_labels = True

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()

    # reading ----------------------------------------------------------------------------------------------------
    def read(self, path, *, labelled: bool = True, lines=None) -> list:
        """Examples of ``path`` (or of ``lines``). Raises :class:`DataError` for bad data."""
        raise NotImplementedError

    def example_labels(self, examples) -> list[tuple[int, object]]:
        """(row, label or list of labels) of each labelled example."""
        return []

    def label_set(self, train_examples) -> list[str] | None:
        """The ordered label list (None for QA)."""
        labels = [label for _, value in self.example_labels(train_examples)
                  for label in ([value] if isinstance(value, str) else value)]
        return D.build_label_set(labels, self.options.labels)

    def check(self, path, examples, label2id) -> None:
        """Raise :class:`DataError` (file, row) for a label outside ``label2id``."""
        if label2id is not None:
            D.check_labels(path, self.example_labels(examples), label2id)

    # encoding and loss --------------------------------------------------------------------------------------------
    def encode(self, tokenizer, examples, label2id) -> D.Features:
        """Encoded features whose ``batch(indices)`` gives (inputs (B, S) int64, targets)."""
        raise NotImplementedError

    def forward(self, model, inputs: torch.Tensor) -> torch.Tensor:
        """The head's raw output for (B, S) ``inputs``: float logits (see subclasses for the shape)."""
        raise NotImplementedError

    def loss(self, model, inputs, targets, scale) -> torch.Tensor:
        """``scale × Σ`` per-target cross-entropy, a float32 scalar."""
        raise NotImplementedError

    # prediction and scoring ----------------------------------------------------------------------------------------
    def predict(self, forward, tokenizer, examples, id2label, batch_size: int, device) -> list:
        """Predictions for ``examples``; ``forward(inputs (B, S) on device) -> logits`` runs the model."""
        raise NotImplementedError

    def score(self, examples, predictions) -> dict:
        """Metrics of ``predictions`` against the examples' gold labels."""
        raise NotImplementedError

    def baseline(self, train_examples, eval_examples) -> dict:
        """The trivial baseline on the evaluation examples (majority class / tag / answer)."""
        raise NotImplementedError

    def is_labelled(self, example) -> bool:
        """Whether ``example`` carries its gold label (tags, answers), so it can be scored."""
        raise NotImplementedError

    def output_record(self, example, prediction: dict) -> dict:
        """The JSON-ready record ``diffllama predict`` prints: the example's identity and its prediction."""
        return {"row": example.row, **prediction}

    @staticmethod
    def _batched(features, batch_size, forward, device):
        for start in range(0, len(features), batch_size):
            inputs, _ = features.batch(range(start, min(start + batch_size, len(features))))
            yield start, forward(inputs.to(device)).float().cpu()


class SequenceClassification(Task):
    """Text → one label. Model: :class:`DiffLlamaForSequenceClassification` (pools the last non-pad token).
    Data: CSV/TSV/JSONL with text and label columns. Metrics: accuracy, macro-F1, per-label F1."""

    name = "sequence-classification"
    model_class = DiffLlamaForSequenceClassification

    def read(self, path, *, labelled=True, lines=None):
        return D.read_text_classification(path, self.options.text_column, self.options.label_column,
                                          require_labels=labelled, lines=lines)

    def example_labels(self, examples):
        return [(e.row, e.label) for e in examples if e.label is not None]

    def encode(self, tokenizer, examples, label2id):
        ids = D.encode_texts(tokenizer, [e.text for e in examples], self.options.max_length)
        labels = [label2id[e.label] if (label2id and e.label is not None) else -100 for e in examples]
        pad = D.batch_pad_id(tokenizer)

        def collate(items):  # -> (B, S) ids, (B,) labels
            return D.right_pad([i for i, _ in items], pad), torch.tensor([y for _, y in items], dtype=torch.long)
        return D.Features(list(zip(ids, labels)), collate)

    def forward(self, model, inputs):
        return model(inputs, use_cache=False).logits  # (B, C)

    def loss(self, model, inputs, targets, scale):
        logits = self.forward(model, inputs).float()
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") * scale

    def predict(self, forward, tokenizer, examples, id2label, batch_size, device):
        """Returns ``[{"label": str, "scores": {label: probability}}]``."""
        features = self.encode(tokenizer, examples, None)
        out = []
        for _, logits in self._batched(features, batch_size, forward, device):
            probs = logits.softmax(-1)
            for row in probs:
                out.append({"label": id2label[int(row.argmax())],
                            "scores": {id2label[i]: round(float(p), 6) for i, p in enumerate(row)}})
        return out

    def score(self, examples, predictions):
        return M.classification_metrics([e.label for e in examples], [p["label"] for p in predictions])

    def is_labelled(self, example):
        return example.label is not None

    def output_record(self, example, prediction):
        return {"row": example.row, "text": example.text, **prediction}

    def baseline(self, train_examples, eval_examples):
        return {"majority_accuracy": M.majority_baseline([e.label for e in train_examples],
                                                         [e.label for e in eval_examples])}


class TokenClassification(Task):
    """Words → one tag each. Model: :class:`DiffLlamaForTokenClassification`. Data: CoNLL-style or JSONL token/tag
    lists; first sub-token labelled, the rest -100. Metrics: token accuracy (over words), per-tag F1."""

    name = "token-classification"
    model_class = DiffLlamaForTokenClassification

    def read(self, path, *, labelled=True, lines=None):
        return D.read_tagged(path, self.options.tokens_column, self.options.tags_column, require_tags=labelled,
                             lines=lines)

    def example_labels(self, examples):
        return [(e.row, e.tags) for e in examples if e.tags is not None]

    def encode(self, tokenizer, examples, label2id):
        items = []
        for e in examples:
            ids, word_ids, first = D.align_words(tokenizer, e.words, self.options.max_length)
            labels = [label2id[e.tags[w]] if (f and label2id and e.tags is not None) else -100
                      for w, f in zip(word_ids, first)]
            items.append((ids, labels, word_ids, first))
        pad = D.batch_pad_id(tokenizer)

        def collate(batch):  # -> (B, S) ids, (B, S) labels with -100 on padding and non-first sub-tokens
            return D.right_pad([b[0] for b in batch], pad), D.right_pad([b[1] for b in batch], -100)
        return D.Features(items, collate)

    def forward(self, model, inputs):
        return model(inputs, use_cache=False).logits  # (B, S, C)

    def loss(self, model, inputs, targets, scale):
        logits = self.forward(model, inputs).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") * scale

    def predict(self, forward, tokenizer, examples, id2label, batch_size, device):
        """Returns ``[{"words": [...], "tags": [tag or None per word]}]`` (None: word cut by max_length)."""
        features = self.encode(tokenizer, examples, None)
        out = []
        for start, logits in self._batched(features, batch_size, forward, device):
            best = logits.argmax(-1)  # (B, S)
            for j in range(best.shape[0]):
                example = examples[start + j]
                _, _, word_ids, first = features.items[start + j]
                tags = [None] * len(example.words)
                for position, (w, f) in enumerate(zip(word_ids, first)):
                    if f:
                        tags[w] = id2label[int(best[j, position])]
                out.append({"words": example.words, "tags": tags})
        return out

    def score(self, examples, predictions):
        return M.tagging_metrics([e.tags for e in examples], [p["tags"] for p in predictions])

    def is_labelled(self, example):
        return example.tags is not None

    def baseline(self, train_examples, eval_examples):
        tags = Counter(t for e in train_examples for t in e.tags)
        top = tags.most_common(1)[0][0]
        flat = [t for e in eval_examples for t in e.tags]
        return {"majority_tag": top, "majority_token_accuracy": sum(t == top for t in flat) / max(len(flat), 1)}


class QuestionAnswering(Task):
    """Question + context → answer span. Model: :class:`DiffLlamaForQuestionAnswering`. Data: SQuAD-format JSON
    (or JSONL question/context for prediction); long contexts in overlapping windows. Metrics: exact match and
    token F1 (SQuAD normalisation), by insertion depth when the questions carry one."""

    name = "question-answering"
    model_class = DiffLlamaForQuestionAnswering
    has_labels = False

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        if o.max_length < o.stride + 3:  # checked here: only the QA windows use the stride
            raise ValueError(f"--max-length (max_length) must be at least --stride + 3 = {o.stride + 3} "
                             f"for question-answering (each window holds the question, a separator and more than "
                             f"--stride context tokens), got {o.max_length}")

    def read(self, path, *, labelled=True, lines=None):
        return D.read_squad(path, require_answers=labelled, lines=lines)

    def label_set(self, train_examples):
        return None

    def encode(self, tokenizer, examples, label2id):
        o = self.options
        features = D.encode_qa(tokenizer, examples, o.max_length, o.stride)
        pad = D.batch_pad_id(tokenizer)

        def collate(batch):  # -> (B, S) ids, (B, 2) start/end positions
            return (D.right_pad([f.input_ids for f in batch], pad),
                    torch.tensor([[f.start, f.end] for f in batch], dtype=torch.long))
        return D.Features(features, collate)

    def forward(self, model, inputs):
        out = model(inputs, use_cache=False)
        return torch.stack([out.start_logits, out.end_logits], -1)  # (B, S, 2)

    def loss(self, model, inputs, targets, scale):
        logits = self.forward(model, inputs).float()
        start = F.cross_entropy(logits[..., 0], targets[:, 0], reduction="sum")
        end = F.cross_entropy(logits[..., 1], targets[:, 1], reduction="sum")
        return (start + end) * scale

    def predict(self, forward, tokenizer, examples, id2label, batch_size, device, top_k: int = 20):
        """Returns ``[{"answer": str, "score": float or None, "start": char, "end": char}]``: the best
        ``start_logit + end_logit`` over every window, with start <= end < start + max_answer_tokens. When no span
        fits (an empty context) the answer is "", the score None (JSON null: -inf is not valid JSON) and start/end
        -1."""
        features = self.encode(tokenizer, examples, None)
        best = [{"answer": "", "score": None, "start": -1, "end": -1} for _ in examples]
        for first, logits in self._batched(features, batch_size, forward, device):
            for j in range(logits.shape[0]):
                f = features.items[first + j]
                n = len(f.offsets)
                s_logits = logits[j, f.context_start:f.context_start + n, 0]
                e_logits = logits[j, f.context_start:f.context_start + n, 1]
                k = min(top_k, n)
                starts = s_logits.topk(k).indices.tolist()
                ends = e_logits.topk(k).indices.tolist()
                for s in starts:
                    for e in ends:
                        if s <= e < s + self.options.max_answer_tokens:
                            score = float(s_logits[s] + e_logits[e])
                            if best[f.example]["score"] is None or score > best[f.example]["score"]:
                                context = examples[f.example].context
                                a, b = f.offsets[s][0], f.offsets[e][1]
                                while a < b and context[a].isspace():
                                    a += 1
                                best[f.example] = {"answer": context[a:b], "score": score, "start": a, "end": b}
        return best

    def score(self, examples, predictions):
        groups = None
        if examples and all(e.depth is not None for e in examples):
            groups = [f"{e.depth:.2f}" for e in examples]
        out = M.qa_metrics([e.answers for e in examples], [p["answer"] for p in predictions], groups)
        if groups is not None:
            out["by_depth"] = out.pop("by_group")
        return out

    def is_labelled(self, example):
        return bool(example.answers)

    def output_record(self, example, prediction):
        return {"row": example.row, "id": example.qid, "question": example.question, **prediction}

    def baseline(self, train_examples, eval_examples):
        top = Counter(e.answers[0] for e in train_examples).most_common(1)[0][0]
        return {"majority_answer_exact_match": M.qa_metrics([e.answers for e in eval_examples],
                                                            [top] * len(eval_examples))["exact_match"]}


TASKS = {t.name: t for t in (SequenceClassification, TokenClassification, QuestionAnswering)}


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    """The task called ``name`` (``sequence-classification``, ``token-classification``, ``question-answering``).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](options)
