"""The training loop: a :class:`Trainer` whose ``forward_backward_step`` runs one micro-batch, whose ``train_step``
does one optimizer step, and whose ``fit`` drives the steps (``_train_loop``) and the run around them.

One step: the step's micro-batches are read (a pure function of the step number, see
:class:`diffllama.train.data.BatchPlan`), the loss of each is the summed token cross-entropy scaled by
``world_size / global target count`` (so the gradient averaged by DDP/FSDP over ranks is the gradient of the
mean over every target token of the global batch, however it is split), gradients accumulate with DDP's sync only
on the last micro-batch, are clipped by global norm, and AdamW (fused on CUDA) steps with a linear-warm-up +
cosine learning rate.

The driver adds: validation loss, perplexity and bits per byte every ``eval_every`` steps and at the end; a tqdm
progress bar with loss, tokens/s and ETA; ``RUN_DIR/metrics.jsonl`` (+ TensorBoard when installed); checkpoints
every ``save_every`` steps and at the end (:mod:`diffllama.train.checkpoint`); on SIGINT/SIGTERM a checkpoint is
saved before the process exits. On CPU, with a fixed seed, a resumed run reproduces the uninterrupted one bit for
bit (tests/test_train_resume.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffllama import settings
from diffllama.attention import resolve_implementation
from diffllama.config import DiffLlamaConfig
from diffllama.hub import resolve_checkpoint_dir
from diffllama.io import atomic_write_text
from diffllama.modeling import DiffLlamaForCausalLM
from diffllama.run_folder import TRAINER_STATE, latest_checkpoint
from diffllama.tokenizer import Tokenizer
from diffllama.train import checkpoint as ckpt
from diffllama.train.config import (TrainConfig, absolute_paths, arch_name, describe_resume_conflicts, fit_positions,
                                    init_model_fields, resume_conflicts)
from diffllama.train.data import (BatchPlan, CorpusError, DataMeta, TokenShards, bundled_corpus, cache_root,
                                  corpus_changes, file_fingerprints, list_input_files, load_or_train_tokenizer,
                                  prepare_data)
from diffllama.train.distributed import (DistInfo, all_reduce_sum, init_distributed, parallel_mode, parallelize)
from diffllama.train.loss import linear_cross_entropy
from diffllama.train.resources import check_fits, estimate_training_memory, warn_slow_bf16
from diffllama.train.metrics import read_metrics_file

# What a run's ``model:`` settings may hold: DiffLlamaConfig's constructor arguments (``extra`` is its own store of
# config.json keys it does not model, not a setting).
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DiffLlamaConfig) if f.init) - {"extra"} | {"num_labels"}


def separator_documents(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """The document of each token of packed rows whose documents end with ``separator_id`` (the EOS that
    :func:`~diffllama.train.data.prepare_data` appends to every document): (B, S) int64/int32 ids -> (B, S) int32,
    from 0 in each row, non-decreasing (:attr:`diffllama.attention.AttentionMask.document_ids`).

    A separator belongs to the document it ends: it sees that document and is seen by it, and the token after it
    starts the next document. (So the separator is predicted from its own document, and its own target, the next
    document's first token, is predicted from the ended document alone.) No device sync.
    """
    ends = (input_ids == separator_id).to(torch.int32)
    return ends.cumsum(-1, dtype=torch.int32) - ends  # separators strictly before each token


class TrainModule(nn.Module):
    """The causal LM plus the chunked LM-head loss: the module that DDP/FSDP wrap.

    ``forward(input_ids (B, S) int64, targets (B, S) int64, scale)`` returns ``scale × Σ CE`` as a float32 scalar,
    computed from the decoder's last hidden state without materialising the full float32 logits.

    With ``document_separator`` (``--document-mask``) each row is split into documents at that token
    (:func:`separator_documents`): a token attends only to its own document, and the RoPE positions restart at 0
    in each document (as transformers' ``DataCollatorWithFlattening`` numbers them, and as a document starts at
    generation time), so every document trains as if it were alone in its row. The targets are unchanged.
    """

    def __init__(self, model: DiffLlamaForCausalLM, chunk_size: int = 0, document_separator: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.document_separator = document_separator

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, scale) -> torch.Tensor:
        # Embedding here and passing inputs_embeds skips the model's token-range check, a device sync per call;
        # the data pipeline guarantees ids < tokenizer vocab <= model vocab.
        embeds = self.model.model.embed_tokens(input_ids)  # (B, S, D)
        packing = {}
        if self.document_separator is not None:
            # Positions then restart per document (the model's default for explicit documents). The model's check
            # that the ids are non-decreasing costs one device sync per call.
            packing["document_ids"] = separator_documents(input_ids, self.document_separator)
        hidden = self.model.model(inputs_embeds=embeds, use_cache=False, **packing).last_hidden_state  # (B, S, D)
        return linear_cross_entropy(hidden, self.model.lm_head.weight, targets, scale=scale,
                                    chunk_size=self.chunk_size)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, λ vectors); fused on CUDA."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bfloat16 on CUDA for "auto", None (plain float32) on CPU for "auto"."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class BatchTooLargeError(RuntimeError):
    """A micro-batch does not fit in memory."""


def _is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors, MemoryError and torch's CPU allocator failures."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns: the last step, final metrics, the checkpoint and model paths,
    the signal that interrupted the run (None if it finished)."""

    step: int
    metrics: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    model_dir: Path | None = None
    interrupted: str | None = None


@dataclass
class _LoopState:
    """What :meth:`Trainer._train_loop` carries from step to step: the latest metrics record, the newest
    checkpoint (written, or resumed from) and the step it holds (None: none yet), and the clock of the run and of
    the tokens/s window (``time.perf_counter`` seconds; steps since the last training record)."""

    start_time: float
    window_time: float
    checkpoint: Path | None = None
    last_saved: int | None = None
    window_steps: int = 0
    metrics: dict = field(default_factory=dict)


class Trainer:
    """Everything a run needs, built from a :class:`TrainConfig`: data, tokenizer, model, optimizer, schedule.

    Args:
        cfg: the resolved config. run_dir: output folder (metrics, checkpoints, final model).
        resume: continue from the newest checkpoint in ``run_dir`` (fresh start when there is none; ``diffllama
            train`` refuses that case). Settings other than those of
            :data:`~diffllama.train.config.RESUME_MAY_CHANGE` must match the checkpoint's.
        info: process placement; default: from the environment (:func:`init_distributed`).
        quiet: no progress bar or prints.

    Raises:
        CorpusError: missing/empty corpus, splits too small for ``seq_len``.
        ValueError: bad settings (e.g. a model vocabulary smaller than the tokenizer's); ``run_dir`` already
            holding checkpoints without ``resume``; ``run_dir`` not fit to be a run folder
            (:func:`~diffllama.train.checkpoint.check_run_dir`); ``run_dir`` in use by another live run (its lock,
            :func:`~diffllama.train.checkpoint.lock_run_dir`, taken here and held until :meth:`fit` ends: a
            ``RunDirInUse``, before any write); "ddp"/"fsdp" without torchrun; on resume,
            settings the resumed run could not honour (:func:`~diffllama.train.config.resume_conflicts`), a damaged
            checkpoint file (:func:`~diffllama.train.checkpoint.read_checkpoint`) or a damaged ``metrics.jsonl``
            (:func:`~diffllama.train.metrics.read_metrics_file`), all before any work.
    """

    # Corpus files as file_fingerprints records them, saved with each checkpoint (set on rank 0 by _setup_data;
    # None where a subclass reads its own data, whose resume checks are its own).
    data_files: list[dict] | None = None

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 info: DistInfo | None = None, quiet: bool = False) -> None:
        # Absolute corpus paths in config.yaml: a --resume from another folder reads the same files.
        cfg.data = absolute_paths(cfg.data)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        ckpt.check_run_dir(self.run_dir)
        self.info = info or init_distributed(cfg.device)
        self.mode = parallel_mode(cfg.parallel, self.info)
        self.quiet = quiet or not self.info.is_main
        self.device = self.info.device
        attn = (cfg.model or {}).get("attn_implementation")
        if attn == "flash" and self.device.type != "cuda":  # before any data work: the first step would fail
            if not settings.triton_interpreting():
                raise ValueError(f"attn_implementation 'flash' needs a CUDA GPU, but this run is on {self.device}: "
                                 f"use --attn-implementation sdpa (or auto), or --device cuda")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self._created = not self.run_dir.exists()  # fit's clean-up removes only a folder this run created
        self._lock = self._lock_run_dir()
        try:
            self._setup(resume)
        except BaseException:
            self._release_run_dir(remove=self._created)
            raise

    def _lock_run_dir(self):
        """The run folder's lock (:func:`~diffllama.train.checkpoint.lock_run_dir`), held until :meth:`fit` ends.

        Only rank 0 writes the folder's files and removes its staging folders, so it alone locks (the ranks of one
        launch share the folder: a lock per rank would refuse its own siblings). The ranks then agree on the
        outcome, so that on a refusal every rank stops at once instead of waiting for rank 0 at a barrier.
        """
        lock, refused = None, None
        if self.info.is_main:
            try:
                lock = ckpt.lock_run_dir(self.run_dir)
            except ckpt.RunDirInUse as error:
                refused = error
        if self.info.distributed:
            flag = all_reduce_sum(torch.tensor([float(refused is not None)], device=self.device), self.info)
            if flag.item() and refused is None:
                refused = ckpt.RunDirInUse(f"--out {str(self.run_dir)!r} is in use by another run (rank 0 found "
                                           f"its lock held)")
        if refused is not None:
            raise refused
        return lock

    def _release_run_dir(self, remove: bool = False) -> None:
        """Release the run folder's lock; with ``remove``, delete the folder first (while still holding it)."""
        if self._lock is None:
            return
        if remove:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self._lock.close()
        self._lock = None

    def _setup(self, resume: bool) -> None:
        """The rest of ``__init__``, run under the run folder's lock."""
        cfg = self.cfg
        self.resume_from = latest_checkpoint(self.run_dir) if resume else None
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise ValueError(f"{self.run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                             f"or choose another --out")
        saved = None
        if self.resume_from is not None:
            self._check_resume_settings()
            # Every file the resume reads is read now: a damaged one stops the run before any work or write.
            saved = ckpt.read_checkpoint(self.resume_from, self.info.rank)
            self._resumed_metrics = self._metrics_to_keep(saved.state["step"])
            self._saved_data_files = (saved.state.get("extra") or {}).get("data_files")

        # ---- data, tokenizer and model: hooks a subclass may replace (diffllama.finetune.run.FineTuneTrainer)
        self._init_state = self._read_init_checkpoint() if cfg.init_from and self.resume_from is None else None
        self._check_model_settings()
        self._check_memory()
        self._setup_data()
        self.plan = BatchPlan(len(self.train_data), cfg.batch_size, cfg.grad_accum, self.info.world_size, cfg.seed)

        # ---- model
        torch.manual_seed(cfg.seed)
        self.model, self.module = self._build_model()
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.wrapped = parallelize(self.module, self.model.base_model.layers, mode=self.mode, info=self.info,
                                   activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                   mixed_precision=self.amp_dtype if self.mode == "fsdp" else None)
        self.optimizer = build_optimizer(self.module, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.step = 0
        self.tokens = 0  # tokens trained on so far (a running total: tokens per step may change on resume)
        self.history: list[dict] = []
        self._stop_signal: str | None = None
        self.callbacks: list = []  # called as cb(trainer, metrics) after each step
        self._last_metrics: dict = {}  # the metrics saved with the checkpoint resumed from
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, module=self.module, optimizer=self.optimizer,
                                         scheduler=self.scheduler, info=self.info, fsdp=self.mode == "fsdp",
                                         saved=saved)
            self.step = state["step"]
            self._restart_schedule()
            extra = state.get("extra") or {}
            self._last_metrics = extra.get("metrics") or {}
            if extra.get("tokens") is not None:
                self.tokens = int(extra["tokens"])
            else:  # a checkpoint from before the running count: its last metrics record, else steps x tokens/step
                last = extra.get("metrics") or {}
                self.tokens = int(last["tokens"]) if last.get("step") == self.step and "tokens" in last \
                    else self.step * self.tokens_per_step

    # ---- set-up helpers --------------------------------------------------------------------------------------------

    def _check_resume_settings(self) -> None:
        """Refuse, before any data work, settings that differ from the checkpoint's where the resumed run could not
        honour them (the restored optimizer keeps its lr, the data stream its order, the weights their model)."""
        saved = ckpt.read_train_config(self.resume_from)
        conflicts = resume_conflicts(saved, self.cfg, ckpt.saved_world_size(self.resume_from), self.info.world_size)
        if conflicts:
            raise ValueError(describe_resume_conflicts(conflicts, self.resume_from))

    def _metrics_to_keep(self, step: int) -> list[dict] | None:
        """The records of the run's ``metrics.jsonl`` up to ``step`` (those after it are written again), or None
        without the file (or on ranks > 0, which do not write it). A last line cut short by a kill is dropped with a
        note; other damage is a ValueError naming the file and line."""
        path = self.run_dir / "metrics.jsonl"
        if not (self.info.is_main and path.is_file()):
            return None
        records, note = read_metrics_file(path)
        if note and not self.quiet:
            print(note, flush=True)
        return [record for record in records if record["step"] <= step]

    def _restart_schedule(self) -> None:
        """Set the learning rate of step ``self.step`` from this run's schedule: the restored optimizer holds the
        saved run's next lr, which differs when max_steps changed (the cosine decay then ends at the new one)."""
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()  # last_epoch back to self.step; each group's lr = peak x lr_lambda(self.step)

    def _read_init_checkpoint(self) -> dict[str, torch.Tensor]:
        """``init_from``'s weights (a state dict), its config adopted as the run's model fields
        (:func:`~diffllama.train.config.init_model_fields`), before any data work; the run's model loads them in
        :meth:`_build_model`. Refuses a checkpoint without a language-model head (a fine-tuned task model)."""
        directory = resolve_checkpoint_dir(self.cfg.init_from)
        self.cfg.model = init_model_fields(DiffLlamaConfig.from_pretrained(directory), self.cfg.model,
                                           self.cfg.init_from)
        source = DiffLlamaForCausalLM.from_pretrained(directory, dtype="float32")
        if "lm_head.weight" in source.loading_report["new"]:
            raise ValueError(f"--init-from {self.cfg.init_from}: no language-model head (lm_head.weight is not in "
                             f"its weights: a fine-tuned task model?); give a causal LM checkpoint")
        self._init_dir = directory
        return source.state_dict()

    def _check_corpus(self, files: list[Path]) -> None:
        """Set ``data_files`` (saved with each checkpoint); on resume refuse a corpus whose files changed since the
        checkpoint recorded them, naming each changed file. Checkpoints of versions without the record are
        resumed unchecked."""
        self.data_files = file_fingerprints(files)
        saved = self._saved_data_files if self.resume_from else None
        changes = corpus_changes(saved, self.data_files) if saved is not None else []
        if changes:
            raise ValueError(f"--resume: the corpus changed since checkpoint {self.resume_from} was written "
                             f"({'; '.join(changes)}); a resumed run must read the data it started with: restore "
                             f"those files, or choose another --out to start a new run on the new data")

    def _check_vocab_fits(self, tokenizer_dir: str | None) -> None:
        """Refuse a ``model.vocab_size`` below the tokenizer's size before BPE training and tokenization: a given
        tokenizer's size is read from its files, a tokenizer to train has at most ``tokenizer_vocab_size`` tokens."""
        vocab = self.cfg.model.get("vocab_size")
        if not vocab:  # unset: the tokenizer's size rounded up (_model_config)
            return
        if tokenizer_dir:
            size, source = Tokenizer.from_pretrained(tokenizer_dir).vocab_size, f"the tokenizer in {tokenizer_dir}"
        else:
            size, source = self.cfg.tokenizer_vocab_size, "tokenizer_vocab_size (the BPE to train)"
        if vocab < size:
            raise ValueError(f"model vocab_size {vocab} is smaller than {source}: {size} tokens; set model.vocab_size "
                             f"to at least {size} or leave it unset (the tokenizer's size rounded up to 64)"
                             + ("" if tokenizer_dir else ", or lower tokenizer_vocab_size (--tokenizer-vocab-size)"))

    def _setup_data(self) -> None:
        """Set ``tokenizer``, ``meta``, ``train_data`` and ``val_data`` (each with ``len`` and ``batch(indices)``)."""
        cfg = self.cfg
        cache = cache_root(cfg.cache_dir)
        files = list_input_files(cfg.data or [str(bundled_corpus())])
        if self.resume_from:
            tokenizer_dir = str(self.resume_from)
        else:  # a run from init_from reads its checkpoint's token ids (TrainConfig refuses a tokenizer beside it)
            tokenizer_dir = str(self._init_dir) if self._init_state is not None else (cfg.tokenizer or None)
        self._check_vocab_fits(tokenizer_dir)
        if self.info.is_main:  # rank 0 checks the corpus and builds the cache; the others then find it
            self._check_corpus(files)
            self.tokenizer = load_or_train_tokenizer(files, cfg.text_field, cfg.tokenizer_vocab_size, cache,
                                                     tokenizer_dir)
            folder, self.meta = prepare_data(files, self.tokenizer, text_field=cfg.text_field,
                                             val_fraction=cfg.val_fraction, cache_dir=cache)
        if self.info.distributed:
            torch.distributed.barrier()
        if not self.info.is_main:
            self.tokenizer = load_or_train_tokenizer(files, cfg.text_field, cfg.tokenizer_vocab_size, cache,
                                                     tokenizer_dir)
            folder, self.meta = prepare_data(files, self.tokenizer, text_field=cfg.text_field,
                                             val_fraction=cfg.val_fraction, cache_dir=cache)
        self.train_data = TokenShards(folder, self.meta.train_shards, self.meta.dtype, cfg.seq_len, "train")
        self.val_data = TokenShards(folder, self.meta.val_shards, self.meta.dtype, cfg.seq_len, "validation")

    def _build_model(self) -> tuple[nn.Module, nn.Module]:
        """(model, training module): the module's ``forward(inputs, targets, scale)`` returns ``scale × Σ loss``."""
        self.model_config = self._model_config()
        with torch.device(self.device):
            model = DiffLlamaForCausalLM(self.model_config)
        if self._init_state is not None:
            model.load_state_dict(self._init_state)
            self._init_state = None  # the only copy left is the model's
        separator = self.tokenizer.eos_token_id if self.cfg.document_mask else None
        return model, TrainModule(model, self.cfg.loss_chunk_size, separator)

    def _count_targets(self, batch) -> int:
        """Loss targets in one micro-batch as the data gives it: (B, S + 1) windows, all but the first column."""
        return int((batch[:, 1:] != -100).sum())

    def describe_eval(self, val: dict) -> str:
        """The progress line printed after an evaluation."""
        return f"val loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.1f}, {val['val_bpb']:.3f} bits/byte"

    def _config_with(self, vocab_size: int, special_ids: dict) -> DiffLlamaConfig:
        """The run's model config (``cfg.model`` fields) with this vocabulary size and bos/eos/pad ids."""
        fields = dict(fit_positions(self.cfg.model, self.cfg.seq_len), vocab_size=vocab_size, **special_ids)
        # flash on a CUDA GPU (0.4b compiled step 1.17x sdpa's tokens/s, benchmarks/RESULTS.md), sdpa on CPU
        fields.setdefault("attn_implementation", "auto")
        unknown = sorted(set(fields) - CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"unknown model setting(s) {unknown}; the model settings are DiffLlamaConfig's fields: "
                             f"{', '.join(sorted(CONFIG_FIELDS))}")
        return DiffLlamaConfig(**fields)

    def _check_model_settings(self) -> None:
        """Build the config once before any data work, so that a bad ``model:`` setting (an unknown field, heads
        that do not divide the hidden size) fails at once; the tokenizer's vocabulary and ids come later."""
        self._config_with(self.cfg.model.get("vocab_size") or 1 << 16,
                          dict(bos_token_id=None, eos_token_id=None, pad_token_id=None))

    def _planned_config(self) -> DiffLlamaConfig:
        """The model config as far as it is known before the data work (the vocabulary: the set one, else the
        tokenizer size asked for), for the memory estimate."""
        vocab = self.cfg.model.get("vocab_size") or self.cfg.tokenizer_vocab_size
        return self._config_with(vocab, dict(bos_token_id=None, eos_token_id=None, pad_token_id=None))

    def _check_memory(self) -> None:
        """Before any data work: warn about bfloat16 on a CPU without bf16 instructions, and refuse settings whose
        training memory estimate (:func:`diffllama.train.resources.estimate_training_memory`) exceeds the free RAM
        or GPU memory, printing the estimate (MemoryError)."""
        cfg, config = self.cfg, self._planned_config()
        amp = autocast_dtype(cfg, self.device)
        warn_slow_bf16(self.device, amp, "dtype bfloat16")
        attn = resolve_implementation(config.attn_implementation, self.device)
        estimate = estimate_training_memory(
            config, batch_size=cfg.batch_size, seq_len=cfg.seq_len, activation_dtype=amp or torch.float32,
            quadratic_attention=attn == "eager" or self.device.type != "cuda",
            activation_checkpointing=cfg.activation_checkpointing)
        check_fits(estimate, self.device, "lower --seq-len or --batch-size (raise --grad-accum to keep the global "
                                          "batch), or pass --activation-checkpointing")

    def _model_config(self) -> DiffLlamaConfig:
        # A set vocab_size was checked against the tokenizer before the data work (_check_vocab_fits)
        vocab = self.cfg.model.get("vocab_size") or -(-self.tokenizer.vocab_size // 64) * 64
        config = self._config_with(vocab, dict(bos_token_id=self.tokenizer.bos_token_id,
                                               eos_token_id=self.tokenizer.eos_token_id,
                                               pad_token_id=self.tokenizer.pad_token_id))
        self._record_positions(config.max_position_embeddings)
        return config

    def _record_positions(self, positions: int) -> None:
        """Record the saved model's ``max_position_embeddings`` in the run's config (config.yaml and every
        checkpoint's train_config.yaml), with a notice when ``seq_len`` raised the value the settings gave."""
        given = self.cfg.model.get("max_position_embeddings")
        if given == positions:
            return
        if given is not None and not self.quiet:
            print(f"note: seq_len {self.cfg.seq_len} is above the model's max_position_embeddings {given}; the "
                  f"model is saved with max_position_embeddings {positions}", flush=True)
        self.cfg.model = {**self.cfg.model, "max_position_embeddings": positions}

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all ranks."""
        return self.plan.global_batch * self.cfg.seq_len

    def _batch(self, indices, data: TokenShards) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(data.batch(indices))

    def _to_device(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S + 1) int64 numpy windows -> (inputs, targets), each (B, S) int64 on the device."""
        windows = torch.from_numpy(windows)
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- the step function -------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Run optimizer step ``step`` (0-based): forward/backward over its micro-batches, clip, AdamW, schedule.

        Returns:
            ``{"loss": tensor, "grad_norm": tensor, "lr": float}``; ``loss`` is the mean cross-entropy (nats)
            over every target token of the global batch (a 0-dim float32 tensor, not yet synchronised).
        """
        cfg, info = self.cfg, self.info
        self.wrapped.train()
        windows = [self.train_data.batch(self.plan.indices(step, m, info.rank)) for m in range(cfg.grad_accum)]
        # Global target count: counted on the host (no device sync), summed over ranks on the device.
        local = torch.tensor(float(sum(self._count_targets(w) for w in windows)), device=self.device)
        scale = info.world_size / all_reduce_sum(local, info)
        batches = [self._to_device(w) for w in windows]
        total = torch.zeros((), device=self.device)
        for m, (x, y) in enumerate(batches):
            total += self.forward_backward_step(x, y, scale, last=m == cfg.grad_accum - 1)
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = all_reduce_sum(total, info) / info.world_size
        return {"loss": total, "grad_norm": grad_norm, "lr": lr}

    def forward_backward_step(self, inputs: torch.Tensor, targets: torch.Tensor, scale, *,
                              last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch, accumulating into the parameters' gradients.

        Args:
            inputs, targets: (B, S) int64 on the device. scale: the loss multiplier of the step (a 0-dim float32
                tensor, ``world_size / global target count``). last: the step's last micro-batch, the only one
                whose backward synchronises gradients across DDP/FSDP ranks.

        Returns:
            ``scale × Σ CE`` of the micro-batch, detached (a 0-dim float32 tensor).
        """
        with self._gradient_sync(last):
            with self._autocast():
                loss = self.wrapped(inputs, targets, scale)
            loss.backward()
        return loss.detach()

    def _gradient_sync(self, last: bool):
        """The context of one micro-batch's backward: DDP's ``no_sync`` before the last micro-batch; for FSDP, the
        gradient reduction switched on for the last one only (set here, before the backward)."""
        if self.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to global norm ``grad_clip`` and return the norm before clipping (a plain tensor,
        gathered from FSDP's DTensor); without clipping (``grad_clip`` 0) a 0-dim zero."""
        if self.cfg.grad_clip <= 0:
            return torch.zeros(())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss over the first ``eval_batches × batch_size × world`` validation windows (or all).

        Returns:
            ``{"val_loss": nats/token, "val_ppl": exp(val_loss), "val_bpb": bits per UTF-8 byte}``.
        """
        cfg, info = self.cfg, self.info
        self.wrapped.eval()
        n = min(len(self.val_data), cfg.eval_batches * cfg.batch_size * info.world_size)
        mine = list(range(info.rank, n, info.world_size))
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        # Every rank runs the same number of forward passes (FSDP needs matching collectives).
        per_rank = -(-n // info.world_size)
        with self.phase_bar("eval", -(-per_rank // cfg.batch_size)) as bar:
            for start in range(0, per_rank, cfg.batch_size):
                chunk = mine[start:start + cfg.batch_size]
                if not chunk:  # a rank with fewer windows repeats one window with weight 0
                    chunk, weight = [0], 0.0
                else:
                    weight = 1.0
                x, y = self._batch(chunk, self.val_data)
                with self._autocast():
                    loss = self.wrapped(x, y, 1.0)
                sums[0] += loss.double() * weight
                sums[1] += y.numel() * weight
                bar.update(1)
        all_reduce_sum(sums, info)
        val_loss = float(sums[0] / sums[1])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bpb": self.meta.bits_per_byte(val_loss, "val")}

    # ---- the driver -------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        """Make SIGINT/SIGTERM set ``_stop_signal`` (the loop then saves and stops; a second Ctrl-C stops at once).
        Returns the handlers replaced, which :meth:`_fit` restores."""
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once
            self._stop_signal = signal.Signals(signum).name
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _should_stop(self) -> bool:
        """True if a signal came to this process or, distributed, to any rank (one all-reduce)."""
        if not self.info.distributed:
            return self._stop_signal is not None
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        return bool(flag.item())

    def _save(self, metrics: dict) -> Path:
        """Save a checkpoint of ``self.step`` with ``metrics``, the token count and the corpus files; its path."""
        unwrapped = self.module
        return ckpt.save_checkpoint(self.run_dir, self.step, module=unwrapped, model=self.model,
                                    optimizer=self.optimizer, scheduler=self.scheduler, tokenizer=self.tokenizer,
                                    config_yaml=self.cfg.to_yaml(), info=self.info, fsdp=self.mode == "fsdp",
                                    keep_last=self.cfg.keep_last,
                                    extra={"metrics": metrics, "tokens": self.tokens,
                                           "data_files": self.data_files})

    def _log(self, record: dict, writer) -> None:
        """Append ``record`` to ``history``; on rank 0 also to metrics.jsonl and TensorBoard (numbers only)."""
        self.history.append(record)
        if not self.info.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    def _prepare_run_dir(self) -> bool:
        """Write config.yaml; trim metrics past the resumed step. Returns True if this run created the folder
        (:meth:`_lock_run_dir` did, in ``__init__``)."""
        if self.info.is_main:
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
            metrics = self.run_dir / "metrics.jsonl"
            if self.resume_from is None:  # a fresh record; with config.yaml it marks a run folder (check_run_dir)
                metrics.write_text("")
            elif self._resumed_metrics is not None:  # read (and checked) before any work, in __init__
                atomic_write_text(metrics, "".join(json.dumps(record) + "\n" for record in self._resumed_metrics))
        return self._created

    def _tensorboard(self):
        """A TensorBoard writer on rank 0 with ``tensorboard`` set and installed; else None."""
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def fit(self) -> FitResult:
        """Train from ``self.step`` to ``max_steps``; evaluate, log and checkpoint along the way. Releases the run
        folder's lock when it returns or raises.

        Returns:
            :class:`FitResult`. On SIGINT/SIGTERM a checkpoint of the last finished step is written and
            ``interrupted`` names the signal.

        Raises:
            BatchTooLargeError: the first step ran out of memory (names batch size and sequence length).
        """
        try:
            return self._fit()
        finally:
            self._release_run_dir()

    def _fit(self) -> FitResult:
        """:meth:`fit` under the run folder's lock: set up the run's outputs, signal handlers and progress bar, run
        :meth:`_train_loop`, tear them down, and export the model when ``max_steps`` was reached. A run that fails
        before its first checkpoint removes the run folder it created."""
        cfg = self.cfg
        if self.resume_from is not None and self.step >= cfg.max_steps:
            return self._finish_finished_run()
        created = self._prepare_run_dir()
        writer = self._tensorboard()
        previous = self._install_signal_handlers()
        bar = self._progress_bar()
        start_time = time.perf_counter()
        state = _LoopState(checkpoint=self.resume_from, start_time=start_time, window_time=start_time,
                           last_saved=self.step if self.resume_from is not None else None)
        try:
            self._train_loop(state, writer, bar)
        except BaseException:
            if state.last_saved is None and created and self.info.is_main:  # nothing worth keeping: no half-run
                if writer is not None:
                    writer.close()
                self._release_run_dir(remove=True)
            raise
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
        result = FitResult(step=self.step, metrics=state.metrics, checkpoint=state.checkpoint,
                           interrupted=self._stop_signal)
        if self.step >= cfg.max_steps:  # finished, even if a signal came during the last step: export (seconds)
            result.interrupted = None
            result.model_dir = self._export_final(state.checkpoint)
            self._write_summary(result)
        return result

    def _finish_finished_run(self) -> FitResult:
        """The result of resuming a run whose steps are all done: its last checkpoint and metrics, with the model
        export and summary written now if a signal came between its last step and them."""
        result = FitResult(step=self.step, metrics=dict(self._last_metrics), checkpoint=self.resume_from)
        if (self.run_dir / "model").is_dir() and self._summary_written():
            result.model_dir = self.run_dir / "model"  # nothing to do
        else:
            result.model_dir = self._export_final(self.resume_from)
            self._write_summary(result)
        return result

    def _progress_bar(self):
        """A tqdm bar over the run's steps, starting at ``self.step``; None when quiet."""
        if self.quiet:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def phase_bar(self, desc: str, total: int | None = None):
        """A transient tqdm bar (``leave=False``) for an evaluation or test phase, advanced by ``update(n)``, so
        the training bar does not sit still while it runs; disabled (updates do nothing) when quiet.

        Args:
            desc: the phase's name ("eval", "test"). total: the number of updates, or None when not known ahead.
        """
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=self.quiet)

    def _train_loop(self, state: _LoopState, writer, bar) -> None:
        """Run steps until ``max_steps`` or a stop signal; after each: log, evaluate, call the callbacks, and save
        a checkpoint when due (every ``save_every`` steps, the last step, and the step a signal stopped)."""
        cfg = self.cfg
        while self.step < cfg.max_steps:
            out = self._checked_train_step()
            self.step += 1
            self.tokens += self.tokens_per_step
            state.window_steps += 1
            done = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or done:
                self._log_train_metrics(out, state, writer, bar)
            if self.step % cfg.eval_every == 0 or done:
                self._log_evaluation(state, writer, bar)
            if bar is not None:
                bar.update(1)
            for callback in self.callbacks:
                callback(self, state.metrics)
            # Distributed, the ranks agree on stopping only at log steps (one all-reduce, not one per step).
            stop = (self.step % cfg.log_every == 0 or done or not self.info.distributed) and self._should_stop()
            if (cfg.save_every and self.step % cfg.save_every == 0) or done or stop:
                state.checkpoint = self._save(state.metrics)
                state.last_saved = self.step
            if stop:
                break

    def _checked_train_step(self) -> dict:
        """:meth:`train_step` of ``self.step``, an out-of-memory error turned into a :class:`BatchTooLargeError`
        that says which settings to lower."""
        try:
            return self.train_step(self.step)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            raise BatchTooLargeError(
                f"a micro-batch of {self.cfg.batch_size} x {self.cfg.seq_len} tokens does not fit in "
                f"{self.device.type} memory: lower --batch-size (raise --grad-accum to keep the global "
                f"batch), or pass --activation-checkpointing") from error

    def _log_train_metrics(self, out: dict, state: _LoopState, writer, bar) -> None:
        """Make ``state.metrics`` the training record of ``self.step`` (``out`` from :meth:`train_step`; tokens/s
        over the steps since the last record) and write it to metrics.jsonl, TensorBoard and the progress bar."""
        now = time.perf_counter()
        loss = float(out["loss"])
        tps = state.window_steps * self.tokens_per_step / max(now - state.window_time, 1e-9)
        state.window_time, state.window_steps = now, 0
        state.metrics = {"step": self.step, "loss": loss, "lr": out["lr"], "grad_norm": float(out["grad_norm"]),
                         "tokens": self.tokens, "tokens_per_s": tps, "epoch": self.plan.epoch(self.step),
                         "elapsed_s": now - state.start_time}
        self._log(state.metrics, writer)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)

    def _log_evaluation(self, state: _LoopState, writer, bar) -> None:
        """Evaluate, add the validation metrics to ``state.metrics``, and write them to metrics.jsonl, TensorBoard
        and the progress output."""
        val = self.evaluate()
        state.metrics = {**state.metrics, **val}
        self._log({"step": self.step, **val}, writer)
        if bar is not None:
            bar.write(f"step {self.step}: {self.describe_eval(val)}")

    def _export_final(self, checkpoint_path: Path | None) -> Path | None:
        """Copy the final checkpoint's model and tokenizer files (no trainer state) to ``RUN_DIR/model``."""
        if checkpoint_path is None:
            return None
        target = self.run_dir / "model"
        if self.info.is_main:
            staging = self.run_dir / ".tmp-model"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint_path, staging,
                            ignore=shutil.ignore_patterns(TRAINER_STATE, "rng-rank*.pt"))
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        if self.info.distributed:
            torch.distributed.barrier()
        return target

    def _write_summary(self, result: FitResult) -> None:
        if not self.info.is_main:
            return
        meta: DataMeta = self.meta
        summary = {
            "steps": result.step, "tokens": self.tokens,
            "parameters": self.model.num_parameters(),
            "final_loss": result.metrics.get("loss"), "val_loss": result.metrics.get("val_loss"),
            "val_ppl": result.metrics.get("val_ppl"), "val_bits_per_byte": result.metrics.get("val_bpb"),
            "unigram_entropy_bits_per_byte": meta.unigram_bits_per_byte,
            "unigram_val_cross_entropy_bits_per_byte": meta.unigram_val_bits_per_byte,
            "train_tokens": meta.train_tokens, "val_tokens": meta.val_tokens,
            "model_dir": str(result.model_dir) if result.model_dir else None,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        result.metrics["summary"] = summary

    def _summary_written(self) -> bool:
        """True if ``RUN_DIR/summary.json`` is this step's summary. An empty or cut-short file (left by a version
        that wrote it in place) or an older step's does not count, so the finish step is redone."""
        try:
            summary = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
            return False
        return isinstance(summary, dict) and summary.get("steps") == self.step


def run_training(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False) -> FitResult:
    """Build a :class:`Trainer` and fit it; prints a closing summary on rank 0. Used by ``diffllama train``."""
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=quiet)
    if trainer.info.is_main and not quiet:
        model_type = trainer.model_config.model_type
        print(f"model: {arch_name(model_type)} (model_type {model_type}), "
              f"{trainer.model.num_parameters() / 1e6:.2f}M parameters, vocab {trainer.model_config.vocab_size}"
              f"; data: {trainer.meta.train_tokens:,} train / {trainer.meta.val_tokens:,} val tokens; "
              f"{trainer.tokens_per_step:,} tokens/step on {trainer.info.world_size} process(es), "
              f"{trainer.device}, parallel={trainer.mode}"
              + (f"; resuming from {trainer.resume_from} (step {trainer.step})" if trainer.resume_from else "")
              + (f"; weights from {trainer.cfg.init_from}" if trainer.cfg.init_from and not trainer.resume_from else ""),
              flush=True)
    return trainer.fit()


__all__ = ["Trainer", "TrainModule", "separator_documents", "FitResult", "BatchTooLargeError", "CorpusError",
           "run_training", "lr_lambda", "build_optimizer"]
