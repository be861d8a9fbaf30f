"""Fine-tuning data readers, label alignment and metrics: formats, and errors that name the file and row."""

from __future__ import annotations

import json
import re

import pytest
import torch

from diffllama.finetune import data as D
from diffllama.finetune import metrics as M
from diffllama.finetune.tasks import TaskOptions, get_task
from diffllama.train.data import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter(["The jury said the Fulton County election was fair and 48213 people voted."] * 20), 300)


def test_csv_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,label\ngood,pos\n")
    with pytest.raises(D.DataError, match=r"d\.csv.*no text column 'text'.*\['review', 'label'\]"):
        D.read_text_classification(path)
    assert D.read_text_classification(path, text_column="review")[0].label == "pos"


def test_csv_row_with_extra_fields_names_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood film,pos\nbad, really bad,neg\n")  # unquoted comma: 3 fields
    with pytest.raises(D.DataError, match=r"d\.csv: row 2 has 3 fields but the header has 2 .*quote fields that "
                                          r"contain ','"):
        D.read_text_classification(path)


@pytest.mark.parametrize("content, line", [
    ('text,label\n"great movie,fresh\nbad movie,rotten\n', 3),  # a quote left open: was "row 1 has an empty 'label'"
    ('text,label\n"great" movie,fresh\n', 2),  # text after a closing quote
], ids=["unterminated", "after-closing-quote"])
def test_malformed_csv_names_file_and_quote_problem(tmp_path, content, line):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(D.DataError, match=rf"d\.csv is not valid CSV \(reading stopped at line {line}: .*\); a field "
                                          r"that opens with a quote must close with one"):
        D.read_text_classification(path)


def test_csv_quotes_inside_fields_still_read(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\na 5" screen,fresh\n"a ""quoted"", text",rotten\n')
    assert [(e.text, e.label) for e in D.read_text_classification(path)] == [
        ('a 5" screen', "fresh"), ('a "quoted", text', "rotten")]


def test_jsonl_missing_key_names_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(D.DataError, match=r"d\.jsonl: row 2 has no 'label' key"):
        D.read_text_classification(path)


def test_empty_files(tmp_path):
    for name, reader in (("e.csv", D.read_text_classification), ("e.conll", D.read_tagged),
                         ("e.json", D.read_squad)):
        (tmp_path / name).write_text("")
        with pytest.raises(D.DataError, match=rf"{name} is empty"):
            reader(tmp_path / name)
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(D.DataError, match=r"h\.csv is empty: no data rows"):
        D.read_text_classification(tmp_path / "h.csv")


def test_not_utf8_names_the_file(tmp_path):
    bad = "caf\xe9".encode("latin-1")  # a Latin-1 byte that is not UTF-8
    for name, reader, content in (("b.csv", D.read_text_classification, b"text,label\n" + bad + b",x\n"),
                                  ("b.jsonl", D.read_text_classification, b'{"text": "' + bad + b'"}\n'),
                                  ("b.conll", D.read_tagged, bad + b"\tNOUN\n"),
                                  ("b.json", D.read_squad, b'{"data": "' + bad + b'"}')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(D.DataError, match=rf"{name} is not UTF-8 text"):
            reader(tmp_path / name)


def test_missing_file():
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_text_classification("/nonexistent/x.csv")


def test_label_not_in_label_set_names_file_and_row(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("text,label\nfine,fresh\nodd,meh\n")
    task = get_task("sequence-classification")
    examples = task.read(path)
    with pytest.raises(D.DataError, match=r"eval\.csv: row 2: label 'meh' is not in the label set \['fresh', 'rotten'\]"):
        task.check(path, examples, {"fresh": 0, "rotten": 1})
    tags = tmp_path / "t.conll"
    tags.write_text("The\tDET\ncat\tNOUN\n\nA\tDET\ndog\tWEIRD\n")
    task = get_task("token-classification")
    with pytest.raises(D.DataError, match=r"t\.conll: row 4: label 'WEIRD'"):
        task.check(tags, task.read(tags), {"DET": 0, "NOUN": 1})


def test_conll_line_without_tag(tmp_path):
    path = tmp_path / "t.conll"
    path.write_text("The\tDET\ncat\n")
    with pytest.raises(D.DataError, match=r"t\.conll: line 2 has no tag"):
        D.read_tagged(path)


def test_jsonl_tags_length_mismatch(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["X"]}) + "\n")
    with pytest.raises(D.DataError, match=r"t\.jsonl: row 1 has 2 tokens but 1 tags"):
        D.read_tagged(path)


def test_jsonl_empty_tag_names_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tokens": ["a"], "tags": ["X"]}) + "\n"
                    + json.dumps({"tokens": ["a", "b"], "tags": ["X", " "]}) + "\n")
    with pytest.raises(D.DataError, match=r"t\.jsonl: row 2 has an empty tag in \['X', ' '\]"):
        D.read_tagged(path)


@pytest.mark.parametrize("task_name", ["sequence-classification", "token-classification"])
@pytest.mark.parametrize("labels, message", [
    (["fresh", "fresh", "rotten"], "--labels: label 'fresh' is given more than once in ['fresh', 'fresh', 'rotten']"),
    (["fresh", "", "rotten"], "--labels: label 2 of ['fresh', '', 'rotten'] is empty"),
], ids=["repeated", "empty"])
def test_given_labels_must_be_distinct_and_non_empty(task_name, labels, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_task(task_name, TaskOptions(labels=labels))


@pytest.mark.parametrize("options, message", [
    (dict(max_length=0), "--max-length (max_length) must be a positive number of tokens per sequence, got 0"),
    (dict(max_length=True), "--max-length (max_length) must be a positive number of tokens per sequence, got True"),
    (dict(stride=-1), "--stride (stride) must be >= 0 (overlap in tokens of consecutive QA context windows), got -1"),
    (dict(stride=2.5), "--stride (stride) must be >= 0 (overlap in tokens of consecutive QA context windows), got 2.5"),
    (dict(max_answer_tokens=0), "max_answer_tokens must be a positive number of tokens (longest QA answer), got 0"),
])
def test_task_options_check_their_numbers(options, message):
    """Were checked only by the command line: TaskOptions(max_length=0) from Python was accepted."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskOptions(**options)


def test_qa_needs_room_for_more_than_the_stride():
    get_task("token-classification", TaskOptions(max_length=32, stride=64))  # the stride is QA's only
    with pytest.raises(ValueError, match=re.escape("--max-length (max_length) must be at least --stride + 3 = 67 "
                                                   "for question-answering")):
        get_task("question-answering", TaskOptions(max_length=66, stride=64))


def test_squad_answer_not_in_context(tmp_path):
    path = tmp_path / "q.json"
    data = {"data": [{"paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "b", "question": "What?", "answers": [{"text": "Spain"}]}]}]}]}
    path.write_text(json.dumps(data))
    with pytest.raises(D.DataError, match=r"q\.json: row 2 \(question id 'b'\): answer 'Spain' is not found"):
        D.read_squad(path)


@pytest.mark.parametrize("start", [0, "0", 0.0])
def test_squad_answer_not_at_its_answer_start_is_refused(tmp_path, start):
    """Was: a wrong answer_start was replaced by the text's first occurrence (here another 'France')."""
    path = tmp_path / "q.json"
    context = "Paris is in France. France is big."
    qas = [{"id": "a", "question": "Where?", "answers": [{"text": "France", "answer_start": "20"}]},
           {"id": "b", "question": "What?", "answers": [{"text": "France", "answer_start": start}]}]
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": qas}]}]}))
    with pytest.raises(D.DataError, match=re.escape(
            f"q.json: row 2 (question id 'b'): answer 'France' is not at its answer_start {start!r} (the context "
            f"has 'Paris ' there)")):
        D.read_squad(path)
    qas.pop()
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": qas}]}]}))
    assert D.read_squad(path)[0].answer_starts == [20]  # a string offset is read as its number


def test_squad_answer_start_of_non_ascii_digits_is_refused_by_row(tmp_path):
    path = tmp_path / "q.json"
    qas = [{"id": "b", "question": "What?", "answers": [{"text": "France", "answer_start": "³"}]}]
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "Paris is in France.", "qas": qas}]}]}))
    with pytest.raises(D.DataError, match=re.escape(
            "row 1 (question id 'b'): answer 'France' has answer_start '³'; expected a character offset")):
        D.read_squad(path)


def test_squad_jsonl_answers_without_offsets_keep_their_answers(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Where?", "context": "Paris is in France.",
                                "answers": {"text": ["France"]}}) + "\n")
    example = D.read_squad(path)[0]
    assert (example.answers, example.answer_starts) == (["France"], [12])


def test_first_subtoken_labelled_rest_ignored(tokenizer):
    task = get_task("token-classification", TaskOptions(max_length=64))
    example = D.TaggedExample(["The", "Fultonish", "jury"], ["DET", "ADJ", "NOUN"], 1)
    features = task.encode(tokenizer, [example], {"DET": 0, "ADJ": 1, "NOUN": 2})
    ids, labels, word_ids, first = features.items[0]
    assert len(ids) > 3  # "Fultonish" splits into several sub-tokens
    assert [label for label in labels if label != -100] == [0, 1, 2]
    for label, f in zip(labels, first):
        assert (label != -100) == f
    assert sorted(set(word_ids)) == [0, 1, 2]


def test_qa_windows_cover_answer_with_stride(tokenizer):
    context = " ".join(["the jury said"] * 30) + " and 48213 people voted"
    example = D.QAExample("q", "How many voted?", context, ["48213"], [context.index("48213")], 1)
    features = D.encode_qa(tokenizer, [example], max_length=40, stride=10)
    assert len(features) > 2
    labelled = [f for f in features if f.start]
    assert labelled
    for f in labelled:
        a, b = f.offsets[f.start - f.context_start][0], f.offsets[f.end - f.context_start][1]
        assert context[a:b].strip() == "48213"
    with pytest.raises(ValueError, match="must exceed the stride"):
        D.encode_qa(tokenizer, [example], max_length=20, stride=15)


def test_metrics():
    scores = M.classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    tags = M.tagging_metrics([["D", "N"], ["V"]], [["D", "V"], ["V"]])
    assert tags["token_accuracy"] == pytest.approx(2 / 3) and tags["per_tag"]["N"]["f1"] == 0
    assert M.normalize_answer("The  Eiffel, Tower!") == "eiffel tower"
    qa = M.qa_metrics([["Eiffel Tower"], ["1889"]], ["the eiffel tower", "in 1889"], groups=[0.0, 1.0])
    assert qa["exact_match"] == 50.0 and qa["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert qa["by_group"][1.0]["exact_match"] == 0.0
    assert M.majority_baseline(["x", "x", "y"], ["x", "y"]) == 0.5


# ---- found by the tester: byte-order marks, directories, JSONL tokens, long questions, QA without a span -----------

def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Was: no text column 'text'; columns: ['\\ufefftext', 'label'] (Excel's "CSV UTF-8" starts with a BOM)."""
    (tmp_path / "d.csv").write_text("\ufefftext,label\ngood film,fresh\n", encoding="utf-8")
    assert [(e.text, e.label) for e in D.read_text_classification(tmp_path / "d.csv")] == [("good film", "fresh")]
    (tmp_path / "d.jsonl").write_text('\ufeff{"tokens": ["The", "cat"], "tags": ["DET", "NOUN"]}\n', encoding="utf-8")
    assert D.read_tagged(tmp_path / "d.jsonl")[0].words == ["The", "cat"]
    (tmp_path / "q.json").write_text("\ufeff" + json.dumps({"data": [{"paragraphs": [{"context": "It was Ada.", "qas": [
        {"id": "a", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 7}]}]}]}]}), encoding="utf-8")
    assert D.read_squad(tmp_path / "q.json")[0].answers == ["Ada"]


def test_directory_is_named_as_a_directory(tmp_path):
    with pytest.raises(D.DataError, match=rf"data file '{re.escape(str(tmp_path))}' is a directory; expected a file"):
        D.read_text_classification(tmp_path, require_labels=False)


@pytest.mark.parametrize("tokens, message", [
    ([1, None], "row 2: token 1 of 'tokens' is 1; expected each token to be a non-empty string"),
    (["a", None], "row 2: token 2 of 'tokens' is None; expected each token to be a non-empty string"),
    ([""], "row 2: token 1 of 'tokens' is ''; expected each token to be a non-empty string"),
    (["a", " "], "row 2: token 2 of 'tokens' is ' '; expected each token to be a non-empty string"),
    ([], "row 2 has an empty 'tokens' list; expected the sentence's words"),
], ids=["number", "null", "empty-string", "blank", "empty-list"])
@pytest.mark.parametrize("tagged", [True, False])
def test_jsonl_tokens_must_be_non_empty_strings(tmp_path, tokens, message, tagged):
    """Were: [1, null] read as the words "1" and "None"; [""] and [] accepted, training then failed mid-run."""
    path = tmp_path / "t.jsonl"
    bad = {"tokens": tokens, "tags": ["X"] * len(tokens)} if tagged else {"tokens": tokens}
    path.write_text(json.dumps({"tokens": ["a"], "tags": ["X"]}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(D.DataError, match=re.escape(f"t.jsonl: {message}")):
        D.read_tagged(path, require_tags=tagged)


def test_qa_question_is_kept_whole(tokenizer):
    """Was: questions silently cut to their first 64 tokens."""
    question = " ".join(["the jury said"] * 40) + " how many voted?"
    n = len(tokenizer.encode(question, add_special_tokens=False))
    assert n > 64
    example = D.QAExample("q7", question, "and 48213 people voted", ["48213"], [4], 3)
    features = D.encode_qa(tokenizer, [example], max_length=n + 20, stride=4)
    assert features[0].context_start == n + 1
    assert features[0].input_ids[:n] == tokenizer.encode(question, add_special_tokens=False)
    with pytest.raises(ValueError, match=re.escape(f"the {n}-token question of row 3 (question id 'q7'); that must "
                                                   f"exceed the stride 4: questions are kept whole, so a question "
                                                   f"may take at most --max-length - --stride - 2 = {n - 6} tokens")):
        D.encode_qa(tokenizer, [example], max_length=n, stride=4)


def test_qa_prediction_without_a_span_is_valid_json(tokenizer):
    """Was: an empty context printed "score": -Infinity, which strict JSON parsers refuse."""
    task = get_task("question-answering", TaskOptions(max_length=32, stride=4))
    examples = [D.QAExample("a", "Who?", ""), D.QAExample("b", "Who?", "The jury said 48213 people voted")]
    torch.manual_seed(0)

    def forward(inputs):
        return torch.randn(*inputs.shape, 2)
    empty, found = task.predict(forward, tokenizer, examples, None, 2, torch.device("cpu"))
    assert empty == {"answer": "", "score": None, "start": -1, "end": -1}
    assert isinstance(found["score"], float) and found["answer"] and found["start"] >= 0
    assert json.loads(json.dumps([empty, found], allow_nan=False)) == [empty, found]


def test_csv_header_with_a_repeated_column_is_refused(tmp_path):
    """Was: csv.DictReader silently took the last 'label' column."""
    path = tmp_path / "d.csv"
    path.write_text("text,label,label\ngood,fresh,rotten\n")
    with pytest.raises(D.DataError, match=r"d.csv: row 0 \(header\) names column\(s\) \['label'\] more than once"):
        D.read_text_classification(path)
    path.write_text("text,label,,\ngood,fresh,,\n")  # blank trailing columns (spreadsheet exports) are not names
    assert [(e.text, e.label) for e in D.read_text_classification(path)] == [("good", "fresh")]


def test_jsonl_object_with_a_repeated_key_is_refused(tmp_path):
    """Was: json kept the last 'text' silently, as DictReader did with a repeated CSV column."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": "fresh"}\n{"text": "a", "label": "x", "text": "b"}\n')
    with pytest.raises(D.DataError, match=r"d.jsonl: line 2 is not valid JSON: key\(s\) \['text'\] given twice"):
        D.read_text_classification(path)


def test_tagging_metrics_count_a_cut_word_as_a_miss_without_a_label_of_its_own():
    """Was: words without a prediction (cut by --max-length) formed a tag None with F1 0, lowering macro-F1."""
    scores = M.tagging_metrics([["DET", "NOUN", "NOUN"]], [["DET", "NOUN", None]])
    assert sorted(scores["per_tag"]) == ["DET", "NOUN"]
    assert scores["token_accuracy"] == pytest.approx(2 / 3)
    noun = scores["per_tag"]["NOUN"]  # 1 of 2 found, no false positive
    assert (noun["precision"], noun["recall"], noun["support"]) == (1.0, 0.5, 2)
    assert scores["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_write_retrieval_qa_checks_arguments_before_creating_anything(tmp_path):
    from diffllama.finetune.retrieval import write_retrieval_qa

    target = tmp_path / "new" / "kir.json"
    with pytest.raises(ValueError, match="no document has 50 words"):
        write_retrieval_qa(target, ["too short"], 3, passage_words=50)
    assert list(tmp_path.iterdir()) == []  # was: the folder was created first
    write_retrieval_qa(target, [" ".join(f"w{i}" for i in range(60))], 3, passage_words=50)
    assert len(D.read_squad(target)) == 3 and [p.name for p in target.parent.iterdir()] == ["kir.json"]


def test_labelled_text_of_another_format_names_every_accepted_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("good\n")
    with pytest.raises(D.DataError, match=re.escape("labelled data must be .csv, .tsv, or JSON Lines (.jsonl, "
                                                    ".ndjson or .json: one object per line), got 'd.txt'")):
        D.read_text_classification(path)


@pytest.mark.parametrize("content", ['[{"text": "good", "label": "fresh"}]\n',
                                     '[\n  {"text": "good", "label": "fresh"}\n]\n'], ids=["one-line", "pretty"])
def test_a_json_array_is_refused_as_not_json_lines(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(D.DataError, match=re.escape("d.json: line 1 starts a JSON array; expected JSON Lines: one "
                                                    "JSON object per line")):
        D.read_text_classification(path)
