"""Tokenizers for DiffLlama checkpoints: ``tokenizer.json`` (Hugging Face ``tokenizers``) or ``tokenizer.model``
(sentencepiece), with the special tokens a checkpoint's ``tokenizer_config.json`` / ``special_tokens_map.json``
name, and an incremental detokenizer for streaming text.

``Tokenizer.save_pretrained`` writes the files ``transformers.AutoTokenizer.from_pretrained`` reads
(tokenizer.json, tokenizer_config.json with ``tokenizer_class: PreTrainedTokenizerFast``, special_tokens_map.json),
and it encodes the same ids as this class. A sentencepiece-backed tokenizer saves its ``tokenizer.model`` and a
config instead (no tokenizer.json: converting the model is transformers' job, not a runtime dependency here).

The streaming detokenizer follows the usual "decode a short window twice, emit the difference" idea: decoding a
prefix and the prefix plus new ids and emitting only the new suffix keeps the spaces that SentencePiece/byte-level
decoders attach to a token's neighbours, and holding back text that ends in U+FFFD waits for the rest of a
multi-byte UTF-8 character split across byte-fallback tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffllama.generation import pad_batch
from diffllama.hub import resolve_checkpoint_dir
from diffllama.io import atomic_write, atomic_write_text, read_json_object

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value) -> str | None:
    """A special-token entry of a tokenizer config: a string, or transformers' AddedToken dict ``{"content": ...}``."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    """A tokenizer config file's object, {} when the file is absent (ValueError when it is malformed)."""
    return read_json_object(path) if path.is_file() else {}


class Tokenizer:
    """Text <-> token ids for a DiffLlama checkpoint, backed by ``tokenizers`` or by sentencepiece.

    Build it with :meth:`from_pretrained` (a checkpoint directory or a tokenizer file) or :meth:`from_tokenizers`
    (an in-memory ``tokenizers.Tokenizer``). Ids are plain Python ``int`` lists; calling the tokenizer
    (``tokenizer(texts, return_tensors="pt")``) pads a batch into tensors, as transformers' tokenizers do.

    Special tokens (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``) are strings; their ids are looked up
    in the vocabulary. Whether ``encode`` adds BOS/EOS is decided by the tokenizer itself (the post-processor of a
    tokenizer.json; for sentencepiece, ``add_bos_token`` (default True) / ``add_eos_token`` (default False) of
    tokenizer_config.json), as transformers does.
    """

    def __init__(self, *, backend, kind: str, special_tokens: dict[str, str | None],
                 add_bos: bool = False, add_eos: bool = False, source: Path | None = None) -> None:
        """Prefer :meth:`from_pretrained` or :meth:`from_tokenizers`.

        Args:
            backend: a ``tokenizers.Tokenizer`` (kind "tokenizers") or a ``sentencepiece.SentencePieceProcessor``
                (kind "sentencepiece").
            special_tokens: {"bos_token", "eos_token", "pad_token", "unk_token"} -> token string or None.
            add_bos, add_eos: sentencepiece only: whether ``encode`` adds BOS / EOS (tokenizers: its post-processor).
            source: the file it was read from, if any (saving onto it is skipped).

        Raises:
            ValueError: an unknown ``kind``, or a special token not in the vocabulary.
        """
        if kind not in ("tokenizers", "sentencepiece"):
            raise ValueError(f"kind must be 'tokenizers' or 'sentencepiece', got {kind!r}")
        self._backend = backend
        self._kind = kind
        self._special = {name: special_tokens.get(name) for name in _SPECIAL_NAMES}
        self._add_bos, self._add_eos = add_bos, add_eos
        self._source = source
        for name, token in self._special.items():
            if token is not None and self.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike, **special_tokens: str | None) -> Tokenizer:
        """Load a tokenizer from a checkpoint directory, a ``tokenizer.json`` / ``tokenizer.model`` file, or a hub
        repo id (resolved as the model's: local cache first, then the network unless ``HF_HUB_OFFLINE`` is set;
        see :func:`diffllama.hub.resolve_checkpoint_dir`).

        A directory is searched for tokenizer.json first, then tokenizer.model; special tokens come from keyword
        arguments (``bos_token=``, ``eos_token=``, ``pad_token=``, ``unk_token=``), else tokenizer_config.json,
        else special_tokens_map.json, else (sentencepiece) the model's own BOS/EOS/PAD/UNK pieces.

        Raises:
            FileNotFoundError: the path does not exist (nor names a reachable repo), it is a training run folder
                (the message names the model folder to give instead), or the directory has neither tokenizer.json
                nor tokenizer.model. ValueError: a malformed file, or a special token not in the vocabulary.
            ImportError: a sentencepiece model without the ``sentencepiece`` package installed.
        """
        path = Path(path_or_dir).expanduser()
        if not path.is_file():
            path = resolve_checkpoint_dir(path_or_dir)
        if path.is_file():
            directory, file = path.parent, path
        else:
            directory = path
            file = next((path / n for n in (TOKENIZER_JSON, SENTENCEPIECE_MODEL) if (path / n).is_file()), None)
            if file is None:
                raise FileNotFoundError(
                    f"no tokenizer in {str(path)!r}: expected {TOKENIZER_JSON} (Hugging Face tokenizers) or "
                    f"{SENTENCEPIECE_MODEL} (sentencepiece)")
        config = _read_json(directory / TOKENIZER_CONFIG)  # the configs beside the file, when present
        special_map = _read_json(directory / SPECIAL_TOKENS_MAP)
        special: dict[str, str | None] = {}
        for name in _SPECIAL_NAMES:
            if name in special_tokens:
                special[name] = special_tokens[name]
            else:
                special[name] = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if file.suffix == ".json":
            import tokenizers

            try:
                backend = tokenizers.Tokenizer.from_file(str(file))
            except Exception as error:  # tokenizers raises a bare Exception for parse errors
                raise ValueError(f"{file} is not a valid tokenizers file: {error}") from error
            return cls(backend=backend, kind="tokenizers", special_tokens=special, source=file)
        return cls._from_sentencepiece(file, config, special)

    @classmethod
    def _from_sentencepiece(cls, file: Path, config: dict, special: dict) -> Tokenizer:
        try:
            import sentencepiece
        except ImportError as error:
            raise ImportError(f"{file} is a sentencepiece model: pip install sentencepiece") from error
        backend = sentencepiece.SentencePieceProcessor()
        try:
            backend.Load(str(file))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{file} is not a valid sentencepiece model: {error}") from error
        own = {"bos_token": backend.bos_id(), "eos_token": backend.eos_id(), "pad_token": backend.pad_id(),
               "unk_token": backend.unk_id()}
        for name, idx in own.items():
            if special.get(name) is None and idx >= 0:
                special[name] = backend.id_to_piece(idx)
        return cls(backend=backend, kind="sentencepiece", special_tokens=special,
                   add_bos=bool(config.get("add_bos_token", True)), add_eos=bool(config.get("add_eos_token", False)),
                   source=file)

    @classmethod
    def from_tokenizers(cls, tok, *, bos_token: str | None = None, eos_token: str | None = None,
                        pad_token: str | None = None, unk_token: str | None = None) -> Tokenizer:
        """Wrap an in-memory ``tokenizers.Tokenizer``; special tokens are given as strings of its vocabulary.

        Raises:
            TypeError: ``tok`` is not a ``tokenizers.Tokenizer``. ValueError: a special token not in the vocabulary.
        """
        import tokenizers

        if not isinstance(tok, tokenizers.Tokenizer):
            raise TypeError(f"tok must be a tokenizers.Tokenizer, got {type(tok).__name__}")
        special = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        return cls(backend=tok, kind="tokenizers", special_tokens=special)

    # ---- properties ----------------------------------------------------------------------------------------------

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer`` or ``sentencepiece.SentencePieceProcessor``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        if self._kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (a vocabulary string), or None when it is not in the vocabulary."""
        if self._kind == "tokenizers":
            return self._backend.token_to_id(token)
        idx = self._backend.piece_to_id(token)
        # sentencepiece maps unknown pieces to unk; accept unk only for the unk piece itself
        return None if idx == self._backend.unk_id() and self._backend.id_to_piece(idx) != token else idx

    def _special_id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self.token_to_id(token)

    bos_token = property(lambda self: self._special["bos_token"], doc="BOS string or None.")
    eos_token = property(lambda self: self._special["eos_token"], doc="EOS string or None.")
    pad_token = property(lambda self: self._special["pad_token"], doc="PAD string or None.")
    bos_token_id = property(lambda self: self._special_id("bos_token"), doc="BOS id or None.")
    eos_token_id = property(lambda self: self._special_id("eos_token"), doc="EOS id or None.")
    pad_token_id = property(lambda self: self._special_id("pad_token"), doc="PAD id or None.")
    unk_token_id = property(lambda self: self._special_id("unk_token"), doc="UNK id or None.")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self._kind!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")

    # ---- encode / decode -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the tokenizer's BOS/EOS template is applied.

        Raises:
            TypeError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._kind == "tokenizers":
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = list(self._backend.encode(text))
        if add_special_tokens:
            if self._add_bos and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self._add_eos and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True, return_tensors: str | None = None,
                 padding_side: str = "left") -> dict:
        """transformers-style encoding: ``{"input_ids": ..., "attention_mask": ...}``.

        A str gives a list of ids and a list of ones; a list of str gives a list of each. With
        ``return_tensors="pt"`` both are (B, S) int64 tensors (B = 1 for a str), a batch padded with the pad id
        (else EOS, else 0) on ``padding_side``: "left", which ``generate`` needs, or "right". So
        ``model.generate(**tokenizer(prompts, return_tensors="pt"))`` works.

        Raises:
            TypeError: ``text`` is not a str or a list of str.
            ValueError: ``return_tensors`` other than None or "pt", a ``padding_side`` other than "left"/"right",
                or (with "pt") a text that encodes to no token.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        single = isinstance(text, str)
        if not single and not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        ids = self.encode_batch([text] if single else text, add_special_tokens)
        if return_tensors == "pt":
            pad = next((p for p in (self.pad_token_id, self.eos_token_id) if p is not None), 0)
            input_ids, mask = pad_batch(ids, pad_token_id=pad, padding_side=padding_side)
            return {"input_ids": input_ids, "attention_mask": mask}
        masks = [[1] * len(row) for row in ids]
        return {"input_ids": ids[0], "attention_mask": masks[0]} if single else {"input_ids": ids,
                                                                                 "attention_mask": masks}

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel for the tokenizers backend. Raises TypeError for non-str."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got a {type(t).__name__}")
        if self._kind == "tokenizers":
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return [self.encode(t, add_special_tokens) for t in texts]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's character span ``(start, end)`` in ``text`` (end exclusive).

        Used to align labels to sub-word tokens and to map answer character spans to token spans. Byte-level BPE
        spans include a token's leading space; tokens that split one multi-byte character share its span; added
        special tokens get ``(0, 0)``.

        Raises:
            TypeError: ``text`` is not a str. NotImplementedError: a sentencepiece-backed tokenizer (no offsets).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._kind != "tokenizers":
            raise NotImplementedError("character offsets need a tokenizer.json (Hugging Face tokenizers) tokenizer")
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [(int(a), int(b)) for a, b in encoding.offsets]

    def _special_ids(self) -> set[int]:
        ids = {self._special_id(n) for n in _SPECIAL_NAMES}
        if self._kind == "tokenizers":
            ids |= {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        else:
            ids |= {i for i in range(self._backend.get_piece_size()) if self._backend.is_control(i)}
        ids.discard(None)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list of ints, or a 1-D integer tensor); special tokens dropped when asked.

        Raises:
            ValueError: a tensor that is not 1-D.
        """
        if hasattr(ids, "tolist"):
            if getattr(ids, "dim", lambda: 1)() != 1:
                raise ValueError(f"decode takes one sequence (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self._kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            special = self._special_ids()
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh :class:`IncrementalDetokenizer` over this tokenizer."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- saving --------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write the tokenizer into ``directory`` (created if missing) so that both this class and
        ``transformers.AutoTokenizer.from_pretrained`` load it and encode identically.

        tokenizers backend: tokenizer.json, tokenizer_config.json (``tokenizer_class: PreTrainedTokenizerFast``),
        special_tokens_map.json. sentencepiece backend: tokenizer.model and the two JSON files
        (``tokenizer_class: LlamaTokenizer``; transformers converts it on load). tokenizer_config.json sets
        ``padding_side: "left"``, so ``AutoTokenizer`` pads batches for generation as :meth:`__call__` does.

        Each file is written whole or not at all (a temp file and a rename), the vocabulary first.

        Returns:
            The paths written.

        Raises:
            NotADirectoryError: ``directory`` (or a parent) is a file.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"directory {str(directory)!r} is a file; expected a folder to save into")
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        special = {n: t for n, t in self._special.items() if t is not None}
        if self._kind == "tokenizers":
            written.append(atomic_write(directory / TOKENIZER_JSON, lambda tmp: self._backend.save(str(tmp))))
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "model_max_length": 1_000_000_000_000_000_019_884_624_838_656, **special}
        else:
            target = directory / SENTENCEPIECE_MODEL
            if self._source is None or self._source.resolve() != target.resolve():
                atomic_write(target, lambda tmp: tmp.write_bytes(self._backend.serialized_model_proto()))
            written.append(target)
            config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self._add_bos,
                      "add_eos_token": self._add_eos, "clean_up_tokenization_spaces": False, **special}
        config["padding_side"] = "left"  # AutoTokenizer pads on the right without it; causal LM batches need left
        for name, data in ((TOKENIZER_CONFIG, config), (SPECIAL_TOKENS_MAP, special)):
            written.append(atomic_write_text(directory / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n"))
        return written


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces whose concatenation is ``decode(all ids)``.

    ``add(ids)`` returns the new text that is final so far (possibly ""), ``flush()`` the rest. Text is held back
    while the decoded tail ends in U+FFFD (an incomplete multi-byte UTF-8 character from byte-fallback or
    byte-level tokens); each step decodes only a short window (from ``prefix_offset``), so the cost per token is
    constant. Source: the prefix/read-offset scheme used by several inference servers, written here from scratch.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window decoded before the new text
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, ids) -> str:
        """Append one id or a list of ids; return the newly completed text."""
        if isinstance(ids, int):
            ids = [ids]
        elif hasattr(ids, "tolist"):
            ids = ids.reshape(-1).tolist()
        self.ids.extend(int(i) for i in ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd") and full.startswith(prefix):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset  # the last emitted piece becomes the next window's context
            self.read_offset = len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """All text not yet returned (incomplete characters decode to U+FFFD); resets nothing."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else full
