"""Tokenizer: loading tokenizer.json / tokenizer.model, special tokens, AutoTokenizer round trip, streaming text."""

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from diffllama.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Differential attention cancels noise: softmax minus lambda times softmax.",
    "Unicode: héllo wörld, 日本語のテキスト, emoji 🎉🚀 and ümlauts.",
    "The quick brown fox jumps over the lazy dog. " * 3,
]
TEXTS = ["Hello world!", "  leading spaces and 日本語 🎉", "fox", "ümlaut ß 🚀🚀 end."]


def make_bytelevel(bos="<s>", eos="</s>", pad="<pad>"):
    """A small byte-level BPE with a Llama-like BOS template (built in memory, ~50 ms)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[pad, bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return Tokenizer.from_tokenizers(tok, bos_token=bos, eos_token=eos, pad_token=pad)


@pytest.fixture(scope="module")
def tok():
    return make_bytelevel()


def test_encode_decode_and_special_ids(tok):
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id == 1
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>Hello world"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert all(tok.decode(tok.encode(t)) == t for t in TEXTS)
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(123)
    with pytest.raises(ValueError, match="eos_token 'nope'"):
        Tokenizer.from_tokenizers(tok.backend, eos_token="nope")
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        Tokenizer.from_pretrained(tmp_path)


def test_run_folder_and_saving_onto_a_file(tok, tmp_path):
    run = tmp_path / "run"
    tok.save_pretrained(run / "model")
    (run / "model" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("max_steps: 1\n")
    with pytest.raises(FileNotFoundError, match=f"training run folder: its final model is in {run / 'model'}"):
        Tokenizer.from_pretrained(run)
    assert Tokenizer.from_pretrained(run / "model").encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    with pytest.raises(NotADirectoryError, match="is a file; expected a folder"):
        tok.save_pretrained(run / "config.yaml")
    assert not [p for p in (run / "model").iterdir() if p.name.startswith(".")]  # no temp files left


def test_save_load_roundtrip_and_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    again = Tokenizer.from_pretrained(tmp_path)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 0)
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False)
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_call_matches_transformers_padding(tok, tmp_path, side):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), padding_side=side)
    got, want = tok(TEXTS, return_tensors="pt", padding_side=side), hf(TEXTS, return_tensors="pt", padding=True)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    assert tok(TEXTS[0]) == {"input_ids": hf(TEXTS[0])["input_ids"], "attention_mask": hf(TEXTS[0])["attention_mask"]}
    assert tok(TEXTS)["input_ids"] == hf(TEXTS)["input_ids"]
    assert tok(TEXTS[0], return_tensors="pt")["input_ids"].shape == (1, len(tok.encode(TEXTS[0])))


def test_call_bad_inputs(tok):
    with pytest.raises(ValueError, match="return_tensors must be None or 'pt', got 'np'"):
        tok("hi", return_tensors="np")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'up'"):
        tok(["hi"], return_tensors="pt", padding_side="up")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        tok(["hi"], padding_side="middle")
    with pytest.raises(TypeError, match="text must be a str or a list of str, got int"):
        tok(5)


def test_special_tokens_from_config_files(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, None)
    assert Tokenizer.from_pretrained(tmp_path / "tokenizer.json").eos_token_id == 2  # configs beside the file
    assert Tokenizer.from_pretrained(tmp_path, pad_token="<pad>").pad_token_id == 0


@pytest.mark.parametrize("text", TEXTS + ["🎉" * 5 + " naïve café 日本"])
def test_incremental_detokenizer_matches_decode(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_holds_back_partial_utf8(tok):
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should span several byte-level tokens in this tiny vocabulary"
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🎉"


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=3, minloglevel=2)
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (tmp_path / "sp.model").rename(model_dir / "tokenizer.model")
    tok = Tokenizer.from_pretrained(model_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 3, 400)
    text = "Hello 日本 🎉 world"
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.decode(ids) == text
    detok = tok.detokenizer()
    assert "".join([detok.add(i) for i in ids] + [detok.flush()]) == text
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    assert Tokenizer.from_pretrained(out).encode(text) == ids
