"""Fine-tuning with the training loop: :class:`FineTuneTrainer` is :class:`diffllama.train.loop.Trainer` with its
data, model and evaluation taken from a :class:`diffllama.finetune.tasks.Task`.

Everything else is the pretraining loop's: the step function (micro-batches, loss normalised by the global count of
labelled targets, gradient clipping, AdamW, warm-up + cosine), the driver (tqdm progress bar, ``metrics.jsonl``,
evaluation every ``eval_every`` steps, atomic checkpoints with optimizer/RNG state, ``--resume``, SIGINT/SIGTERM
saves), bf16 autocast on CUDA, DDP/FSDP2 under torchrun. Each checkpoint and the final ``RUN_DIR/model`` are
complete model directories: config.json (with ``id2label``/``label2id`` for the classification heads) +
safetensors + tokenizer, loadable by this library's head classes and by transformers' matching Auto classes.

The run's settings, with the task, model, data files (their paths, sizes and SHA-256 digests) and task options
(:class:`FineTuneConfig`), are saved in ``RUN_DIR/config.yaml`` and every checkpoint; ``--resume`` refuses any of
them that changed.

Evaluation runs the whole evaluation set on every rank through the wrapped module (identical work per rank, so it
is correct under DDP and FSDP alike; evaluation sets are small next to training).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffllama.config import DiffLlamaConfig
from diffllama.io import atomic_write_text
from diffllama.finetune.data import DataError, batch_pad_id, check_file
from diffllama.finetune.tasks import Task
from diffllama.hf_format import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from diffllama.run_folder import latest_checkpoint
from diffllama.tokenizer import Tokenizer
from diffllama.train import checkpoint as ckpt
from diffllama.train.config import TrainConfig, resolve_config, resume_conflicts
from diffllama.train.data import file_sha256
from diffllama.train.loop import FitResult, Trainer

FINETUNE_DEFAULTS = dict(max_steps=300, batch_size=16, grad_accum=1, lr=2e-4, warmup_steps=30, min_lr_ratio=0.1,
                         weight_decay=0.0, eval_every=100, log_every=10, save_every=0, keep_last=1,
                         tensorboard=False)
# The TrainConfig fields that ``diffllama finetune`` takes as flags (derived from the fields, their help from
# diffllama.train.config.FLAG_HELP with the default above); the others keep FINETUNE_DEFAULTS' or the tiny preset's.
FINETUNE_FLAGS = ("max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "eval_every",
                  "save_every", "seed", "device", "dtype", "parallel", "num_threads")


def finetune_config(overrides: dict | None = None) -> TrainConfig:
    """A :class:`TrainConfig` for fine-tuning: :data:`FINETUNE_DEFAULTS` < ``overrides`` (None values skipped).

    Raises:
        ValueError: unknown keys or bad values (from :func:`diffllama.train.config.resolve_config`).
    """
    settings = dict(FINETUNE_DEFAULTS)
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return resolve_config("tiny", overrides=settings)


@dataclass
class FineTuneConfig(TrainConfig):
    """A :class:`TrainConfig` that also records what a fine-tuning run learns from: the task, the pretrained
    ``base_model``, the data files (absolute paths; ``eval_data`` None = held out of ``train_data``) and the
    :class:`~diffllama.finetune.tasks.TaskOptions` (``seq_len`` is ``max_length``). Saved with the rest in
    ``RUN_DIR/config.yaml`` and every checkpoint's ``train_config.yaml``, so that ``--resume`` refuses a change
    (:func:`~diffllama.train.config.resume_conflicts` compares every field)."""

    task: str | None = None
    base_model: str | None = None
    train_data: str | None = None
    eval_data: str | None = None
    test_data: str | None = None
    labels: list[str] | None = None
    text_column: str | None = None
    label_column: str | None = None
    tokens_column: str | None = None
    tags_column: str | None = None
    stride: int | None = None
    max_answer_tokens: int | None = None
    eval_fraction: float | None = None
    # {"train"/"eval"/"test": {"size": bytes, "sha256": hex}}: the paths alone miss a file edited in place
    data_fingerprint: dict | None = None


# The finetune flag of each setting a resumed run could differ in (others keep their TrainConfig names).
RESUME_FLAGS = {"task": "TASK", "base_model": "--model", "train_data": "--data", "eval_data": "--eval-data",
                "test_data": "--test-data", "labels": "--labels", "text_column": "--text-column",
                "label_column": "--label-column", "tokens_column": "--tokens-column", "tags_column": "--tags-column",
                "stride": "--stride", "seq_len": "--max-length", "lr": "--lr", "warmup_steps": "--warmup-steps",
                "weight_decay": "--weight-decay", "seed": "--seed", "batch_size": "--batch-size",
                "grad_accum": "--grad-accum"}


def resume_command(task_name: str, flags: dict) -> str:
    """The ``diffllama finetune`` command line that resumes a run, for the hint printed after an interruption:
    ``flags`` maps each flag (``"--data"``) to the value it was given (None: not given, left out); values are
    shell-quoted and ``--resume`` is added. Following the hint must give the settings the checkpoint fixes, which
    ``--resume`` checks, so the hint carries every flag that was given."""
    words = ["diffllama", "finetune", task_name]
    for flag, value in flags.items():
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words + ["--resume"])


# The flag of each data file, by its role.
DATA_FLAGS = {"train": "--data", "eval": "--eval-data", "test": "--test-data"}


def data_fingerprint(paths: dict) -> dict:
    """``{role: {"size": bytes, "sha256": hex digest}}`` of each data file in ``paths`` (role -> Path or None).

    Raises:
        DataError: a path that is missing or a directory (naming it).
    """
    out = {}
    for role, path in paths.items():
        if path is None:
            continue
        check_file(path)
        out[role] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


class _ScoringInterrupted(Exception):
    """SIGINT/SIGTERM during the final scoring (raised by the handler that :meth:`FineTuneTrainer._interruptible`
    installs), carrying the signal's name."""


class TaskModule(nn.Module):
    """The head model plus its task's loss: ``forward(inputs (B, S) int64, targets, scale)`` returns
    ``scale × Σ loss`` (float32 scalar); with ``targets=None`` it returns the task's raw logits."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, scale=1.0) -> torch.Tensor:
        if targets is None:
            return self.task.forward(self.model, inputs)
        return self.task.loss(self.model, inputs, targets, scale)


class FineTuneTrainer(Trainer):
    """A :class:`Trainer` whose data, model and evaluation come from ``task``.

    Batches are padded with :func:`~diffllama.finetune.data.batch_pad_id` and the model's ``pad_token_id`` is set
    to the same id (saved with it), so the classification head pools each text's last token in any batch.

    Args:
        cfg: training settings (:func:`finetune_config`); the trainer runs on a :class:`FineTuneConfig` copy of them
            with ``seq_len`` = the task's ``max_length`` and the task, model and data recorded.
        run_dir: output folder. task: the task (with its :class:`TaskOptions`).
        model_dir: a pretrained checkpoint (a causal LM, or a head checkpoint) with its tokenizer.
        train_path: labelled training data. eval_path: labelled evaluation data; default: ``eval_fraction`` of the
            training rows, held out with the run's seed. test_path: optional data scored once after training.
        resume: continue from the newest checkpoint in ``run_dir``: there must be one, and every setting it fixes
            (task, model, data, labels, columns, max_length, stride, optimizer settings, seed, global batch) must
            be the same, else ValueError naming the flag and both values, before any data is read.

    Raises:
        DataError: bad data (names file and row). FileNotFoundError / ValueError: a bad model directory, a
        tokenizer with neither PAD nor EOS; see ``resume``.
    """

    def __init__(self, cfg: TrainConfig, run_dir, *, task: Task, model_dir, train_path, eval_path=None,
                 test_path=None, eval_fraction: float = 0.1, resume: bool = False, info=None,
                 quiet: bool = False) -> None:
        self.task = task
        self.model_dir = Path(model_dir)
        self.paths = {"train": Path(train_path), "eval": Path(eval_path) if eval_path else None,
                      "test": Path(test_path) if test_path else None}
        self.eval_fraction = eval_fraction
        self.last_eval: dict = {}
        if resume and latest_checkpoint(run_dir) is None:
            raise ValueError(f"--resume: no checkpoint in {run_dir} to resume from (drop --resume to start a new "
                             f"run)")
        options = {k: v for k, v in dataclasses.asdict(task.options).items() if k != "max_length"}
        absolute = {name: None if path is None else str(path.resolve()) for name, path in self.paths.items()}
        cfg = FineTuneConfig(**{**cfg.to_dict(), **options, "seq_len": task.options.max_length, "task": task.name,
                                "base_model": str(self.model_dir.resolve()), "train_data": absolute["train"],
                                "eval_data": absolute["eval"], "test_data": absolute["test"],
                                "eval_fraction": eval_fraction, "data_fingerprint": data_fingerprint(self.paths)})
        super().__init__(cfg, run_dir, resume=resume, info=info, quiet=quiet)

    # ---- hooks of the Trainer ------------------------------------------------------------------------------------

    def _check_resume_settings(self) -> None:
        """Refuse, before any data work, a setting that differs from the checkpoint's, naming its flag and both
        values: other data or labels would silently retrain the saved head on something else (another --labels
        order inverts it), another task or --model would not even load into it."""
        saved = ckpt.read_train_config(self.resume_from)
        conflicts = resume_conflicts(saved, self.cfg, ckpt.saved_world_size(self.resume_from), self.info.world_size)
        # Runs saved before the fingerprint lack it and are not compared (resume_conflicts skips missing fields).
        old_prints, new_prints = conflicts.pop("data_fingerprint", ({}, {}))
        for role, flag in DATA_FLAGS.items():
            old, new = (old_prints or {}).get(role), (new_prints or {}).get(role)
            # a changed path is reported below as a changed flag; here: the same path with other contents
            if old != new and saved.get(f"{role}_data") == getattr(self.cfg, f"{role}_data"):
                raise ValueError(f"--resume: the contents of {flag} {getattr(self.cfg, f'{role}_data')} changed "
                                 f"since the run's checkpoint {self.resume_from} (size {old['size']}, sha256 "
                                 f"{old['sha256'][:12]}... then; size {new['size']}, sha256 {new['sha256'][:12]}... "
                                 f"now); --resume continues training on the data the run started with: restore "
                                 f"that file, or choose another --out to start a new run")
        # model.* are the preset's language-model fields, unused here: the weights come from --model
        listed = [f"{RESUME_FLAGS.get(name, name)} {old!r} in the checkpoint vs {new!r} now"
                  for name, (old, new) in conflicts.items() if not name.startswith("model.")]
        if listed:
            raise ValueError(f"--resume: settings given now differ from those of the run's checkpoint "
                             f"{self.resume_from} ({'; '.join(listed)}); --resume continues a run with the settings "
                             f"it started with: give the same task, --model, data, label and training flags "
                             f"(only --max-steps, --eval-every, --save-every, --device, --dtype, --parallel, "
                             f"--num-threads, and a --batch-size x --grad-accum split of the same global batch may "
                             f"change), or choose another --out to start a new run")

    def _check_model_settings(self) -> None:
        """Check the base model before any data work: its config.json parses and a weight file is there (the
        trainer's own check of the preset's language-model fields does not apply: the model comes from --model),
        so that a wrong --model fails in a second, not after reading and encoding all the data."""
        where = f"--model {str(self.model_dir)!r}"
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"{where}: model directory does not exist; expected a pretrained checkpoint "
                                    f"directory (config.json, weights, tokenizer)")
        try:
            DiffLlamaConfig.from_pretrained(self.model_dir)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} has no config.json; expected a pretrained checkpoint directory "
                                    f"(config.json, weights, tokenizer)") from None
        except ValueError as error:
            raise ValueError(f"{where}: bad config.json: {error}") from error
        if not any((self.model_dir / name).is_file() for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
            raise FileNotFoundError(f"{where} has no weights: expected {SAFE_WEIGHTS_NAME} or "
                                    f"{SAFE_WEIGHTS_INDEX_NAME} beside its config.json")

    def _planned_config(self) -> DiffLlamaConfig:
        """The base model's config (checked by :meth:`_check_model_settings`), for the memory estimate."""
        return DiffLlamaConfig.from_pretrained(self.model_dir)

    def _setup_data(self) -> None:
        task, paths = self.task, self.paths
        # A resumed run keeps the tokenizer its checkpoint was trained with, whatever --model holds now.
        self.tokenizer = Tokenizer.from_pretrained(self.resume_from or self.model_dir)
        self.pad_id = batch_pad_id(self.tokenizer, f"the tokenizer in {self.model_dir}")
        self.train_examples = task.read(paths["train"])
        # The label set comes from every row of --data, before an evaluation split is held out of it.
        self.labels = task.label_set(self.train_examples)
        if paths["eval"] is not None:
            self.eval_examples = task.read(paths["eval"])
        else:
            order = list(range(len(self.train_examples)))
            random.Random(self.cfg.seed).shuffle(order)
            held = max(1, int(len(order) * self.eval_fraction))
            if held >= len(order):
                raise DataError(f"{paths['train']}: {len(order)} rows are too few to hold out an evaluation split; "
                                f"pass --eval-data")
            self.eval_examples = [self.train_examples[i] for i in sorted(order[:held])]
            self.train_examples = [self.train_examples[i] for i in sorted(order[held:])]
            self.paths["eval"] = paths["train"]
        self.test_examples = task.read(paths["test"]) if paths["test"] is not None else None
        self.label2id = None if self.labels is None else {label: i for i, label in enumerate(self.labels)}
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples),
                                ("test", self.test_examples)):
            if examples is not None:
                task.check(self.paths[split], examples, self.label2id)
        self.train_data = task.encode(self.tokenizer, self.train_examples, self.label2id)
        self.val_data = task.encode(self.tokenizer, self.eval_examples, self.label2id)
        self.meta = None

    def _build_model(self):
        # The batches' pad id, whatever the pretrained config says (often EOS, or -1): the classification head
        # pools the last token that is not config.pad_token_id, and the saved model keeps this id.
        overrides = {"pad_token_id": self.pad_id}
        # As `diffllama train --seq-len`: sequences of max_length tokens need that many positions (RoPE has no
        # position weights to grow), and the saved config must say so, or loaders would cut the inputs short.
        positions = DiffLlamaConfig.from_pretrained(self.model_dir).max_position_embeddings
        if positions < self.task.options.max_length:
            overrides["max_position_embeddings"] = self.task.options.max_length
            if not self.quiet:
                print(f"note: --max-length {self.task.options.max_length} is above the model's "
                      f"max_position_embeddings {positions}; the model is saved with max_position_embeddings "
                      f"{self.task.options.max_length}", file=sys.stderr, flush=True)
        if self.labels is not None:
            overrides["id2label"] = dict(enumerate(self.labels))
            overrides["label2id"] = dict(self.label2id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the new-weights warning: reported below instead
            model = self.task.model_class.from_pretrained(self.model_dir, dtype=torch.float32, device=self.device,
                                                          **overrides)
        self.loading_report = getattr(model, "loading_report", {"new": [], "dropped": []})
        self.model_config = model.config
        return model, TaskModule(model, self.task)

    def _count_targets(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def _to_device(self, batch):
        inputs, targets = batch
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs, targets

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def predict(self, examples, desc: str = "eval") -> list:
        """The task's predictions for ``examples`` with the model as it is now (eval mode, autocast, no grad),
        under a progress bar named ``desc``."""
        self.wrapped.eval()
        id2label = None if self.labels is None else dict(enumerate(self.labels))

        with self.phase_bar(desc) as bar:  # the task decides the batches (QA: several windows per example)
            def forward(inputs):
                with torch.no_grad(), self._autocast():
                    out = self.wrapped(inputs)
                bar.update(1)
                return out
            return self.task.predict(forward, self.tokenizer, examples, id2label, self.cfg.batch_size, self.device)

    def evaluate(self) -> dict:
        """Score the evaluation set: ``{"eval_<metric>": float}`` for the scalar metrics (full result in
        ``self.last_eval``)."""
        scores = self.task.score(self.eval_examples, self.predict(self.eval_examples))
        self.last_eval = scores
        return {f"eval_{k}": v for k, v in scores.items() if isinstance(v, (int, float))}

    def describe_eval(self, val: dict) -> str:
        return ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in val.items()
                         if not k.endswith("count"))  # counts (tokens, sentences) print as integers

    def fit(self) -> FitResult:
        """As :meth:`Trainer.fit`; a resumed run whose training finished but whose ``finetune_metrics.json`` was
        never written for its last step (interrupted during the final scoring) is scored from the final model:
        the evaluation (and test) metrics are computed and written, and ``RUN_DIR/model`` exported if missing."""
        if self.resume_from is None or self.step < self.cfg.max_steps or self._scored():
            return super().fit()
        result = FitResult(step=self.step, checkpoint=self.resume_from)
        try:
            if self._interruptible(result, lambda: result.metrics.update(self.evaluate())):
                result.model_dir = self._export_final(self.resume_from)
                self._write_summary(result)
        finally:  # as Trainer.fit: the run folder is free for the next run once this one is done
            self._release_run_dir()
        return result

    def _summary_written(self) -> bool:
        """A fine-tuning run's summary is its ``finetune_metrics.json`` (it writes no summary.json)."""
        return self._scored()

    def _scored(self) -> bool:
        """True if ``RUN_DIR/finetune_metrics.json`` holds the metrics of this step (an older step's file, left by a
        run resumed to train on, does not count)."""
        try:
            return json.loads((self.run_dir / "finetune_metrics.json").read_text()).get("steps") == self.step
        except (OSError, ValueError, AttributeError):
            return False

    def _interruptible(self, result: FitResult, work) -> bool:
        """Run ``work()`` with SIGINT/SIGTERM stopping it; on a signal set ``result.interrupted`` (so the caller
        reports it and how to resume) and return False. After the training loop its handlers are gone, and the
        default ones would end the process without a word while the final scoring runs."""
        def stop(signum, frame):
            raise _ScoringInterrupted(signal.Signals(signum).name)
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, stop)
            except ValueError:  # not the main thread
                pass
        try:
            work()
            return True
        except _ScoringInterrupted as error:
            result.interrupted = str(error)
            return False
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _write_summary(self, result) -> None:
        scored = {}  # every rank scores (a sharded model's forward is collective); rank 0 writes
        if not self._interruptible(result, lambda: scored.update(summary=self.report())):
            return
        if not self.info.is_main:
            return
        summary = scored["summary"]
        atomic_write_text(self.run_dir / "finetune_metrics.json", json.dumps(summary, indent=2) + "\n")
        result.metrics["summary"] = summary

    def report(self) -> dict:
        """Task, data sizes, label set, loading report, baseline and the last evaluation (and test) metrics."""
        out = {"task": self.task.name, "model": str(self.model_dir), "steps": self.step,
               "train_examples": len(self.train_examples), "eval_examples": len(self.eval_examples),
               "labels": self.labels, "loading_report": self.loading_report,
               "baseline": self.task.baseline(self.train_examples, self.eval_examples), "eval": self.last_eval,
               "model_dir": str(self.run_dir / "model")}
        if self.test_examples is not None:
            out["test"] = self.task.score(self.test_examples, self.predict(self.test_examples, "test"))
            out["test_baseline"] = self.task.baseline(self.train_examples, self.test_examples)
        return out


def run_finetune(task: Task, cfg: TrainConfig, run_dir, *, model_dir, train_path, eval_path=None, test_path=None,
                 resume: bool = False, quiet: bool = False):
    """Build a :class:`FineTuneTrainer`, print what was loaded, fit, and return the :class:`FitResult`
    (``result.metrics["summary"]`` holds :meth:`FineTuneTrainer.report`, also written to
    ``RUN_DIR/finetune_metrics.json``). A signal during the final scoring sets ``result.interrupted`` and says on
    stderr that ``--resume`` scores the final model."""
    trainer = FineTuneTrainer(cfg, run_dir, task=task, model_dir=model_dir, train_path=train_path,
                              eval_path=eval_path, test_path=test_path, resume=resume, quiet=quiet)
    if trainer.info.is_main and not quiet:
        report = trainer.loading_report
        # On --resume every weight comes from the checkpoint: the base model's new head weights are not new now.
        weights = (f"weights restored from {trainer.resume_from} (step {trainer.step})" if trainer.resume_from
                   else f"new weights (initialised): {report.get('new')}; dropped: {report.get('dropped')}")
        print(f"{task.name}: {trainer.model.num_parameters() / 1e6:.2f}M parameters from {model_dir}; {weights}; "
              f"{len(trainer.train_examples)} train / {len(trainer.eval_examples)} eval examples "
              f"({len(trainer.train_data)} / {len(trainer.val_data)} sequences)"
              + (f"; labels: {trainer.labels if len(trainer.labels) <= 20 else len(trainer.labels)}"
                 if trainer.labels else ""), flush=True)
    result = trainer.fit()
    if result.interrupted and result.step >= trainer.cfg.max_steps and trainer.info.is_main and not quiet:
        print(f"interrupted during the final evaluation: {trainer.run_dir / 'finetune_metrics.json'} was not "
              f"written; rerun with --resume to score the final model", file=sys.stderr, flush=True)
    return result
