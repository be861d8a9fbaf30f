"""``RUN_DIR/metrics.jsonl``: one JSON object per line, each with its ``step``, read back by ``--resume`` and
``diffllama plot``."""

from __future__ import annotations

import json
from pathlib import Path

from diffllama.train.data import jsonl_records

NUMBERS = ("loss", "val_loss", "lr")  # fields the run writes as numbers and the plot draws


def read_metrics_file(path: str | Path) -> tuple[list[dict], str | None]:
    """The records of a metrics file, in file order, and a note when its last line was cut short (else None).

    The run appends one line per record, so a process killed mid-write (SIGKILL, the OOM killer) can leave a
    partial last line without its newline: that line is left out, and the note says so. Anything else that is not a
    record is an error.

    Raises:
        ValueError: naming the file and line: text that is not UTF-8, a line that is not JSON, not an object, without
            an integer ``step`` >= 0, or with a non-numeric ``loss``, ``val_loss`` or ``lr``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is damaged: byte offset {error.start} is not UTF-8 text") from error
    lines = text.splitlines()
    note = None
    if lines and not text.endswith("\n") and not _is_json(lines[-1]):
        note = (f"note: the last line of {path} (line {len(lines)}) is cut short (by a run killed while writing it, "
                f"or one still writing it); it is left out")
        lines = lines[:-1]

    def invalid(number, error):
        return ValueError(f"{path}:{number}: not JSON ({error}); fix or delete that line")

    records = [_check_record(record, f"{path}:{number}") for number, record in jsonl_records(lines, invalid)]
    return records, note


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _check_record(record, where: str) -> dict:
    """``record`` when it is a metrics record; else ValueError naming ``where`` (file:line)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'step', got {record!r}; fix or delete that line")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        got = f"got {step!r}" if "step" in record else "it is missing"
        raise ValueError(f"{where}: 'step' must be an integer >= 0, {got}; fix or delete that line")
    for name in NUMBERS:
        value = record.get(name, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: {name!r} must be a number, got {value!r}; fix or delete that line")
    return record
