"""Training data: raw text -> byte-level BPE tokenizer -> packed token shards on disk -> batches.

Pipeline:
1. :func:`list_input_files` expands paths (files, folders) into the corpus files: plain text (``.txt``, ``.md``,
   ``.text``, ``.rst``) where one file is one document, and JSON lines (``.jsonl``, ``.json``) where each line is a
   document whose text is the ``text_field`` key. Any of them may be gzip-compressed (``.gz``).
2. :func:`train_bpe` trains a byte-level BPE (Hugging Face ``tokenizers``) with the special tokens ``<s>``,
   ``</s>``, ``<pad>``, wrapped as :class:`diffllama.tokenizer.Tokenizer`.
3. :func:`prepare_data` tokenizes every document, appends the EOS id as the document separator, splits train /
   validation and writes each split as packed ``uint16`` (vocabularies up to 65536) or ``uint32`` numpy shard files
   plus ``meta.json``, into a cache folder named by a hash of the inputs (content; path/size/mtime above 256 MiB),
   the tokenizer's JSON,
   the text field and the validation share. A rerun with the same inputs reuses the folder; the folder is written
   under a temporary name and renamed when complete, so a failure leaves nothing half-written (see :func:`_staging`
   for how the staging folder of a killed process is removed).
4. :class:`TokenShards` serves non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets)
   from the memory-mapped shards; :class:`BatchPlan` maps (step, micro-step, rank) to window indices, so that the
   data position of a run is its step number and each rank reads its own slice of every global batch.

Validation split: with at least 20 documents, evenly spaced whole documents (a share ``val_fraction``, at least
one); with fewer, the last ``val_fraction`` of each document's tokens.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from diffllama.tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # Windows: no flock, so staging folders of dead processes are not recognised (see _staging)
    fcntl = None

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB of uint16)
# 2: corpus files must be UTF-8; version 1 read them with errors="replace", so a cache built from a Latin-1 corpus
# holds U+FFFD in place of every accented character and must not be reused.
CACHE_VERSION = 2


class CorpusError(ValueError):
    """The corpus is missing, empty, or too small for the requested sequence length."""


def bundled_corpus() -> Path:
    """Path of the bundled corpus: State of the Union addresses 1790-2018 (``data/sotu.jsonl.gz``, public domain)."""
    return Path(str(resources.files("diffllama") / "data" / "sotu.jsonl.gz"))


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _walk_files(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, following links to folders (each real folder once, so a link loop ends) as
    well as links to files: a corpus assembled from links reads as the same corpus copied."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in names:
            file = Path(root) / name
            if file.is_file():
                yield file


def list_input_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand corpus paths into a sorted, de-duplicated list of corpus files.

    A folder contributes every file below it with a known suffix (``.txt .md .text .rst .jsonl .json``, optionally
    ``.gz``), links to files and folders included; a file is taken as given if its suffix is known.

    Raises:
        CorpusError: a path that does not exist, a file of unknown type, or no corpus file at all.
    """
    if not paths:
        raise CorpusError("no corpus given: pass --data PATH (a text file, a folder, or a JSONL file)")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CorpusError(f"corpus path {str(raw)!r} does not exist")
        if path.is_dir():
            found = sorted(p for p in _walk_files(path) if _kind(p) is not None)
            if not found:
                raise CorpusError(f"corpus folder {str(raw)!r} holds no text files "
                                  f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, optionally .gz)")
            files.extend(found)
        elif _kind(path) is None:
            raise CorpusError(f"corpus file {str(raw)!r} has an unknown type; expected one of "
                              f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} (optionally .gz)")
        else:
            files.append(path)
    unique = sorted({p.resolve() for p in files})
    return unique


def _utf8_lines(path: Path) -> Iterator[str]:
    """The lines of corpus file ``path`` (decompressed when ``.gz``), each with its line end, decoded as UTF-8.

    Lines are read as bytes and decoded one by one so that an error can name the exact byte offset (a newline byte
    never occurs inside a UTF-8 multi-byte character, so no character is split).

    Raises:
        CorpusError: a byte sequence that is not UTF-8, naming the file, the line and the byte offset.
    """
    compressed = path.name.lower().endswith(".gz")
    offset = 0
    with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                where = f"byte offset {offset + error.start}" + (" of the decompressed text" if compressed else "")
                raise CorpusError(f"corpus file {str(path)!r} is not UTF-8 text: byte 0x{raw[error.start]:02x} at "
                                  f"{where} (line {number}): {error.reason}; convert it to UTF-8 (e.g. iconv -f "
                                  f"latin1 -t utf-8)") from None
            offset += len(raw)
            yield line


def jsonl_records(lines, invalid) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed JSON value) for each non-blank line of ``lines``.

    A line that is not valid JSON, or whose object names a key twice (``json`` would silently keep the last value,
    as csv's DictReader does with a repeated column), raises ``invalid(number, error)`` (chained to a
    ``JSONDecodeError``), so each caller raises its own error type, naming the file and line its own way.
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=lambda pairs: _unique_keys(pairs, line))
        except json.JSONDecodeError as error:
            raise invalid(number, error) from error
        yield number, record


def _unique_keys(pairs: list[tuple[str, object]], line: str) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        repeated = sorted({key for key, _ in pairs if sum(k == key for k, _ in pairs) > 1})
        raise json.JSONDecodeError(f"key(s) {repeated} given twice in one object", line, 0)
    return record


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Yield each document's text, in file order; empty documents are skipped.

    Raises:
        CorpusError: a JSONL line that is not a JSON object with a string ``text_field`` (names file and line); a file
            that is not UTF-8 (names file, line and byte offset); a corrupt gzip file.
    """
    for path in files:
        try:
            yield from _file_documents(path, text_field)
        except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            what = "a corrupt or truncated gzip file" if path.name.lower().endswith(".gz") else "unreadable"
            raise CorpusError(f"corpus file {str(path)!r} is {what}: {error}") from error


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if _kind(path) == "text":
        # \r\n and \r become \n, as the text-mode read before did (the same documents, so the same tokens).
        text = "".join(_utf8_lines(path)).replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            yield text
        return
    lines_hint = "expected JSON Lines: one JSON object per line, its text under the text field"
    records = jsonl_records(_utf8_lines(path), lambda number, error: CorpusError(
        f"{path}:{number}: not valid JSON ({error}); {lines_hint}"))
    for number, record in records:
        if not isinstance(record, dict):  # e.g. a whole JSON array on one line
            shown = json.dumps(record)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise CorpusError(f"{path}:{number}: {shown} is not a JSON object; {lines_hint} (a JSON array file "
                              f"must be rewritten with one element per line)")
        text = record.get(text_field)
        if not isinstance(text, str):
            raise CorpusError(f"{path}:{number}: no string field {text_field!r} "
                              f"(set --text-field to the key holding the text)")
        if text.strip():
            yield text


def count_documents(files: list[Path], text_field: str = "text") -> int:
    """The number of non-empty documents in ``files``: a full read, so that a bad file (not UTF-8, a bad JSON line,
    a corrupt gzip) is refused before tokenizer training or tokenization starts.

    Raises:
        CorpusError: as :func:`iter_documents`, or a corpus without any text.
    """
    count = sum(1 for _ in iter_documents(files, text_field))
    if count == 0:
        raise CorpusError(f"the corpus ({len(files)} file(s): {', '.join(str(f) for f in files[:3])}"
                          f"{', ...' if len(files) > 3 else ''}) holds no text")
    return count


CONTENT_HASH_LIMIT = 256 << 20  # files up to this size are identified by content, larger ones by path/size/mtime


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of the bytes of file ``path``, read in 1 MiB blocks."""
    content = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            content.update(block)
    return content.hexdigest()


def inputs_fingerprint(files: list[Path], text_field: str) -> str:
    """SHA-256 hex identifying the corpus: each file's name and content hash (files up to 256 MiB) or its resolved
    path, size and mtime (larger files, where hashing would cost seconds per GB), plus ``text_field``."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{text_field}".encode())
    for path in files:
        stat = path.stat()
        if stat.st_size <= CONTENT_HASH_LIMIT:
            digest.update(f"|{path.name}|{file_sha256(path)}".encode())
        else:
            digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def file_fingerprints(files: list[Path]) -> list[dict]:
    """One record per corpus file, in corpus order: ``{"path", "size", "sha256"}``, or ``{"path", "size",
    "mtime_ns"}`` for files above 256 MiB (as :func:`inputs_fingerprint` identifies them). A run stores them with
    each checkpoint so that ``--resume`` can tell a changed corpus (:func:`corpus_changes`)."""
    records = []
    for path in files:
        stat = path.stat()
        record = {"path": str(path), "size": stat.st_size}
        if stat.st_size <= CONTENT_HASH_LIMIT:
            record["sha256"] = file_sha256(path)
        else:
            record["mtime_ns"] = stat.st_mtime_ns
        records.append(record)
    return records


def corpus_changes(saved: list[dict], now: list[dict]) -> list[str]:
    """How the corpus ``now`` differs from ``saved`` (both :func:`file_fingerprints`), one phrase per file naming
    it; [] when both hold the same contents in the same order (the same token stream: a moved corpus, or the
    bundled one of another installation, still counts as the same)."""
    def contents(records):
        return [{key: value for key, value in record.items() if key != "path"} for record in records]

    if contents(saved) == contents(now):
        return []
    old, new = {r["path"]: r for r in saved}, {r["path"]: r for r in now}
    changes = []
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            changes.append(f"{path} is no longer part of it")
        elif path not in old:
            changes.append(f"{path} is new")
        elif old[path]["size"] != new[path]["size"]:
            changes.append(f"{path} has {new[path]['size']:,} bytes, {old[path]['size']:,} before")
        elif old[path] != new[path]:
            changes.append(f"{path} has other content of the same size" if "sha256" in new[path]
                           else f"{path} was modified (its modification time changed)")
    return changes or ["its files hold the same contents in another order (renamed files)"]


def default_cache_dir() -> Path:
    """``$DIFFLLAMA_CACHE`` or ``~/.cache/diffllama``."""
    return Path(os.environ.get("DIFFLLAMA_CACHE") or Path.home() / ".cache" / "diffllama")


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder (so ``path`` cannot be a folder), or
    None."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def cache_root(cache_dir: str = "") -> Path:
    """The cache folder of a run: ``cache_dir`` (the ``cache_dir`` setting, ``--cache-dir``), else
    :func:`default_cache_dir`.

    Raises:
        ValueError: the folder is a file or lies under one, naming the setting it came from.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    blocker = file_in_the_way(root)
    if blocker is not None:
        source = "cache_dir (--cache-dir)" if cache_dir else "$DIFFLLAMA_CACHE"
        where = "is a file" if blocker == root else f"lies under the file {blocker}"
        raise ValueError(f"{source} {str(root)!r} {where}, expected a folder for the tokenized-data cache "
                         f"(it is created when missing)")
    return root


# ---- tokenizer ----------------------------------------------------------------------------------------------------

def train_bpe(documents: Iterator[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``documents`` (an iterable of str).

    The vocabulary holds the 256 byte symbols, the special tokens ``<s>`` (BOS), ``</s>`` (EOS, the document
    separator) and ``<pad>``, and merges up to ``vocab_size`` entries in all. No BOS/EOS template is added on
    encode; the data pipeline appends EOS itself.

    Returns:
        :class:`diffllama.tokenizer.Tokenizer` wrapping the trained ``tokenizers.Tokenizer``.

    Raises:
        ValueError: ``vocab_size`` below 300.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    return Tokenizer.from_tokenizers(tok, **SPECIAL_TOKENS)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 hex of the tokenizer's serialized JSON and its EOS id."""
    backend = tokenizer.backend
    text = backend.to_str() if hasattr(backend, "to_str") else repr(tokenizer)
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def load_or_train_tokenizer(files: list[Path], text_field: str, vocab_size: int, cache_dir: Path,
                            tokenizer_dir: str | None = None):
    """Load the tokenizer saved in ``tokenizer_dir``, else train a BPE on ``files`` (cached by input hash).

    Raises:
        ValueError: a loaded tokenizer with no EOS token (needed as the document separator).
        CorpusError: an empty corpus, or a bad file (:func:`count_documents`), before the BPE training starts.
    """
    if tokenizer_dir:
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {tokenizer_dir!r} has no EOS token, needed as document separator")
        return tokenizer
    key = hashlib.sha256(f"{inputs_fingerprint(files, text_field)}|bpe|{vocab_size}".encode()).hexdigest()[:16]
    folder = cache_dir / "tokenizers" / key
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(folder)
    count_documents(files, text_field)
    tokenizer = train_bpe(iter_documents(files, text_field), vocab_size)
    with _staging(folder.parent) as staging:
        tokenizer.save_pretrained(staging)
        _publish(staging, folder, "tokenizer.json")
    return Tokenizer.from_pretrained(folder)


# ---- staging folders ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _staging(parent: Path) -> Iterator[Path]:
    """A new folder ``parent/.tmp-XXXX`` to fill and :func:`_publish`; removed when the block raises, SIGTERM included.

    While the block runs, this process holds an exclusive ``flock`` on ``parent/.tmp-XXXX.lock``, taken before the
    folder exists. The OS drops the lock when the process dies however it dies (SIGKILL, the OOM killer), so a
    staging folder whose lock can be taken was left by a dead process: those (GBs of shards for a large corpus) are
    removed here first, and a folder another live process is writing is never touched.
    """
    parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(parent)
    fd, lock = tempfile.mkstemp(prefix=".tmp-", suffix=".lock", dir=parent)
    try:
        if fcntl is not None:
            # A filesystem without flock (e.g. Lustre mounted without -o flock) fails here and in every other
            # process' _remove_dead_staging alike, so the folder is never taken for a dead one.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        staging = Path(lock[:-len(".lock")])
        staging.mkdir()
        try:
            with _sigterm_raises():
                yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        os.unlink(lock)
        os.close(fd)


def _remove_dead_staging(parent: Path) -> None:
    """Remove the staging folders in ``parent`` whose writer is dead: their lock file can be locked (:func:`_staging`).
    Older ``.tmp-*`` folders without a lock file are left alone: nothing tells whether their writer is alive."""
    if fcntl is None:
        return
    for lock in parent.glob(".tmp-*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:  # gone meanwhile (its writer finished), or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live process is writing that folder (or no flock on this filesystem)
            continue
        else:
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises SystemExit(143) inside the block, so that the clean-up of :func:`_staging` runs; only in the
    main thread and where SIGTERM has the default action (which ends the process without any clean-up)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _publish(staging: Path, folder: Path, marker: str) -> None:
    """Rename the complete ``staging`` folder to ``folder``; when another process published the same folder first
    (the rename fails on its non-empty folder, which holds ``marker``), keep theirs."""
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


# ---- packing ------------------------------------------------------------------------------------------------------

@dataclass
class DataMeta:
    """Summary of a prepared corpus (``meta.json``).

    Fields: dtype ("uint16"/"uint32"); tokens / bytes / documents per split (tokens include one EOS per document;
    bytes are UTF-8 bytes of the text); shard file names per split; ``unigram_bits_per_token``: entropy of the
    training tokens' unigram distribution (bits); ``unigram_val_bits_per_token``: cross-entropy of the validation
    tokens under the training unigram (add-one smoothed); the tokenizer's vocab size and fingerprint.
    """

    dtype: str
    vocab_size: int
    tokenizer_hash: str
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int
    train_documents: int
    val_documents: int
    train_shards: list[str]
    val_shards: list[str]
    unigram_bits_per_token: float
    unigram_val_bits_per_token: float
    split: str

    def bits_per_byte(self, nats_per_token: float, split: str = "val") -> float:
        """Convert a loss in nats per token of ``split`` into bits per UTF-8 byte of that split's text."""
        tokens, nbytes = (self.val_tokens, self.val_bytes) if split == "val" else (self.train_tokens,
                                                                                   self.train_bytes)
        return nats_per_token / math.log(2) * tokens / max(nbytes, 1)

    @property
    def unigram_bits_per_byte(self) -> float:
        """Unigram entropy of the training tokens, in bits per byte of training text."""
        return self.unigram_bits_per_token * self.train_tokens / max(self.train_bytes, 1)

    @property
    def unigram_val_bits_per_byte(self) -> float:
        """Validation cross-entropy under the training unigram, in bits per byte of validation text."""
        return self.unigram_val_bits_per_token * self.val_tokens / max(self.val_bytes, 1)


class _ShardWriter:
    """Appends token arrays to ``<prefix>-NNNNN.bin`` files of at most ``SHARD_TOKENS`` tokens."""

    def __init__(self, folder: Path, prefix: str, dtype, counts: np.ndarray) -> None:
        self.folder, self.prefix, self.dtype, self.counts = folder, prefix, dtype, counts
        self.names: list[str] = []
        self.handle = None
        self.in_shard = 0
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        if self.counts is not None:
            self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]
        while len(ids):
            if self.handle is None or self.in_shard >= SHARD_TOKENS:
                self._next()
            take = min(len(ids), SHARD_TOKENS - self.in_shard)
            ids[:take].tofile(self.handle)
            self.in_shard += take
            self.tokens += take
            ids = ids[take:]

    def _next(self) -> None:
        if self.handle is not None:
            self.handle.close()
        name = f"{self.prefix}-{len(self.names):05d}.bin"
        self.names.append(name)
        self.handle = open(self.folder / name, "wb")
        self.in_shard = 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def prepare_data(files: list[Path], tokenizer, *, text_field: str = "text", val_fraction: float = 0.02,
                 cache_dir: Path | None = None, batch_documents: int = 64) -> tuple[Path, DataMeta]:
    """Tokenize the corpus into packed train/val shards (reused when already cached).

    Args:
        files: corpus files (see :func:`list_input_files`). tokenizer: a :class:`diffllama.tokenizer.Tokenizer`
            with an EOS token. text_field: JSONL text key. val_fraction: validation share in (0, 1).
        cache_dir: cache root (default :func:`default_cache_dir`); data lands in ``cache_dir/data/<hash>``.

    Returns:
        (folder, meta): the folder holding ``train-*.bin``, ``val-*.bin``, ``meta.json``.

    Raises:
        CorpusError: no text at all, a bad file (:func:`count_documents`; before anything is written), or a split
            that ends up empty.
        ValueError: a tokenizer without EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, needed as the document separator")
    folder = _cache_folder(files, tokenizer, text_field, val_fraction, cache_dir)
    if (folder / "meta.json").is_file():
        return folder, DataMeta(**json.loads((folder / "meta.json").read_text()))

    n_docs = count_documents(files, text_field)
    by_document = n_docs >= 20
    is_val_doc = _val_documents(n_docs, val_fraction) if by_document else None
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    with _staging(folder.parent) as staging:
        counts = np.zeros(vocab, dtype=np.int64)
        val_counts = np.zeros(vocab, dtype=np.int64)
        train = _ShardWriter(staging, "train", dtype, counts)
        val = _ShardWriter(staging, "val", dtype, val_counts)
        stats = _write_splits(iter_documents(files, text_field), tokenizer, eos, is_val_doc, val_fraction, train, val,
                              batch_documents)
        train.close()
        val.close()
        if train.tokens == 0 or val.tokens == 0:
            raise CorpusError(f"the corpus is too small to split: {train.tokens} train and {val.tokens} "
                              f"validation tokens")
        meta = _data_meta(tokenizer, train, val, stats, split="documents" if by_document else "document tails")
        (staging / "meta.json").write_text(json.dumps(meta.__dict__, indent=2) + "\n")
        _publish(staging, folder, "meta.json")
    return folder, DataMeta(**json.loads((folder / "meta.json").read_text()))


def _cache_folder(files: list[Path], tokenizer, text_field: str, val_fraction: float,
                  cache_dir: Path | None) -> Path:
    """The cache folder of the corpus tokenized by ``tokenizer`` and split by ``val_fraction``."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    # "bytes2": caches of earlier versions counted the bytes of a document cut inside a character wrongly
    key = hashlib.sha256(f"{inputs_fingerprint(files, text_field)}|{tokenizer_fingerprint(tokenizer)}|"
                         f"{val_fraction}|bytes2".encode()).hexdigest()[:16]
    return cache_dir / "data" / key


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of ``size`` consecutive items (the last one shorter); none for no items."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _write_splits(texts: Iterator[str], tokenizer, eos: int, is_val_doc: np.ndarray | None, val_fraction: float,
                  train: _ShardWriter, val: _ShardWriter, batch_documents: int) -> dict[str, int]:
    """Tokenize ``texts`` (``batch_documents`` at a time) into ``train`` and ``val``, each document followed by
    ``eos``: whole documents as ``is_val_doc`` says, or where it is None each document's tail to validation
    (:func:`_split_tail`). Returns the bytes and documents of each split."""
    stats = {"train_bytes": 0, "val_bytes": 0, "train_documents": 0, "val_documents": 0}
    index = 0
    for batch in _batched(texts, batch_documents):
        for text, ids in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
            ids = np.asarray(ids + [eos], dtype=np.int64)
            if is_val_doc is None:
                _split_tail(text, ids, tokenizer, val_fraction, train, val, stats)
            else:
                split = "val" if is_val_doc[index] else "train"
                (val if split == "val" else train).write(ids)
                stats[f"{split}_bytes"] += len(text.encode("utf-8"))
                stats[f"{split}_documents"] += 1
            index += 1
    return stats


def _split_tail(text: str, ids: np.ndarray, tokenizer, val_fraction: float, train: _ShardWriter, val: _ShardWriter,
                stats: dict[str, int]) -> None:
    """Write the last ``val_fraction`` of one document's tokens (at least one) to ``val``, the rest to ``train``,
    and count the document and its bytes in both splits of ``stats``."""
    cut = len(ids) - max(1, int(round(len(ids) * val_fraction)))
    train.write(ids[:cut])
    val.write(ids[cut:])
    head = tokenizer.decode(ids[:cut].tolist(), skip_special_tokens=True)
    # A cut inside a multi-byte character decodes its first bytes as U+FFFD (3 bytes): that
    # character's bytes count to validation, so both counts are the text's own bytes.
    while head.endswith("\ufffd") and not text.startswith(head):
        head = head[:-1]
    stats["train_bytes"] += len(head.encode("utf-8"))
    stats["val_bytes"] += len(text.encode("utf-8")) - len(head.encode("utf-8"))
    stats["train_documents"] += 1
    stats["val_documents"] += 1


def _data_meta(tokenizer, train: _ShardWriter, val: _ShardWriter, stats: dict[str, int], split: str) -> DataMeta:
    """The :class:`DataMeta` of finished ``train`` and ``val`` shards: sizes, and unigram entropies from the token
    counts the writers kept (validation's under add-one smoothed training frequencies)."""
    counts, val_counts = train.counts, val.counts
    vocab = len(counts)
    p = counts[counts > 0] / counts.sum()
    smoothed = (counts + 1) / (counts.sum() + vocab)
    return DataMeta(
        dtype=np.dtype(train.dtype).name, vocab_size=vocab, tokenizer_hash=tokenizer_fingerprint(tokenizer),
        train_tokens=train.tokens, val_tokens=val.tokens, train_shards=train.names, val_shards=val.names,
        unigram_bits_per_token=float(-(p * np.log2(p)).sum()),
        unigram_val_bits_per_token=float(-(val_counts * np.log2(smoothed)).sum() / val_counts.sum()),
        split=split, **stats)


def _val_documents(n_docs: int, val_fraction: float) -> np.ndarray:
    """Boolean mask of evenly spaced validation documents: about ``n_docs × val_fraction``, at least one."""
    n_val = min(n_docs - 1, max(1, int(round(n_docs * val_fraction))))
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.linspace(0, n_docs - 1, n_val + 2)[1:-1].round().astype(int)] = True
    return mask


# ---- serving windows ----------------------------------------------------------------------------------------------

class TokenShards:
    """Non-overlapping windows of ``seq_len + 1`` tokens over one split's memory-mapped shards.

    Window i of a shard covers tokens ``[i·seq_len, i·seq_len + seq_len + 1)``: the inputs are its first
    ``seq_len`` tokens and the targets the last ``seq_len``. Windows never cross shard boundaries.

    Raises:
        CorpusError: when the split holds no complete window (names the token count and ``seq_len``).
    """

    def __init__(self, folder: Path, shard_names: list[str], dtype: str, seq_len: int, split: str = "train"):
        self.seq_len = seq_len
        self.arrays = [np.memmap(Path(folder) / n, dtype=np.dtype(dtype), mode="r") for n in shard_names]
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self.offsets[-1])
        if self.num_windows == 0:
            total = sum(len(a) for a in self.arrays)
            raise CorpusError(f"the {split} split has {total} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                              f"use a larger corpus, a smaller seq_len, or (for validation) a larger val_fraction")

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> np.ndarray:
        """Tokens of window ``index`` as int64, shape (seq_len + 1,)."""
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.arrays[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices) -> np.ndarray:
        """Windows ``indices`` stacked: (len(indices), seq_len + 1) int64."""
        return np.stack([self.window(int(i)) for i in indices])


@dataclass
class BatchPlan:
    """Which training windows each (step, micro-step, rank) reads: a pure function, so resuming needs only the step.

    Global sample k of the run (k = step·G + micro·B·W + rank·B + j, with G = B·accum·W the global batch, B the
    per-rank micro-batch, W the world size) is window ``perm_e[k mod N]`` of epoch e = k // N, where ``perm_e`` is
    a permutation of the N windows seeded by (seed, e). One process with micro-batch B·W therefore reads the same
    windows, in the same order, as W processes with micro-batch B.
    """

    num_windows: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        self._perm_epoch = -1
        self._perm = None

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.batch_size * self.grad_accum * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        """Window indices (length ``batch_size``) for ``rank``'s micro-batch ``micro`` of optimizer step ``step``."""
        first = step * self.global_batch + micro * self.batch_size * self.world_size + rank * self.batch_size
        out = []
        for k in range(first, first + self.batch_size):
            out.append(int(self._permutation(k // self.num_windows)[k % self.num_windows]))
        return out

    def epoch(self, step: int) -> float:
        """Epochs of training data consumed after ``step`` steps."""
        return step * self.global_batch / self.num_windows
