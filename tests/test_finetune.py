"""Fine-tuning on small real samples (tests/data, see its README): each task trains a tiny model for a few steps on
CPU and beats the majority / chance baseline on held-out rows; the checkpoint loads in transformers' Auto classes
with identical logits; bad data gives errors naming the file and row."""

from __future__ import annotations

import csv
import gzip
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import diffllama

from diffllama.config import DiffLlamaConfig
from diffllama.finetune.retrieval import write_retrieval_qa
from diffllama.finetune.run import finetune_config, run_finetune
from diffllama.finetune.tasks import TaskOptions, get_task
from diffllama.modeling import DiffLlamaForCausalLM
from diffllama.train.data import bundled_corpus, train_bpe

DATA = Path(__file__).parent / "data"
RT_DATA = Path(diffllama.__file__).parent / "data"  # the Rotten Tomatoes slices ship with the package (eval's ICL default)


def _documents(n: int) -> list[str]:
    with gzip.open(bundled_corpus(), "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for _, line in zip(range(n), handle)]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny causal checkpoint (hidden 64, 2 layers) with a 1024-token BPE trained on the samples' text."""
    folder = tmp_path_factory.mktemp("base")
    texts = [row["text"] for row in csv.DictReader(open(RT_DATA / "rt_train.csv", encoding="utf-8"))]
    words = [line.split("\t")[0] for line in open(DATA / "brown_train.conll", encoding="utf-8") if line.strip()]
    tokenizer = train_bpe(iter([d[:20000] for d in _documents(40)] + texts + [" ".join(words)]), 1024)
    config = DiffLlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    DiffLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _finetune(task_name, base, run_dir, train, evaluate, steps, lr, **options):
    task = get_task(task_name, TaskOptions(**options))
    cfg = finetune_config(dict(max_steps=steps, lr=lr, warmup_steps=10, eval_every=steps, batch_size=16,
                               device="cpu", seed=0, log_every=steps, num_threads=1))
    return run_finetune(task, cfg, run_dir, model_dir=base, train_path=train, eval_path=evaluate, quiet=True)


@pytest.mark.slow  # trains a few hundred steps: run in CI's second command
def test_sequence_classification_beats_majority(base_model, tmp_path):
    result = _finetune("sequence-classification", base_model, tmp_path / "run", RT_DATA / "rt_train.csv",
                       RT_DATA / "rt_test.csv", steps=200, lr=1e-3, max_length=64)
    summary = result.metrics["summary"]
    assert summary["loading_report"]["new"] == ["score.weight"]
    assert summary["eval"]["accuracy"] > summary["baseline"]["majority_accuracy"]
    saved = json.loads((tmp_path / "run" / "finetune_metrics.json").read_text())
    assert saved["eval"]["accuracy"] == summary["eval"]["accuracy"] and "macro_f1" in saved["eval"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "fresh", "1": "rotten"} and config["label2id"] == {"fresh": 0, "rotten": 1}


@pytest.mark.slow  # trains a few hundred steps: run in CI's second command
def test_token_classification_beats_majority_tag(base_model, tmp_path):
    result = _finetune("token-classification", base_model, tmp_path / "run", DATA / "brown_train.conll",
                       DATA / "brown_test.conll", steps=100, lr=3e-3, max_length=96)
    summary = result.metrics["summary"]
    assert summary["eval"]["token_accuracy"] > summary["baseline"]["majority_token_accuracy"] + 0.2
    assert "NOUN" in summary["eval"]["per_tag"] and 0 <= summary["eval"]["per_tag"]["NOUN"]["f1"] <= 1


@pytest.mark.slow  # trains a few hundred steps: run in CI's second command
def test_retrieval_qa_beats_chance_and_reports_depth(base_model, tmp_path):
    documents = _documents(40)
    write_retrieval_qa(tmp_path / "train.json", documents[:30], 400, passage_words=40, seed=1)
    write_retrieval_qa(tmp_path / "test.json", documents[30:], 60, passage_words=40, seed=2)
    result = _finetune("question-answering", base_model, tmp_path / "run", tmp_path / "train.json",
                       tmp_path / "test.json", steps=80, lr=3e-3, max_length=80, stride=16)
    summary = result.metrics["summary"]
    assert summary["eval"]["exact_match"] > 20.0 > summary["baseline"]["majority_answer_exact_match"]
    assert set(summary["eval"]["by_depth"]) == {"0.00", "0.25", "0.50", "0.75", "1.00"}


def test_squad_sample_end_to_end_and_windows(base_model, tmp_path):
    """The real SQuAD-format fixture: windows with a stride, answers mapped to token spans, training runs."""
    from diffllama.finetune.data import read_squad
    from diffllama.tokenizer import Tokenizer

    examples = read_squad(DATA / "squad_sample.json")
    assert len(examples) == 5
    tokenizer = Tokenizer.from_pretrained(base_model)
    task = get_task("question-answering", TaskOptions(max_length=64, stride=16))
    features = task.encode(tokenizer, examples, None)
    assert len(features) > len(examples)  # long contexts are split
    for f in features.items:
        if f.start:
            example = examples[f.example]
            a, b = f.offsets[f.start - f.context_start][0], f.offsets[f.end - f.context_start][1]
            assert example.answers[0] in example.context[a:b]
    assert any(f.start for f in features.items)
    result = _finetune("question-answering", base_model, tmp_path / "run", DATA / "squad_sample.json",
                       DATA / "squad_sample.json", steps=2, lr=1e-3, max_length=64, stride=16)
    assert result.metrics["summary"]["eval"]["count"] == 5


@pytest.mark.parametrize("task_name, auto_name, train", [
    ("sequence-classification", "AutoModelForSequenceClassification", RT_DATA / "rt_test.csv"),
    ("token-classification", "AutoModelForTokenClassification", "brown_test.conll"),
    ("question-answering", "AutoModelForQuestionAnswering", "squad_sample.json"),
])
def test_checkpoint_loads_in_transformers_auto_class(base_model, tmp_path, task_name, auto_name, train):
    transformers = pytest.importorskip("transformers")
    _finetune(task_name, base_model, tmp_path / "run", DATA / train, None, steps=2, lr=1e-3, max_length=64,
              stride=16)
    model_dir = tmp_path / "run" / "model"
    ours = get_task(task_name).model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(transformers, auto_name).from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 1024, (2, 12))
    ids[1, 9:] = ours.config.pad_token_id  # a right-padded row: pooling must pick the same token
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
    if task_name == "question-answering":
        torch.testing.assert_close(a.start_logits, b.start_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.end_logits, b.end_logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        assert theirs.config.id2label == ours.config.id2label


def test_predict_cli_reads_stdin(base_model, tmp_path):
    from typer.testing import CliRunner

    from diffllama.cli import app

    _finetune("sequence-classification", base_model, tmp_path / "run", RT_DATA / "rt_test.csv", None, steps=2,
              lr=1e-3, max_length=64)
    result = CliRunner().invoke(app, ["predict", "sequence-classification", "--model", str(tmp_path / "run" / "model"),
                                      "-"], input="A triumph.\nA mess.\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and lines[0]["label"] in ("fresh", "rotten")
    assert abs(sum(lines[0]["scores"].values()) - 1) < 1e-4


# ---- `diffllama predict` / `diffllama finetune` argument and checkpoint checks: one 'error: ...' line, no work ----

@pytest.fixture(scope="module")
def classifier(base_model, tmp_path_factory) -> Path:
    """A sequence-classification checkpoint (2 steps on the small test set): RUN_DIR/model."""
    run_dir = tmp_path_factory.mktemp("classifier") / "run"
    _finetune("sequence-classification", base_model, run_dir, RT_DATA / "rt_test.csv", None, steps=2, lr=1e-3,
              max_length=64)
    return run_dir / "model"


def _cli(*args, input=None):
    from typer.testing import CliRunner

    from diffllama.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def _refused(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["0", "-1"])
def test_predict_refuses_batch_size_below_one(classifier, value):
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "--batch-size", value, "-",
                  input="A triumph.\n"), 2, f"--batch-size must be >= 1 (sequences per forward pass), got {value}")


def test_predict_refuses_a_checkpoint_of_another_task(base_model, classifier):
    _refused(_cli("predict", "sequence-classification", "--model", base_model, "-", input="A triumph.\n"), 1,
             f"--model {base_model} holds a DiffLlamaForCausalLM; predict sequence-classification needs a "
             f"checkpoint written by `diffllama finetune sequence-classification`")
    for task in ("token-classification", "question-answering"):
        _refused(_cli("predict", task, "--model", classifier, "-", input='{"question": "q", "context": "c d"}\n'),
                 1, f"--model {classifier} holds a DiffLlamaForSequenceClassification; predict {task} needs a "
                    f"checkpoint written by `diffllama finetune {task}`")


def test_predict_refuses_a_checkpoint_without_the_head_weights(base_model, tmp_path):
    """No `architectures` in config.json: the loading report's new (random) head weights refuse it."""
    for item in base_model.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    _refused(_cli("predict", "sequence-classification", "--model", tmp_path, "-", input="A triumph.\n"), 1,
             f"--model {tmp_path} lacks the sequence-classification head's weights (score.weight would be random); "
             f"predict sequence-classification needs a checkpoint written by "
             f"`diffllama finetune sequence-classification`")


@pytest.mark.parametrize("args, message", [
    (["--max-length", "0"], "--max-length (max_length) must be a positive number of tokens per sequence, got 0"),
    (["--max-length", "-5"], "--max-length (max_length) must be a positive number of tokens per sequence, got -5"),
])
@pytest.mark.parametrize("command", ["predict", "finetune"])
def test_max_length_must_be_positive(base_model, classifier, tmp_path, command, args, message):
    if command == "predict":
        result = _cli("predict", "sequence-classification", "--model", classifier, *args, "-", input="A triumph.\n")
    else:
        result = _cli("finetune", "sequence-classification", "--model", base_model, "--data", RT_DATA / "rt_test.csv",
                      "--out", tmp_path / "run", *args)
    _refused(result, 2, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--stride", "-1"], "--stride (stride) must be >= 0 (overlap in tokens of consecutive QA context windows), got -1"),
    (["--max-length", "64", "--stride", "64"], "--max-length (max_length) must be at least --stride + 3 = 67 for question-answering"),
])
def test_finetune_qa_checks_stride(base_model, tmp_path, args, message):
    result = _cli("finetune", "question-answering", "--model", base_model, "--data", DATA / "squad_sample.json",
                  "--out", tmp_path / "run", *args)
    _refused(result, 2, message)
    assert not (tmp_path / "run").exists()


def test_finetune_qa_window_error_names_the_flags(base_model, tmp_path):
    """The data-dependent check (question longer than the window allows) names --max-length and --stride."""
    result = _cli("finetune", "question-answering", "--model", base_model, "--data", DATA / "squad_sample.json",
                  "--out", tmp_path / "run", "--max-length", "12", "--stride", "8", "--device", "cpu")
    assert result.exit_code == 1 and "(raise --max-length or lower --stride)" in result.stderr, result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_label_set_comes_from_all_of_data_before_the_eval_split(base_model, tmp_path):
    """A label whose only row lands in the held-out evaluation split is still in the label set (it is in --data)."""
    import random

    rows = [("good film", "fresh")] * 20 + [("bad film", "rotten")] * 20 + [("odd film", "mixed")]
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    held = max(1, int(len(rows) * 0.1))  # FineTuneTrainer's default hold-out: 10% of the rows, shuffled by seed

    def held_out(seed):
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        return order[:held]
    seed = next(s for s in range(100) if len(rows) - 1 in held_out(s))
    task = get_task("sequence-classification", TaskOptions(max_length=16))
    cfg = finetune_config(dict(max_steps=1, eval_every=1, batch_size=4, device="cpu", seed=seed, log_every=1,
                               num_threads=1))
    result = run_finetune(task, cfg, tmp_path / "run", model_dir=base_model, train_path=data, quiet=True)
    assert result.metrics["summary"]["labels"] == ["fresh", "mixed", "rotten"]


@pytest.mark.parametrize("task, data", [("sequence-classification", RT_DATA / "rt_test.csv"),
                                        ("token-classification", "brown_train.conll")])
def test_finetune_refuses_repeated_labels_before_any_work(base_model, tmp_path, task, data):
    """Was accepted: id2label {0: fresh, 1: fresh, 2: rotten} was saved beside label2id {fresh: 1, rotten: 2}."""
    result = _cli("finetune", task, "--model", base_model, "--data", DATA / data, "--out", tmp_path / "run",
                  "--labels", "fresh,fresh,rotten")
    _refused(result, 2, "--labels: label 'fresh' is given more than once in ['fresh', 'fresh', 'rotten']")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "under-file", "other-folder"])
def test_finetune_refuses_out_that_is_not_a_run_folder(base_model, tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = {"file": afile, "under-file": afile / "run", "other-folder": tmp_path}[where]
    result = _cli("finetune", "sequence-classification", "--model", base_model, "--data", RT_DATA / "rt_test.csv",
                  "--out", out)
    expected = {"file": "is a file", "under-file": f"cannot be created: {afile} is a file",
                "other-folder": "is an existing folder that is not a run folder"}[where]
    _refused(result, 1, f"--out {str(out)!r} {expected}")
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_predict_refuses_bad_device(classifier, monkeypatch):
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "--device", "tpu", "-",
                  input="A triumph.\n"), 2, "--device must be auto, cpu, cuda or cuda:N, got 'tpu'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "--device", "cuda", "-",
                  input="A triumph.\n"), 1, "--device cuda was requested but CUDA is not available on this machine")


def test_predict_metrics_out(classifier, tmp_path):
    data = tmp_path / "gold.csv"
    data.write_text("text,label\nA triumph.,fresh\nA mess.,rotten\n")
    missing = tmp_path / "nonexistent" / "m.json"
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "--metrics-out", missing, data), 2,
             f"--metrics-out {missing}: its folder {missing.parent} does not exist")
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "--metrics-out", tmp_path, data), 2,
             f"--metrics-out {tmp_path} is a directory")
    target = tmp_path / "m.json"
    result = _cli("predict", "sequence-classification", "--model", classifier, "--metrics-out", target, data)
    assert result.exit_code == 0, result.output
    assert "accuracy" in json.loads(target.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gold.csv", "m.json"]  # no temporary file left
    unlabelled = _cli("predict", "sequence-classification", "--model", classifier, "--metrics-out",
                      tmp_path / "none.json", "-", input="A triumph.\n")
    assert unlabelled.exit_code == 0 and unlabelled.stdout.count("\n") == 1, unlabelled.output
    assert unlabelled.stderr == (f"note: --metrics-out {tmp_path / 'none.json'} not written: metrics need a gold "
                                 f"label on every input row, and this input has rows without one\n")
    assert not (tmp_path / "none.json").exists()


@pytest.mark.slow  # a subprocess or several: the README's test command keeps under 3 minutes
def test_predict_into_a_pipe_closed_early_still_writes_the_metrics(classifier, tmp_path):
    """`predict ... --metrics-out m.json | head -1`: the metrics file is written before the records; the closed
    pipe ends the command quietly (exit 141, as SIGPIPE), with no traceback."""
    import subprocess
    import sys

    data = tmp_path / "gold.csv"
    data.write_text("text,label\n" + "".join(f"Row {i} is fine.,{'fresh' if i % 2 else 'rotten'}\n"
                                              for i in range(2000)))
    target = tmp_path / "m.json"
    command = (f"{sys.executable} -m diffllama predict sequence-classification --model {classifier} "
               f"--metrics-out {target} {data} | head -1; echo \"rc=${{PIPESTATUS[0]}}\" >&2")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.stdout.count("\n") == 1 and '"label"' in proc.stdout
    assert "Traceback" not in proc.stderr and proc.stderr.strip().endswith("rc=141"), proc.stderr[-2000:]
    assert json.loads(target.read_text())["accuracy"] >= 0


def test_predict_defaults_to_the_lengths_the_model_was_fine_tuned_with(classifier):
    """Was: predict cut texts at 256 tokens whatever the model was fine-tuned with (here 64); the recorded value is
    the default now, and an explicit --max-length still wins."""
    from diffllama.finetune.predict import check_checkpoint

    found = check_checkpoint(get_task("sequence-classification"), classifier)
    assert found.settings == {"max_length": 64, "stride": 64, "max_answer_tokens": 30}
    assert found.labels == ["fresh", "rotten"]
    text = " ".join(["A long, winding and in the end rather moving film about two brothers."] * 12) + "\n"

    def run(*args):
        result = _cli("predict", "sequence-classification", "--model", classifier, *args, "-", input=text)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    default, recorded, longer = run(), run("--max-length", "64"), run("--max-length", "256")
    assert default == recorded
    assert default["scores"] != longer["scores"]  # the text is longer than 64 tokens: the cut matters


def test_predict_names_a_damaged_record_not_a_flag(classifier, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(classifier, model)
    record = model / "train_config.yaml"
    record.write_text(record.read_text().replace("seq_len: 64", "seq_len: abc"))
    result = _cli("predict", "sequence-classification", "--model", model, "-", input="A triumph.\n")
    assert result.exit_code == 1 and f"error: --model {model}: its train_config.yaml records a bad setting" \
        in result.stderr, result.output
    record.write_text("task: [unclosed\n")
    result = _cli("predict", "sequence-classification", "--model", model, "-", input="A triumph.\n")
    assert result.exit_code == 1 and "cannot read train_config.yaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # YAML's multi-line message on one line


def test_predict_names_stdin(classifier):
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "-", input="\n"), 1,
             "error: <stdin> is empty: no data rows")
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "-", input='{"text": 1\n'), 1,
             "error: <stdin>: line 1 is not valid JSON")


@pytest.mark.parametrize("damage, message", [
    ("weights", "has no weights: expected model.safetensors or model.safetensors.index.json beside its config.json"),
    ("config", "has no config.json; expected a pretrained checkpoint directory"),
    ("bad-config", "bad config.json"),
])
def test_finetune_checks_the_base_model_before_reading_data(base_model, tmp_path, monkeypatch, damage, message):
    """Was: a base model without weights (or config) failed only after all data was read and encoded."""
    from diffllama.finetune.tasks import SequenceClassification

    base = _copy_model(base_model, tmp_path / "base")
    if damage == "weights":
        (base / "model.safetensors").unlink()
    elif damage == "config":
        (base / "config.json").unlink()
    else:
        (base / "config.json").write_text("{not json")

    def read(*args, **kwargs):
        raise AssertionError("data read before the base model was checked")
    monkeypatch.setattr(SequenceClassification, "read", read)
    result = _finetune_cli("sequence-classification", tmp_path / "run", "--model", base, "--data",
                           RT_DATA / "rt_test.csv")
    _refused(result, 1, f"--model {str(base)!r}")
    assert message in result.stderr and not (tmp_path / "run").exists()


# ---- one pad id: batching pads with the id the model pools on (found by the tester) ---------------------------------

def _copy_model(source: Path, folder: Path, *, pad_token_id="keep", pad_token: bool = True) -> Path:
    """A copy of a checkpoint with config.json's pad_token_id replaced, and (``pad_token=False``) the tokenizer's
    PAD token removed, as in Llama-style tokenizers."""
    folder.mkdir()
    for item in source.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    if pad_token_id != "keep":
        config["pad_token_id"] = pad_token_id
    (folder / "config.json").write_text(json.dumps(config))
    if not pad_token:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            settings = json.loads((folder / name).read_text())
            settings.pop("pad_token")
            (folder / name).write_text(json.dumps(settings))
    return folder


def _predict_batch_sizes(model_dir, examples) -> None:
    """Predictions with batch size 1 equal those of batches of 16 (short texts padded up to the longest)."""
    from diffllama.finetune.predict import predict

    task = get_task("sequence-classification", TaskOptions(max_length=64))
    one = predict(task, model_dir, examples, batch_size=1)
    many = predict(task, model_dir, examples, batch_size=16)
    assert [p["label"] for p in one] == [p["label"] for p in many]
    for a, b in zip(one, many):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@pytest.mark.parametrize("config_pad, pad_token", [(1, True), (-1, True), (None, False)],
                         ids=["config-pad-is-eos", "config-pad-negative", "tokenizer-without-pad"])
def test_finetune_pads_with_the_model_pad_id(base_model, tmp_path, config_pad, pad_token):
    """Were: the base config's pad id (1 = EOS, or -1) differing from the tokenizer's made the head pool short texts
    on padding (predict --batch-size 1 and 16 disagreed); a tokenizer without PAD crashed pad_batch (TypeError)."""
    from diffllama.tokenizer import Tokenizer

    base = _copy_model(base_model, tmp_path / "base", pad_token_id=config_pad, pad_token=pad_token)
    tokenizer = Tokenizer.from_pretrained(base)
    expected = tokenizer.pad_token_id if pad_token else tokenizer.eos_token_id
    assert expected is not None and expected != config_pad
    _finetune("sequence-classification", base, tmp_path / "run", RT_DATA / "rt_test.csv", None, steps=2, lr=1e-3,
              max_length=64)
    model_dir = tmp_path / "run" / "model"
    assert json.loads((model_dir / "config.json").read_text())["pad_token_id"] == expected
    task = get_task("sequence-classification", TaskOptions(max_length=64))
    _predict_batch_sizes(model_dir, task.read(RT_DATA / "rt_test.csv")[:40])


def test_predict_pads_with_the_model_pad_id_of_a_mismatched_checkpoint(classifier, tmp_path):
    """A checkpoint whose config pad id differs from its tokenizer's (written before the fix): still one pad id."""
    model_dir = _copy_model(classifier, tmp_path / "model", pad_token_id=1)
    task = get_task("sequence-classification")
    _predict_batch_sizes(model_dir, task.read(RT_DATA / "rt_test.csv")[:40])


# ---- `finetune --resume` refuses what the checkpoint fixes -----------------------------------------------------------

def _finetune_cli(task, out, *args):
    return _cli("finetune", task, "--out", out, "--max-length", "64", "--device", "cpu", "--num-threads", "1",
                "--batch-size", "8", *args)


@pytest.fixture(scope="module")
def resumable(base_model, tmp_path_factory) -> Path:
    """A run folder of 2 steps (one checkpoint) started with --labels fresh,rotten."""
    out = tmp_path_factory.mktemp("resumable") / "run"
    result = _finetune_cli("sequence-classification", out, "--model", base_model, "--data", RT_DATA / "rt_test.csv",
                           "--labels", "fresh,rotten", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", ["labels", "data", "eval-data", "test-data", "model", "task", "max-length", "lr"])
def test_finetune_resume_refuses_changed_settings(base_model, resumable, tmp_path, change):
    """Were accepted: another --labels order (inverting the saved head), other data or --model; another task ended
    in a raw RuntimeError (size mismatch). Each is refused before any work, naming the flag and both values."""
    other_model = _copy_model(base_model, tmp_path / "other-model")
    other_csv = tmp_path / "other.csv"
    other_csv.write_text("text,label\ngood,fresh\nbad,rotten\n")
    task, model, data, labels, extra = "sequence-classification", base_model, RT_DATA / "rt_test.csv", "fresh,rotten", []
    if change == "labels":
        labels, expected = "rotten,fresh", "--labels ['fresh', 'rotten'] in the checkpoint vs ['rotten', 'fresh'] now"
    elif change == "data":
        data, expected = other_csv, f"--data {str(RT_DATA / 'rt_test.csv')!r} in the checkpoint vs {str(other_csv)!r} now"
    elif change in ("eval-data", "test-data"):
        extra, expected = [f"--{change}", other_csv], f"--{change} None in the checkpoint vs {str(other_csv)!r} now"
    elif change == "model":
        model, expected = other_model, f"--model {str(base_model)!r} in the checkpoint vs {str(other_model)!r} now"
    elif change == "task":
        task = "token-classification"
        expected = "TASK 'sequence-classification' in the checkpoint vs 'token-classification' now"
    elif change == "max-length":
        extra, expected = ["--max-length", "32"], "--max-length 64 in the checkpoint vs 32 now"
    else:
        extra, expected = ["--lr", "0.01"], "--lr 0.0002 in the checkpoint vs 0.01 now"
    before = _snapshot(resumable)
    result = _finetune_cli(task, resumable, "--model", model, "--data", data, "--labels", labels, "--max-steps", "4",
                           "--resume", *extra)
    _refused(result, 1, f"error: --resume: settings given now differ from those of the run's checkpoint "
                        f"{resumable / 'checkpoints' / 'step-000002'} ({expected})")
    assert _snapshot(resumable) == before


def test_finetune_resume_continues_with_the_same_settings(base_model, tmp_path, monkeypatch):
    """The same files named by other paths (relative now, absolute before) are the same settings."""
    out = tmp_path / "run"
    args = ["--labels", "fresh,rotten", "--eval-data", RT_DATA / "rt_test.csv"]
    first = _finetune_cli("sequence-classification", out, "--model", base_model, "--data", RT_DATA / "rt_train.csv",
                          "--max-steps", "1", *args)
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(RT_DATA.parent)
    result = _finetune_cli("sequence-classification", out, "--model", base_model, "--data", "data/rt_train.csv",
                           "--max-steps", "2", "--resume", *args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "finetune_metrics.json").read_text())["steps"] == 2


def test_finetune_resume_refuses_changed_data_contents(base_model, tmp_path):
    """Was accepted: the same --data path with every label flipped in place. A run saved without the fingerprint
    (before it was recorded) still resumes."""
    import yaml

    data = tmp_path / "train.csv"
    data.write_text((RT_DATA / "rt_test.csv").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    args = ["--model", base_model, "--data", data, "--labels", "fresh,rotten"]
    assert _finetune_cli("sequence-classification", out, *args, "--max-steps", "1").exit_code == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data_fingerprint"]["train"]["size"] == data.stat().st_size
    original = data.read_text(encoding="utf-8")
    flipped = original.replace(",fresh", ",TMP").replace(",rotten", ",fresh").replace(",TMP", ",rotten")
    assert flipped != original
    data.write_text(flipped, encoding="utf-8")
    before = _snapshot(out)
    result = _finetune_cli("sequence-classification", out, *args, "--max-steps", "2", "--resume")
    _refused(result, 1, f"--resume: the contents of --data {data} changed since the run's checkpoint "
                        f"{out / 'checkpoints' / 'step-000001'} (size {len(original.encode())}, sha256 ")
    assert _snapshot(out) == before
    saved = out / "checkpoints" / "step-000001" / "train_config.yaml"  # as a run from before the fingerprint
    old = yaml.safe_load(saved.read_text())
    del old["data_fingerprint"]
    saved.write_text(yaml.safe_dump(old))
    result = _finetune_cli("sequence-classification", out, *args, "--max-steps", "2", "--resume")
    assert result.exit_code == 0, result.output


def test_finetune_resume_without_a_checkpoint_is_refused(base_model, tmp_path):
    result = _finetune_cli("sequence-classification", tmp_path / "run", "--model", base_model, "--data",
                           RT_DATA / "rt_test.csv", "--resume")
    _refused(result, 1, f"--resume: no checkpoint in {tmp_path / 'run'} to resume from (drop --resume to start a new "
                        f"run)")
    assert not (tmp_path / "run").exists()


def test_resume_command_carries_every_given_flag():
    from diffllama.finetune.run import resume_command

    assert resume_command("sequence-classification", {"--model": "m", "--data": "my data.csv", "--eval-data": None,
                                                      "--labels": "b,a", "--max-length": 64, "--out": "runs/x"}) == \
        "diffllama finetune sequence-classification --model m --data 'my data.csv' --labels b,a --max-length 64 " \
        "--out runs/x --resume"


# ---- predict: input checks (found by the tester) ----------------------------------------------------------------

def test_predict_refuses_gold_labels_outside_the_model_label_set(classifier, tmp_path):
    """Was: scored silently (finetune refuses such labels)."""
    data = tmp_path / "gold.csv"
    data.write_text("text,label\nA triumph.,fresh\nA mess.,meh\n")
    _refused(_cli("predict", "sequence-classification", "--model", classifier, data), 1,
             f"{data}: row 2: label 'meh' is not in the label set ['fresh', 'rotten']")
    _refused(_cli("predict", "sequence-classification", "--model", classifier, "-",
                  input='{"text": "A mess.", "label": "meh"}\n'), 1,
             "error: <stdin>: row 1: label 'meh' is not in the label set ['fresh', 'rotten']")


def test_predict_names_a_directory_source(classifier, tmp_path):
    """Was: "does not exist"."""
    _refused(_cli("predict", "sequence-classification", "--model", classifier, tmp_path), 1,
             f"data file '{tmp_path}' is a directory; expected a file")


def test_predict_stdin_crlf_lines_keep_no_carriage_return():
    from diffllama.finetune.predict import read_input

    task = get_task("sequence-classification", TaskOptions(max_length=16, labels=["fresh", "rotten"]))
    examples = read_input(task, "-", b"A triumph.\r\nA mess.\r\n")
    assert [e.text for e in examples] == ["A triumph.", "A mess."]


def test_predict_refuses_stdin_that_is_not_utf8(classifier):
    """Was a raw TypeError from the tokenizer: under the C.UTF-8 locale Python reads stdin with surrogateescape."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "diffllama", "predict", "sequence-classification", "--model",
                             str(classifier), "-"], input=b"\xff\xfe\n", capture_output=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"})
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode() == ("error: <stdin> is not UTF-8 text: 'utf-8' codec can't decode byte 0xff in "
                                      "position 0: invalid start byte\n")


# ---- the end of a run: final scoring, --resume of a finished run, positions --------------------------------------

def test_resume_of_a_finished_run_without_metrics_writes_them(base_model, tmp_path):
    """Was: `--resume` said "nothing to do" and wrote no metrics (a run stopped during its final scoring), and
    printed `new weights (initialised)` for weights that come from the checkpoint."""
    out = tmp_path / "run"
    args = ["--model", base_model, "--data", RT_DATA / "rt_test.csv", "--test-data", RT_DATA / "rt_test.csv",
            "--max-steps", "2"]
    assert _finetune_cli("sequence-classification", out, *args).exit_code == 0
    first = json.loads((out / "finetune_metrics.json").read_text())
    (out / "finetune_metrics.json").unlink()
    (out / "model" / "config.json").unlink()  # as if stopped before the model was exported
    result = _finetune_cli("sequence-classification", out, *args, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "finetune_metrics.json").read_text()) == first
    assert first["steps"] == 2 and "accuracy" in first["eval"] and "accuracy" in first["test"]
    assert (out / "model" / "config.json").is_file()
    assert "new weights" not in result.stdout
    assert f"weights restored from {out / 'checkpoints' / 'step-000002'} (step 2)" in result.stdout


def test_resume_of_a_scored_run_changes_nothing_and_keeps_its_tokenizer(base_model, tmp_path):
    """Was: --resume of a finished fine-tuning run rewrote finetune_metrics.json with empty eval metrics (it looked
    for train's summary.json); and a resumed run read its tokenizer from --model, not from its checkpoint."""
    import shutil

    base, out = tmp_path / "base", tmp_path / "run"
    shutil.copytree(base_model, base)
    args = ["--model", base, "--data", RT_DATA / "rt_test.csv", "--labels", "fresh,rotten", "--save-every", "2"]
    assert _finetune_cli("sequence-classification", out, *args, "--max-steps", "2").exit_code == 0
    before = (out / "finetune_metrics.json").read_bytes()
    assert json.loads(before)["eval"]
    result = _finetune_cli("sequence-classification", out, *args, "--max-steps", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "finetune_metrics.json").read_bytes() == before
    (base / "tokenizer.json").write_text("{not a tokenizer")  # --model changed since: the checkpoint's is used
    result = _finetune_cli("sequence-classification", out, *args, "--max-steps", "3", "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "finetune_metrics.json").read_text())["steps"] == 3


def test_signal_during_final_scoring_is_reported_and_resume_scores(base_model, tmp_path, monkeypatch):
    """Was: SIGTERM while the test set was scored ended the process silently, with no metrics written."""
    import os
    import signal

    from diffllama.finetune.run import FineTuneTrainer

    report = FineTuneTrainer.report

    def interrupted_report(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return report(self)
    monkeypatch.setattr(FineTuneTrainer, "report", interrupted_report)
    task = get_task("sequence-classification", TaskOptions(max_length=64))
    cfg = finetune_config(dict(max_steps=2, device="cpu", seed=0, num_threads=1, batch_size=8))
    paths = dict(model_dir=base_model, train_path=RT_DATA / "rt_test.csv", test_path=RT_DATA / "rt_test.csv")
    result = run_finetune(task, cfg, tmp_path / "run", quiet=True, **paths)
    assert result.interrupted == "SIGTERM" and result.step == 2
    assert not (tmp_path / "run" / "finetune_metrics.json").exists()
    monkeypatch.setattr(FineTuneTrainer, "report", report)
    result = run_finetune(task, cfg, tmp_path / "run", quiet=True, resume=True, **paths)
    assert result.interrupted is None and result.metrics["summary"]["steps"] == 2
    assert "accuracy" in json.loads((tmp_path / "run" / "finetune_metrics.json").read_text())["test"]


def test_max_length_above_the_model_positions_raises_them(base_model, tmp_path):
    """Was: no note, and the saved config kept max_position_embeddings 32 below --max-length 64."""
    short = _copy_model(base_model, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    result = _finetune_cli("sequence-classification", tmp_path / "run", "--model", short, "--data",
                           RT_DATA / "rt_test.csv", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert ("note: --max-length 64 is above the model's max_position_embeddings 32; the model is saved with "
            "max_position_embeddings 64") in result.stderr
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["max_position_embeddings"] == 64


@pytest.mark.slow
def test_two_fsdp_processes_score_the_test_set_as_one(base_model, tmp_path):
    """The final test scoring runs on every rank: a sharded model's forward is collective, so rank 0 scoring alone
    stopped the run (the other rank had left). Two gloo processes give the one-process metrics."""
    import os
    import subprocess
    import sys

    common = ["sequence-classification", "--model", str(base_model), "--data", str(RT_DATA / "rt_train.csv"),
              "--test-data", str(RT_DATA / "rt_test.csv"), "--max-steps", "2", "--eval-every", "2", "--max-length", "64",
              "--seed", "0", "--device", "cpu"]  # gloo on CPU: also where a machine has fewer GPUs than ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"single": [sys.executable, "-m", "diffllama", "finetune", *common, "--batch-size", "8"],
            "fsdp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffllama",
                     "finetune", *common, "--batch-size", "4", "--parallel", "fsdp"]}
    metrics = {}
    for name, command in runs.items():
        proc = subprocess.run(command + ["--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[name] = json.loads((tmp_path / name / "finetune_metrics.json").read_text())
    for split in ("eval", "test"):
        assert metrics["fsdp"][split]["accuracy"] == pytest.approx(metrics["single"][split]["accuracy"], abs=1e-9)


def test_evaluation_and_test_phases_show_progress(base_model, tmp_path, capfd):
    """The evaluation and test scoring used to run with the training bar standing still; each now has its own."""
    task = get_task("sequence-classification", TaskOptions(max_length=32))
    cfg = finetune_config(dict(max_steps=2, lr=1e-3, warmup_steps=0, eval_every=2, batch_size=16, device="cpu",
                               seed=0, log_every=2, num_threads=1))
    run_finetune(task, cfg, tmp_path / "run", model_dir=base_model, train_path=RT_DATA / "rt_train.csv",
                 eval_path=RT_DATA / "rt_test.csv", test_path=RT_DATA / "rt_test.csv", quiet=False)
    err = capfd.readouterr().err  # tqdm redraws every 0.1 s: some count above 0 shows the bar moving
    assert re.search(r"eval: [1-9]\d*batch", err) and re.search(r"test: [1-9]\d*batch", err), err[-2000:]
