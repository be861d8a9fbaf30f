"""diffllama.eval: hand-computable cases for every evaluation on tiny models (CPU, fast)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import diffllama
from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM, Tokenizer
from diffllama.cli import app
from diffllama.eval import EvalSettings, attention_allocation as alloc, needle, outliers, perplexity, summary
from diffllama.eval.attention_maps import (captured_maps, diffllama_attention_maps, fake_quantize,
                                           reference_attention_path)
from diffllama.eval.icl import icl_order_robustness
from diffllama.eval.runner import evaluate
from diffllama.eval.scoring import continuation_logprobs, greedy_continuation, next_token_logprobs
from diffllama.train.data import bundled_corpus, iter_documents, train_bpe

RT_DATA = Path(diffllama.__file__).parent / "data"  # the Rotten Tomatoes slices ship with the package


@pytest.fixture(scope="module")
def tokenizer():
    documents = [d[:20000] for _, d in zip(range(30), iter_documents([bundled_corpus()]))]
    return train_bpe(iter(documents), 512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A random tiny checkpoint (hidden 32, 2 layers, 256 positions) with a 512-token BPE."""
    folder = tmp_path_factory.mktemp("evalmodel")
    config = DiffLlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    DiffLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _model(kv=4, std=0.02, layers=2, dtype=torch.float32):
    config = DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=kv, initializer_range=std,
                             max_position_embeddings=64)
    torch.manual_seed(0)
    return DiffLlamaForCausalLM(config).to(dtype).eval()


# ---- attention maps and the reference path ----------------------------------------------------------------------

@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_reference_path_reproduces_the_model_in_float64(kv):
    model = _model(kv, std=0.5, dtype=torch.float64)  # large weights: far from uniform attention
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        with reference_attention_path(model):
            got = model(ids, use_cache=False).logits
        with reference_attention_path(model, bits=4):
            quantized = model(ids, use_cache=False).logits
    assert (got - expected).abs().max() / expected.abs().max() < 1e-6
    assert (quantized - expected).abs().max() > 1e-3  # the hook does replace the attention


def test_maps_match_eager_probabilities():
    model = _model(2, std=0.5, dtype=torch.float64)
    model.config.attn_implementation = "eager"
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad(), captured_maps(model) as found:
        probs = model(ids, use_cache=False, output_attentions=True).attentions
    for maps, expected in zip(found, probs):
        torch.testing.assert_close(maps.probabilities(), expected, rtol=0, atol=1e-12)
        assert maps.combined().shape == (1, 2, 9, 9)


def test_maps_refuse_a_cached_step():
    model = _model()
    with pytest.raises(ValueError, match="whole sequence"), torch.no_grad(), captured_maps(model):
        model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=2)


def test_fake_quantize_by_hand():
    x = torch.tensor([3.0, 1.4, -0.9, 0.2, 50.0]).view(1, 1, 1, 5)
    allowed = torch.tensor([True, True, True, True, False]).view(1, 1, 1, 5)
    out = fake_quantize(x, allowed, 3)  # 3 levels each side, absmax 3 -> scale 1; the forbidden 50 is ignored
    assert out.view(-1).tolist() == [3.0, 1.0, -1.0, 0.0, 50.0]
    for bad in (1, 17, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            fake_quantize(x, allowed, bad)


# ---- attention allocation ---------------------------------------------------------------------------------------

def test_allocation_of_a_hand_map():
    m = torch.tensor([0.5, 0.3, -0.1, 0.0]).view(1, 1, 1, 4)  # relu -> [0.5, 0.3, 0, 0] / 0.8
    answer = torch.tensor([True, False, False, False])
    noise = torch.tensor([False, True, True, False])
    a, n = alloc.allocation(m, slice(0, 1), answer, noise)
    assert a == pytest.approx(0.625) and n == pytest.approx(0.375)


def test_attention_forced_onto_the_answer_gives_ratio_one(model_dir, tokenizer):
    model = DiffLlamaForCausalLM.from_pretrained(model_dir).eval()
    sample = needle.build_sample(tokenizer, 2, 1, 128, 0.5, seed=3)
    first, last = sample.answer_span

    def forced(module, *inputs):
        maps = diffllama_attention_maps(module, *inputs)
        h = maps.logits.shape[1]
        logits = torch.full_like(maps.logits, -1e4)
        logits[:, : h // 2, :, first:last + 1] = 0.0  # first softmax: all on the answer; second: uniform
        logits[:, h // 2:] = 0.0
        maps.logits = logits
        return maps

    result = alloc.attention_allocation(model, [sample], maps_fn=forced, progress=False)
    assert result["answer"] == pytest.approx(1.0) and result["noise"] == pytest.approx(0.0)
    assert [p["layer"] for p in result["per_layer"]] == [0, 1]
    plain = alloc.attention_allocation(model, [sample], progress=False)  # a random model: about uniform
    assert 0 < plain["answer"] < 1 and 0 < plain["noise"] < 1 and plain["answer"] + plain["noise"] <= 1 + 1e-9
    assert plain["samples"] == 1


# ---- needle samples ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sample_positions(tokenizer, depth):
    s = needle.build_sample(tokenizer, 4, 2, 256, depth, seed=7)
    ids = s.queries[0].input_ids
    assert len(s.queries) == 2 and all(len(q.input_ids) < 256 for q in s.queries)
    assert max(len(q.input_ids) for q in s.queries) > 0.8 * 256
    first, last = s.answer_span
    target = tokenizer.decode(ids[first:last + 1]).strip()
    assert target == needle.NEEDLE.format(city=s.queries[0].city, number=s.queries[0].answer)
    assert len(s.needle_spans) == 4 and len({c for c in (q.city for q in s.queries)}) == 2
    question = tokenizer.decode(ids[s.context_tokens:])
    assert question.strip() == needle.QUESTION.format(city=s.queries[0].city)
    if depth == 0.0:
        assert first == 0
    if depth == 1.0:
        assert last == s.context_tokens - 1 or tokenizer.decode(ids[last + 1:s.context_tokens]).strip() == ""
    assert abs(s.actual_depth - depth) < 0.05
    assert needle.build_sample(tokenizer, 4, 2, 256, depth, seed=7).queries[0].input_ids == ids  # seeded


def test_needle_refusals_and_lengths(tokenizer):
    with pytest.raises(ValueError, match="num_queries"):
        needle.build_sample(tokenizer, 1, 2, 256, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        needle.build_sample(tokenizer, 1, 1, 256, 1.5, seed=0)
    with pytest.raises(needle.PromptTooLong, match="cannot hold 20 needles"):
        needle.build_sample(tokenizer, 20, 2, 64, 0.5, seed=0)
    samples, skipped = needle.build_samples(tokenizer, [128, 256], cells=((1, 1), (20, 2)), depths=(0.5,))
    assert skipped == ["20,2@128", "20,2@256"] and [(s.num_needles, s.length) for s in samples] == [(1, 128), (1, 256)]
    assert needle.default_lengths(256) == [128, 256]
    assert needle.default_lengths(4096) == [1024, 2048, 4096]
    assert needle.default_lengths(3000) == [1024, 2048, 3000]


class _Scripted(torch.nn.Module):
    """A 'model' whose greedy continuation of any prompt is ``script`` (then EOS-like token 0 forever)."""

    def __init__(self, prompts_to_script: dict, vocab: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.vocab = prompts_to_script, vocab

    def forward(self, ids, use_cache=False, **_):
        seq = ids[0].tolist()
        prompt = next(p for p in self.scripts if seq[:len(p)] == list(p))
        done = len(seq) - len(prompt)
        script = self.scripts[prompt]
        logits = torch.zeros(1, len(seq), self.vocab)
        logits[0, -1, script[done] if done < len(script) else 0] = 1.0
        return type("Out", (), {"logits": logits})


def test_needle_exact_match_scoring(tokenizer, tmp_path):
    samples = [needle.build_sample(tokenizer, 2, 2, 128, d, seed=i) for i, d in enumerate((0.0, 1.0))]
    scripts = {}
    for s in samples:
        right = tokenizer.encode(" " + s.queries[0].answer + ".", add_special_tokens=False)
        wrong = tokenizer.encode(" " + s.queries[1].answer + "7", add_special_tokens=False)  # one digit too many
        scripts[tuple(s.queries[0].input_ids)] = right
        scripts[tuple(s.queries[1].input_ids)] = wrong
    needle.score_samples(_Scripted(scripts, len(tokenizer)), tokenizer, samples, progress=False, use_cache=False)
    assert [s.results for s in samples] == [[True, False], [True, False]]
    table = needle.accuracy_table(samples)
    assert table["2,2"]["overall"] == 0.5 and table["2,2"]["by_length_depth"]["128"] == {"0.00": 0.5, "1.00": 0.5}
    paths = needle.plot_heatmaps(table, tmp_path)
    assert [p.name for p in paths] == ["needle_N2_R2.png"] and paths[0].stat().st_size > 1000
    assert needle.generated_number(" 12345, then") == "12345" and needle.generated_number(" none") is None


# ---- outliers ---------------------------------------------------------------------------------------------------

def test_outlier_stats_of_a_known_tensor():
    values = torch.arange(1, 201, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(100)  # |v| = 1..200
    stats = outliers.outlier_stats([values[:50].view(5, 10), values[50:]])
    assert {k: stats[k] for k in ("top1", "top2", "top3", "top10", "top100", "median", "count")} == {
        "top1": 200.0, "top2": 199.0, "top3": 198.0, "top10": 191.0, "top100": 101.0, "median": 100.0, "count": 200}
    assert math.isnan(outliers.outlier_stats([torch.ones(3)])["top10"])
    with pytest.raises(ValueError, match="at least one"):
        outliers.outlier_stats([])


def test_activation_outliers_of_a_model():
    model = _model(2, std=0.5)
    sequences = [torch.randint(0, 64, (10,)).tolist(), torch.randint(0, 64, (7,)).tolist()]
    result = outliers.activation_outliers(model, sequences, progress=False)
    heads, layers = 4, 2
    assert result["attention_logits"]["count"] == layers * heads * (10 * 11 // 2 + 7 * 8 // 2)  # causal entries
    assert result["hidden_states"]["count"] == layers * 32 * (10 + 7)
    with torch.no_grad():
        out = model.model(torch.tensor([sequences[0]]), output_hidden_states=True, use_cache=False)
    assert result["hidden_states"]["top1"] >= float(out.hidden_states[1].abs().max())


# ---- perplexity -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,stride", [(20, 20), (8, 3), (5, 1), (2, 2)])
def test_sliding_window_scores_every_token_once(window, stride):
    model = _model()
    torch.nn.init.zeros_(model.lm_head.weight)  # uniform predictions: log(64) nats per token, whatever the context
    total, count = perplexity.sliding_window_nll(model, torch.randint(0, 64, (20,)), window, stride, batch_size=3)
    assert count == 19 and total == pytest.approx(19 * math.log(64), rel=1e-6)


def test_sliding_window_matches_full_context_and_refuses_bad_values():
    model = _model(std=0.3)
    tokens = torch.randint(0, 64, (12,))
    with torch.no_grad():
        logits = model(tokens[None], use_cache=False).logits[0]
    direct = float(torch.nn.functional.cross_entropy(logits[:-1].double(), tokens[1:], reduction="sum"))
    assert perplexity.sliding_window_nll(model, tokens, 11)[0] == pytest.approx(direct, rel=1e-6)
    # window 4, stride 2 over 11 tokens: (inputs, scored targets) by hand
    chunks = [(0, 2, 1, 3), (0, 4, 3, 5), (2, 6, 5, 7), (4, 8, 7, 9), (6, 10, 9, 11)]
    expected = 0.0
    with torch.no_grad():
        for begin, stop, first, end in chunks:
            out = model(tokens[None, begin:stop], use_cache=False).logits[0].double()
            expected += float(torch.nn.functional.cross_entropy(out[first - 1 - begin:], tokens[first:end],
                                                                reduction="sum"))
    assert perplexity.sliding_window_nll(model, tokens[:11], 4, 2)[0] == pytest.approx(expected, rel=1e-6)
    for bad in (dict(window=0), dict(window=4, stride=5), dict(window=4, stride=0)):
        with pytest.raises(ValueError):
            perplexity.sliding_window_nll(model, tokens, **bad)


# ---- scoring, ICL -----------------------------------------------------------------------------------------------

def test_continuation_logprobs_match_a_direct_computation():
    model = _model(std=0.3)
    pairs = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10]), ([11, 12, 13, 14, 15], [1])]
    got = continuation_logprobs(model, pairs, batch_size=2)
    for (context, continuation), (score, greedy) in zip(pairs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + continuation]), use_cache=False).logits[0]
                                     .double(), -1)
        n = len(context)
        expected = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(continuation))
        assert score == pytest.approx(expected, abs=1e-5)
        assert greedy == all(int(logp[n - 1 + i].argmax()) == t for i, t in enumerate(continuation))
    nexts = next_token_logprobs(model, [[11, 12, 13, 14, 15], [7]], batch_size=1)
    assert float(nexts[0][1]) == pytest.approx(got[2][0], abs=1e-9) and nexts[1].shape == (64,)
    first = greedy_continuation(model, [1, 2, 3], 3)
    assert greedy_continuation(model, [1, 2, 3], 3, use_cache=True) == first
    assert continuation_logprobs(model, [([1, 2, 3], first)])[0][1] is True


def test_icl_order_robustness(model_dir, tokenizer):
    model = DiffLlamaForCausalLM.from_pretrained(model_dir).eval()
    result = icl_order_robustness(model, tokenizer, RT_DATA / "rt_train.csv", RT_DATA / "rt_test.csv", k=3, n_test=10,
                                  orders=3, progress=False)
    assert len(result["accuracies"]) == 3 and result["labels"] == ["fresh", "rotten"]
    assert result["spread"] == pytest.approx(result["best"] - result["worst"])
    assert all(a * 10 == round(a * 10) for a in result["accuracies"])  # a count out of 10
    with pytest.raises(ValueError, match="k=5000"):
        icl_order_robustness(model, tokenizer, RT_DATA / "rt_train.csv", RT_DATA / "rt_test.csv", k=5000, progress=False)


# ---- the runner and the command line ----------------------------------------------------------------------------

def test_settings_refuse_bad_values():
    for bad, match in ((dict(tasks=["needles"]), "tasks"), (dict(samples=0), "samples"), (dict(bits=[1]), "bits"),
                       (dict(tasks=["harness"]), "harness_tasks"), (dict(texts=["/no/such/file"]), "texts")):
        with pytest.raises(ValueError, match=match):
            EvalSettings(**bad).check()


def test_cli_eval_writes_results_and_plots(model_dir, tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "a.txt"
    text.write_text("The people of the United States and their Congress. " * 20)
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--task", "perplexity,needle,attention,outliers",
                                      "--task", "quantization", "--text", str(text), "--out", str(out),
                                      "--lengths", "128", "--bits", "4", "--window", "64", "--stride", "32",
                                      "--outlier-sequences", "2", "--num-threads", "1"])
    torch.set_num_threads(threads)  # --num-threads sets the process's; the other tests keep theirs
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"perplexity", "needle", "attention", "outliers", "quantization", "timings_s"}
    assert set(saved["needle"]) | {c.split("@")[0] for c in saved["needle_skipped"]} == {"1,1", "2,2", "4,2", "6,2"}
    assert saved["needle_skipped"] == ["4,2@128", "6,2@128"] and list(saved["quantization"]) == ["none", "4"]
    assert saved["perplexity"]["bytes"] == len(text.read_bytes())
    assert saved["outliers"]["sequences"] == 2 and saved["outliers"]["hidden_states"]["count"] == 2 * 2 * 32 * 64
    with torch.no_grad():  # the unquantised loss is the perplexity pass's, over the same tokens
        model = DiffLlamaForCausalLM.from_pretrained(model_dir).eval()
        ids = Tokenizer.from_pretrained(model_dir).encode(text.read_text(), add_special_tokens=False)
        assert saved["quantization"]["none"]["loss"] == pytest.approx(
            perplexity.sliding_window_nll(model, ids, 64)[0] / (len(ids) - 1), rel=1e-5)
    assert {p.name for p in out.glob("*.png")} == {"needle_N1_R1.png", "needle_N2_R2.png",
                                                  "attention_allocation.png", "quantization.png"}
    assert "needle N,R=2,2" in result.output and "skipped" in result.output and "attention    answer" in result.output
    assert summary(saved)  # the saved JSON prints too


def test_cli_eval_refuses_bad_arguments(model_dir, tmp_path):
    for args, match in ((["--task", "bogus"], "tasks"), (["--lengths", "1k"], "--lengths"),
                        (["--bits", "1"], "bits")):
        result = CliRunner().invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and match in result.output, result.output
        assert not (tmp_path / "x").exists()
    (tmp_path / "afile").write_text("keep")
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "afile")])
    assert (result.exit_code, result.output) == (2, f"error: --out {str(tmp_path / 'afile')!r} is a file: give a "
                                                    f"folder for the results\n")
    with pytest.raises(ValueError, match="out_dir .*afile/sub' must be a folder"):  # the Python API
        evaluate(model_dir, tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "keep"
