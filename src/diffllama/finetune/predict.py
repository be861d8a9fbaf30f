"""Prediction with a fine-tuned checkpoint: ``diffllama predict TASK --model DIR [FILE|-]``.

Input: a file in the task's format (labels optional), or ``-`` for standard input — plain text lines (one text per
line for classification, one sentence of whitespace-separated words per line for tagging) or JSONL (objects with
the configured keys; ``{"question", "context"}`` for QA). Output: one JSON object per example, in input order.
When every input example carries gold labels, metrics are computed as well.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from diffllama.finetune.tasks import Task


def load_for_task(task: Task, model_dir, *, device="cpu", dtype=None):
    """(model in eval mode, tokenizer, id2label or None) of a fine-tuned checkpoint directory.

    Raises:
        FileNotFoundError / ValueError: from the checkpoint and tokenizer loaders.
    """
    from diffllama.tokenizer import Tokenizer

    model = task.model_class.from_pretrained(model_dir, device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    id2label = model.config.id2label if task.model_class.__name__ != "DiffLlamaForQuestionAnswering" else None
    return model, tokenizer, id2label


def read_input(task: Task, source: str, stdin_text: str | None = None) -> list:
    """Examples from ``source`` (a path) or, for ``-``, from ``stdin_text``; labels optional.

    Raises:
        DataError: bad or empty input (names the file and row).
    """
    if source != "-":
        return task.read(Path(source), labelled=False)
    text = stdin_text or ""
    first = next((line for line in text.splitlines() if line.strip()), "")
    name = "<stdin>.jsonl" if first.lstrip().startswith("{") else "<stdin>.txt"
    return task.read(Path(name), labelled=False, lines=io.StringIO(text))


def predict(task: Task, model_dir, examples: list, *, batch_size: int = 16, device: str = "cpu") -> list:
    """Predictions for ``examples`` (the task's dicts: label + scores, tags per word, or answer spans)."""
    model, tokenizer, id2label = load_for_task(task, model_dir, device=device)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return task.forward(model, inputs)
    return task.predict(forward, tokenizer, examples, id2label, batch_size, torch.device(device))


def output_records(task: Task, examples: list, predictions: list) -> list[dict]:
    """JSON-ready records pairing each example's identity with its prediction."""
    records = []
    for example, prediction in zip(examples, predictions):
        if task.name == "sequence-classification":
            records.append({"row": example.row, "text": example.text, **prediction})
        elif task.name == "token-classification":
            records.append({"row": example.row, **prediction})
        else:
            records.append({"row": example.row, "id": example.qid, "question": example.question, **prediction})
    return records


def gold_metrics(task: Task, examples: list, predictions: list) -> dict | None:
    """Metrics when every example has gold labels, else None."""
    labelled = {"sequence-classification": lambda e: e.label is not None,
                "token-classification": lambda e: e.tags is not None,
                "question-answering": lambda e: bool(e.answers)}[task.name]
    if examples and all(labelled(e) for e in examples):
        return task.score(examples, predictions)
    return None
