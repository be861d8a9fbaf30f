"""Fine-tuning the task heads on labelled data: ``diffllama finetune`` / ``diffllama predict``.

- :mod:`diffllama.finetune.data`: readers (CSV/JSONL text+label, CoNLL/JSONL tags, SQuAD JSON) and encoders;
- :mod:`diffllama.finetune.tasks`: the three tasks as parameters of the one training loop;
- :mod:`diffllama.finetune.run`: :class:`FineTuneTrainer`, the training loop's Trainer fed by a task;
- :mod:`diffllama.finetune.metrics`: accuracy/macro-F1, token accuracy/per-tag F1, exact match/token F1;
- :mod:`diffllama.finetune.predict`: prediction with a fine-tuned checkpoint;
- :mod:`diffllama.finetune.retrieval`: the key-information-retrieval QA set built from real text.
"""

from diffllama.finetune.data import DataError
from diffllama.finetune.tasks import TASKS, Task, TaskOptions, get_task

__all__ = ["DataError", "TASKS", "Task", "TaskOptions", "get_task"]
