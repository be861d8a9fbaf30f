"""Prediction with a fine-tuned checkpoint: ``diffllama predict TASK --model DIR [FILE|-]``.

Input: a file in the task's format (labels optional), or ``-`` for standard input — plain text lines (one text per
line for classification, one sentence of whitespace-separated words per line for tagging) or JSONL (objects with
the configured keys; ``{"question", "context"}`` for QA). Output: one JSON object per example, in input order.
When every input example carries gold labels, metrics are computed as well; a gold label outside the model's label
set is refused (naming the file, or ``<stdin>``, and the row), as ``diffllama finetune`` refuses it. Input must be
UTF-8 (a byte-order mark is dropped). Batches are padded with the id the model pools on (set on the loaded model),
so predictions do not depend on ``batch_size``. A QA example without any answer span (an empty context) gets
``{"answer": "", "score": null, "start": -1, "end": -1}``: the output is strict JSON.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffllama.config import MODEL_TYPE, architecture_name
from diffllama.hub import resolve_checkpoint_dir
from diffllama.io import atomic_write_text
from diffllama.tokenizer import Tokenizer
from diffllama.finetune.data import DataError, batch_pad_id
from diffllama.finetune.tasks import Task, TaskOptions


def load_for_task(task: Task, model_dir, *, device="cpu", dtype=None):
    """(model in eval mode, tokenizer, id2label or None) of a fine-tuned checkpoint directory; the model's
    ``config.pad_token_id`` is set to the id batches are padded with (:func:`~diffllama.finetune.data.batch_pad_id`).

    Raises:
        FileNotFoundError / ValueError: from the checkpoint and tokenizer loaders.
    """
    import warnings

    tokenizer = Tokenizer.from_pretrained(model_dir)
    # Batches are padded with this id; the model must pool on the same one (see batch_pad_id), also for a
    # checkpoint whose config says otherwise, so that a prediction does not depend on the batch it is in.
    pad_id = batch_pad_id(tokenizer, f"the tokenizer of --model {model_dir}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the new-weights warning: refused below instead
        model = task.model_class.from_pretrained(model_dir, device=device, dtype=dtype, pad_token_id=pad_id).eval()
    new = list(getattr(model, "loading_report", {}).get("new") or [])
    if new:
        raise ValueError(f"--model {model_dir} lacks the {task.name} head's weights ({', '.join(new)} would be "
                         f"random); predict {task.name} needs a checkpoint written by "
                         f"`diffllama finetune {task.name}`")
    id2label = model.config.id2label if task.has_labels else None
    if task.has_labels and not id2label:
        raise ValueError(f"--model {model_dir}: config.json has no id2label label names; predict {task.name} "
                         f"needs a checkpoint written by `diffllama finetune {task.name}`")
    return model, tokenizer, id2label


@dataclass
class CheckpointInfo:
    """What :func:`check_checkpoint` learns from a fine-tuned checkpoint: its ``directory``; its ``labels``
    (``id2label`` in id order; None for QA or a config without one); ``settings``: the
    :class:`~diffllama.finetune.tasks.TaskOptions` fields it was fine-tuned with (``max_length``, ``stride``,
    ``max_answer_tokens``, from its ``train_config.yaml``; empty for a checkpoint not written by
    ``diffllama finetune``)."""

    directory: Path
    labels: list[str] | None
    settings: dict


def check_checkpoint(task: Task, model_dir) -> CheckpointInfo:
    """Check that ``model_dir``'s config.json ``architectures`` names the task's head class (a checkpoint without
    ``architectures`` passes here; :func:`load_for_task` still refuses one whose head weights are missing) and
    return its directory, label set and recorded settings (:class:`CheckpointInfo`): predicting with another
    ``max_length``/``stride`` than the model was fine-tuned with would cut texts and windows differently, and gold
    labels outside its label set cannot be predicted.

    Raises:
        FileNotFoundError / NotADirectoryError: no such checkpoint. ValueError: another model class, an
        unreadable config.json or train_config.yaml, an ``id2label`` whose keys are not label ids.
    """
    try:
        directory = resolve_checkpoint_dir(model_dir)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise type(error)(f"--model: {error}") from None
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--model {model_dir} has no config.json; expected a checkpoint directory written "
                                f"by `diffllama finetune {task.name}`")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--model {model_dir}: cannot read config.json: {error}") from error
    architectures = config.get("architectures") if isinstance(config, dict) else None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    # The class name config.json lists depends on the architecture (LlamaForSequenceClassification, ...)
    expected = architecture_name(task.model_class.__name__, model_type if isinstance(model_type, str) else MODEL_TYPE)
    if architectures and expected not in architectures:
        raise ValueError(f"--model {model_dir} holds a {', '.join(map(str, architectures))}; predict {task.name} "
                         f"needs a checkpoint written by `diffllama finetune {task.name}` ({expected})")
    id2label = config.get("id2label") if isinstance(config, dict) else None
    labels = None
    if task.has_labels and isinstance(id2label, dict):
        try:
            labels = [id2label[key] for key in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            raise ValueError(f"--model {model_dir}: config.json's id2label {id2label!r} must map label ids "
                             f"(integers) to label names") from None
    return CheckpointInfo(directory, labels, _recorded_settings(task, model_dir, directory))


# TaskOptions field <- the name diffllama finetune records it under in train_config.yaml
_RECORDED = {"max_length": "seq_len", "stride": "stride", "max_answer_tokens": "max_answer_tokens"}


def _recorded_settings(task: Task, model_dir, directory: Path) -> dict:
    """The TaskOptions fields recorded in ``directory/train_config.yaml`` by a ``diffllama finetune TASK`` run
    (every checkpoint and RUN_DIR/model carry it); {} without the file or for a run of another kind."""
    import yaml

    path = directory / "train_config.yaml"
    if not path.is_file():
        return {}
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"--model {model_dir}: cannot read train_config.yaml (the settings it was fine-tuned "
                         f"with): {' '.join(str(error).split())}") from error  # YAML's message spans lines
    if not isinstance(saved, dict) or saved.get("task") != task.name:  # e.g. a `diffllama train` checkpoint
        return {}
    recorded = {field: saved[key] for field, key in _RECORDED.items() if saved.get(key) is not None}
    try:  # a damaged record must not be blamed on a flag the user did not give
        TaskOptions(**recorded)
    except ValueError as error:
        raise ValueError(f"--model {model_dir}: its train_config.yaml records a bad setting: {error}") from None
    return recorded


def read_input(task: Task, source: str, stdin_text: str | bytes | None = None) -> list:
    """Examples from ``source`` (a path) or, for ``-``, from ``stdin_text``; labels optional, but a gold label must
    be in ``task.options.labels`` when that is set (the model's: :attr:`CheckpointInfo.labels`).

    Args:
        stdin_text: standard input as bytes (decoded as UTF-8 here) or as text; text read with Python's
            ``surrogateescape`` (its default under the C/POSIX locale) keeps undecodable bytes, which are refused
            here like those of a file.

    Raises:
        DataError: bad or empty input, input that is not UTF-8, a gold label outside the label set (names the
            file, or ``<stdin>``, and the row).
    """
    if source != "-":
        name, lines = Path(source), None
    else:
        text = _decode_stdin(stdin_text or "")
        first = next((line for line in text.splitlines() if line.strip()), "")
        name = Path("<stdin>.jsonl" if first.lstrip().startswith("{") else "<stdin>.txt")  # the suffix: the format
        lines = io.StringIO(text, newline=None)  # universal newlines, as for a file: CRLF ends a line
    labels = task.options.labels
    try:
        examples = task.read(name, labelled=False, lines=lines)
        task.check(name, examples, None if labels is None else {label: i for i, label in enumerate(labels)})
    except DataError as error:  # the messages name standard input "<stdin>", not the format-picking file name
        if lines is None:
            raise
        raise DataError(str(error).replace(str(name), "<stdin>")) from None
    return examples


def _decode_stdin(data: str | bytes) -> str:
    """Standard input as text, or DataError naming ``<stdin>`` when it is not UTF-8 (a leading BOM is dropped)."""
    try:
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8-sig")
    except UnicodeError as error:
        raise DataError(f"<stdin> is not UTF-8 text: {error}") from None


def predict(task: Task, model_dir, examples: list, *, batch_size: int = 16, device: str = "cpu") -> list:
    """Predictions for ``examples`` (the task's dicts: label + scores, tags per word, or answer spans).

    Raises:
        ValueError: ``batch_size`` < 1, or a checkpoint without the task's head (see :func:`load_for_task`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, tokenizer, id2label = load_for_task(task, model_dir, device=device)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return task.forward(model, inputs)
    return task.predict(forward, tokenizer, examples, id2label, batch_size, torch.device(device))


def write_metrics(path, scores: dict) -> None:
    """Write ``scores`` as JSON to ``path`` atomically (:func:`diffllama.io.atomic_write_text`)."""
    atomic_write_text(Path(path), json.dumps(scores, indent=2) + "\n")


def output_records(task: Task, examples: list, predictions: list) -> list[dict]:
    """JSON-ready records pairing each example's identity with its prediction."""
    return [task.output_record(example, prediction) for example, prediction in zip(examples, predictions)]


def gold_metrics(task: Task, examples: list, predictions: list) -> dict | None:
    """Metrics when every example has gold labels, else None."""
    if examples and all(task.is_labelled(e) for e in examples):
        return task.score(examples, predictions)
    return None
