"""Corpus discovery, BPE training, packed shards with EOS separators, caching, splits and the batch plan."""

import gzip
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffllama.train.data import (BatchPlan, CorpusError, TokenShards, bundled_corpus, iter_documents,
                                  list_input_files, load_or_train_tokenizer, prepare_data, train_bpe)
from train_utils import small_corpus


def test_bundled_corpus_is_there():
    path = bundled_corpus()
    assert path.is_file() and path.stat().st_size < 5_000_000
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert first["year"] == 1790 and "Senate" in first["text"]


def test_linked_folders_are_followed_once(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("linked text")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "docs" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "docs", target_is_directory=True)  # a link cycle
    files = list_input_files([str(tmp_path / "docs")])
    assert files == [(tmp_path / "docs" / "a.txt").resolve(), (tmp_path / "elsewhere" / "x.txt").resolve()]


def test_input_discovery_and_errors(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("alpha beta")
    (tmp_path / "docs" / "sub" / "b.md").write_text("gamma")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\0")
    with gzip.open(tmp_path / "docs" / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"body": "delta"}) + "\n\n" + json.dumps({"body": "  "}) + "\n")
    files = list_input_files([str(tmp_path / "docs"), str(tmp_path / "docs" / "a.txt")])
    assert [f.name for f in files] == ["a.txt", "c.jsonl.gz", "b.md"]
    assert list(iter_documents(files, "body")) == ["alpha beta", "delta", "gamma"]
    with pytest.raises(CorpusError, match="no string field 'text'"):
        list(iter_documents(files, "text"))
    with pytest.raises(CorpusError, match="does not exist"):
        list_input_files([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no text files"):
        list_input_files([str(tmp_path / "empty")])
    with pytest.raises(CorpusError, match="unknown type"):
        list_input_files([str(tmp_path / "docs" / "skip.bin")])
    with pytest.raises(CorpusError, match="no corpus"):
        list_input_files([])


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n")
    files = list_input_files([str(tmp_path / "blank.txt")])
    with pytest.raises(CorpusError, match="holds no text"):
        load_or_train_tokenizer(files, "text", 320, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tokenizers").exists() or not any((tmp_path / "cache" / "tokenizers").iterdir())


# The truncated stream holds text (hex digits): random bytes would also be a non-UTF-8 error, met first at times.
@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(os.urandom(4000).hex().encode())[:200]],
                         ids=["not-gzip", "truncated"])
def test_corrupt_gzip_is_a_corpus_error(tmp_path, content):
    (tmp_path / "bad.txt.gz").write_bytes(content)
    files = list_input_files([str(tmp_path / "bad.txt.gz")])
    with pytest.raises(CorpusError, match="bad.txt.gz' is a corrupt or truncated gzip file"):
        list(iter_documents(files))
    with pytest.raises(CorpusError, match="corrupt or truncated gzip"):
        load_or_train_tokenizer(files, "text", 320, tmp_path / "cache")


def test_prepare_packs_with_eos_and_caches(tmp_path):
    corpus = small_corpus(tmp_path / "corpus", documents=25, chars=800)
    files = list_input_files([str(corpus)])
    tok = load_or_train_tokenizer(files, "text", 320, tmp_path / "cache")
    assert tok.vocab_size == 320 and tok.eos_token_id is not None
    folder, meta = prepare_data(files, tok, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert meta.dtype == "uint16" and meta.split == "documents"
    assert meta.train_documents + meta.val_documents == 25 and meta.val_documents == 2
    train = np.fromfile(folder / meta.train_shards[0], dtype=np.uint16)
    assert len(train) == meta.train_tokens and train[-1] == tok.eos_token_id
    assert int((train == tok.eos_token_id).sum()) == meta.train_documents
    first_doc = train[: int(np.argmax(train == tok.eos_token_id))]
    assert tok.decode(first_doc.tolist()).startswith("Fellow-Citizens of the Senate")
    assert 0 < meta.unigram_bits_per_byte < 8 and meta.unigram_val_bits_per_byte > 0
    # Cached: a second call reuses the folder without rewriting it; a changed input makes a new one.
    stamp = os.stat(folder / "meta.json").st_mtime_ns
    folder2, _ = prepare_data(files, tok, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert folder2 == folder and os.stat(folder / "meta.json").st_mtime_ns == stamp
    with open(corpus, "a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    folder3, _ = prepare_data(list_input_files([str(corpus)]), tok, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert folder3 != folder
    assert not list((tmp_path / "cache" / "data").glob(".tmp-*"))


def test_cache_folders_get_the_umask_permissions(tmp_path):
    """Staged with mkdtemp (0o700): a shared cache would be unreadable to other users."""
    corpus = small_corpus(tmp_path / "corpus", documents=25, chars=800)
    files = list_input_files([str(corpus)])
    old = os.umask(0o027)
    try:
        tok = load_or_train_tokenizer(files, "text", 320, tmp_path / "cache")
        folder, _ = prepare_data(files, tok, val_fraction=0.1, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    (tok_folder,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert [stat.S_IMODE(os.stat(f).st_mode) for f in (tok_folder, folder)] == [0o750, 0o750]


def test_few_documents_split_by_tails(tmp_path):
    (tmp_path / "one.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    files = list_input_files([str(tmp_path / "one.txt")])
    tok = train_bpe(iter_documents(files), 300)
    folder, meta = prepare_data(files, tok, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert meta.split == "document tails" and meta.val_tokens > 0 and meta.train_tokens > 8 * meta.val_tokens
    shards = TokenShards(folder, meta.val_shards, meta.dtype, seq_len=16)
    assert shards.batch([0, 1]).shape == (2, 17)
    with pytest.raises(CorpusError, match="fewer than seq_len"):
        TokenShards(folder, meta.val_shards, meta.dtype, seq_len=meta.val_tokens + 5, split="validation")


def test_windows_are_consecutive_and_shifted(tmp_path):
    data = np.arange(100, dtype=np.uint16)
    data.tofile(tmp_path / "train-00000.bin")
    np.arange(1000, 1010, dtype=np.uint16).tofile(tmp_path / "train-00001.bin")
    shards = TokenShards(tmp_path, ["train-00000.bin", "train-00001.bin"], "uint16", seq_len=8)
    assert len(shards) == 12 + 1  # (100-1)//8 windows, then (10-1)//8 in the second shard
    assert shards.window(1).tolist() == list(range(8, 17))
    assert shards.window(12).tolist() == list(range(1000, 1009))


def test_batch_plan_same_windows_for_any_split_of_the_global_batch():
    one = BatchPlan(num_windows=37, batch_size=8, grad_accum=1, world_size=1, seed=3)
    two = BatchPlan(num_windows=37, batch_size=4, grad_accum=1, world_size=2, seed=3)
    accum = BatchPlan(num_windows=37, batch_size=2, grad_accum=2, world_size=2, seed=3)
    for step in range(12):  # crosses several epochs
        ref = one.indices(step, 0, 0)
        assert two.indices(step, 0, 0) + two.indices(step, 0, 1) == ref
        assert sorted(sum((accum.indices(step, m, r) for m in range(2) for r in range(2)), [])) == sorted(ref)
    epoch0 = [i for s in range(5) for i in one.indices(s, 0, 0)][:37]
    assert sorted(epoch0) == list(range(37))


@pytest.mark.parametrize("name", ["doc.txt", "docs.jsonl.gz"])
def test_non_utf8_corpus_refused_naming_file_line_and_offset(tmp_path, name):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if name == "doc.txt":
        data = "Intro line\nLe café est très bon.\n".encode("latin-1")
        (corpus / name).write_bytes(data)
    else:
        data = (json.dumps({"text": "plain"}) + "\n" + '{"text": "Le café"}\n').encode("latin-1")
        (corpus / name).write_bytes(gzip.compress(data))
    files = list_input_files([str(corpus / name)])
    offset = data.index(b"\xe9")  # é in Latin-1; in UTF-8 it would be 0xc3 0xa9
    expected = (f"corpus file '{corpus / name}' is not UTF-8 text: byte 0xe9 at byte offset {offset}"
                f"{' of the decompressed text' if name.endswith('.gz') else ''} (line 2): invalid continuation byte")
    with pytest.raises(CorpusError) as caught:
        load_or_train_tokenizer(files, "text", 320, tmp_path / "cache")
    assert str(caught.value).startswith(expected), str(caught.value)
    tok = train_bpe(iter(["a good corpus of plain text. " * 50]), 300)
    with pytest.raises(CorpusError) as caught:
        prepare_data(files, tok, cache_dir=tmp_path / "cache")
    assert str(caught.value).startswith(expected)
    # Refused before anything was written: no tokenizer, no shards, no staging folder.
    assert [p.relative_to(tmp_path) for p in sorted((tmp_path / "cache").rglob("*"))] == []


def test_text_documents_decode_as_utf8_with_text_mode_line_ends(tmp_path):
    (tmp_path / "a.txt").write_bytes("café\r\nnaïve\rend\n".encode("utf-8"))
    assert list(iter_documents(list_input_files([str(tmp_path / "a.txt")]))) == ["café\nnaïve\nend\n"]


def test_cache_root_refuses_a_file(tmp_path, monkeypatch):
    from diffllama.train.data import cache_root

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    expected = "expected a folder for the tokenized-data cache (it is created when missing)"
    with pytest.raises(ValueError) as caught:
        cache_root(str(afile))
    assert str(caught.value) == f"cache_dir (--cache-dir) '{afile}' is a file, {expected}"
    with pytest.raises(ValueError) as caught:
        cache_root(str(afile / "sub"))
    assert str(caught.value) == f"cache_dir (--cache-dir) '{afile / 'sub'}' lies under the file {afile}, {expected}"
    monkeypatch.setenv("DIFFLLAMA_CACHE", str(afile))
    with pytest.raises(ValueError) as caught:
        cache_root("")
    assert str(caught.value) == f"$DIFFLLAMA_CACHE '{afile}' is a file, {expected}"
    assert cache_root(str(tmp_path / "new")) == tmp_path / "new" and afile.read_text() == "keep me"


# A process preparing data, stopped while its staging folder holds a shard (the path is its first line of output).
_STAGING_WRITER = """
import sys, time
from pathlib import Path
from diffllama.train.data import _staging
with _staging(Path(sys.argv[1])) as staging:
    (staging / "train-00000.bin").write_bytes(bytes(4096))
    print(staging, flush=True)
    time.sleep(120)
"""


def _start_staging_writer(parent):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _STAGING_WRITER, str(parent)], env=env, stdout=subprocess.PIPE,
                            text=True)
    staging = Path(proc.stdout.readline().strip())
    assert staging.parent == parent and (staging / "train-00000.bin").is_file()
    return proc, staging


@pytest.mark.slow  # a subprocess or several: the README's test command keeps under 3 minutes
def test_staging_of_a_killed_process_is_removed_by_the_next_preparation(tmp_path):
    corpus = small_corpus(tmp_path / "corpus", documents=25, chars=800)
    files = list_input_files([str(corpus)])
    cache = tmp_path / "cache"
    tok = load_or_train_tokenizer(files, "text", 320, cache)
    legacy = cache / "data" / ".tmp-legacy"  # from a version without locks: nothing tells if its writer lives
    legacy.mkdir(parents=True)
    live, live_staging = _start_staging_writer(cache / "data")
    try:
        dead, dead_staging = _start_staging_writer(cache / "data")  # after the live one: it would clean up this one
        dead.kill()  # SIGKILL: no clean-up can run
        dead.wait()
        assert dead_staging.is_dir() and Path(f"{dead_staging}.lock").is_file()
        folder, _ = prepare_data(files, tok, val_fraction=0.1, cache_dir=cache)
        # The dead writer's folder and lock are gone; the live writer's folder and the legacy one are untouched.
        assert sorted(p.name for p in (cache / "data").iterdir()) == sorted(
            [folder.name, ".tmp-legacy", live_staging.name, f"{live_staging.name}.lock"])
        assert (live_staging / "train-00000.bin").is_file()
    finally:
        live.terminate()  # SIGTERM: the writer removes its own staging folder and lock, and exits 143
        assert live.wait(timeout=60) == 143
    assert sorted(p.name for p in (cache / "data").iterdir()) == sorted([folder.name, ".tmp-legacy"])


def test_corpus_changes_name_each_changed_file(tmp_path):
    from diffllama.train.data import corpus_changes, file_fingerprints

    a, b, c = (tmp_path / name for name in ("a.txt", "b.txt", "c.txt"))
    a.write_text("alpha")
    b.write_text("beta")
    saved = file_fingerprints([a, b])
    assert saved[0] == {"path": str(a), "size": 5,
                        "sha256": "8ed3f6ad685b959ead7022518e1af76cd816f8e8ec7ccdda1ed4018e8f2223f8"}
    assert corpus_changes(saved, file_fingerprints([a, b])) == []
    b.write_text("BETA")
    c.write_text("gamma!")
    assert corpus_changes(saved, file_fingerprints([a, b, c])) == [
        f"{b} has other content of the same size", f"{c} is new"]
    b.write_text("beta, longer")
    assert corpus_changes(saved, file_fingerprints([b])) == [f"{a} is no longer part of it",
                                                             f"{b} has 12 bytes, 4 before"]
    b.write_text("beta")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "a.txt").write_text("alpha")
    (moved / "b.txt").write_text("beta")
    assert corpus_changes(saved, file_fingerprints([moved / "a.txt", moved / "b.txt"])) == []  # a moved corpus
    assert corpus_changes(saved, file_fingerprints([b, a])) == [
        "its files hold the same contents in another order (renamed files)"]


@pytest.mark.parametrize("content, message", [
    ('[{"text": "a"}, {"text": "b"}]\n', '1: [{"text": "a"}, {"text": "b"}] is not a JSON object; expected JSON Lines: '
                                         'one JSON object per line, its text under the text field (a JSON array file '
                                         'must be rewritten with one element per line)'),
    ('[\n  {"text": "a"}\n]\n', "1: not valid JSON (Expecting value: line 2 column 1 (char 2)); expected JSON Lines: "
                                "one JSON object per line, its text under the text field"),
], ids=["one-line-array", "pretty-printed-array"])
def test_a_json_array_file_is_told_json_lines_are_expected(tmp_path, content, message):
    path = tmp_path / "corpus.json"
    path.write_text(content)
    with pytest.raises(CorpusError) as caught:
        list(iter_documents([path]))
    assert str(caught.value) == f"{path}:{message}"


def test_document_tail_split_counts_the_bytes_of_a_character_cut_in_two(tmp_path):
    """Ten 3-byte characters, one token per byte: the cut after 28 of 31 tokens falls inside the tenth one."""
    tokenizer = train_bpe(iter(["plain ascii text only"] * 5), 300)
    (tmp_path / "euros.txt").write_text("€" * 10)
    folder, meta = prepare_data([tmp_path / "euros.txt"], tokenizer, val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert (meta.split, meta.train_tokens, meta.val_tokens) == ("document tails", 28, 3)
    assert (meta.train_bytes, meta.val_bytes) == (27, 3)  # 9 whole characters; the 10th (2 of its bytes + EOS)
