"""The lm-evaluation-harness model class ``diffllama`` on a local task (tests/data; skipped without lm_eval)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM  # noqa: E402
from diffllama.eval.harness import DiffLlamaLM, run_harness  # noqa: E402
from diffllama.eval.perplexity import sliding_window_nll  # noqa: E402
from diffllama.eval.scoring import continuation_logprobs  # noqa: E402
from diffllama.train.data import bundled_corpus, iter_documents, train_bpe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "diffllama" / "data"  # the Rotten Tomatoes slices the local task reads


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness")
    tokenizer = train_bpe(iter([d[:20000] for _, d in zip(range(20), iter_documents([bundled_corpus()]))]), 512)
    config = DiffLlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    DiffLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class _Request:
    def __init__(self, *args):
        self.args = args


def test_requests_match_the_scoring_helpers(model_dir):
    lm = DiffLlamaLM(pretrained=str(model_dir), device="cpu", batch_size=2)
    ids = lambda text: lm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    [(score, greedy)] = lm.loglikelihood([_Request("Review: fine\nSentiment: ", "fresh")])
    expected = continuation_logprobs(lm.model, [(ids("Review: fine\nSentiment:"), ids(" fresh"))])[0]
    assert (score, greedy) == pytest.approx(expected) and score < 0
    text = "The people of the United States " * 30  # longer than the 64-token context: several windows
    [rolling] = lm.loglikelihood_rolling([_Request(text)])
    tokens = [lm.tokenizer.eos_token_id] + ids(text)
    assert len(tokens) > 64 and rolling == pytest.approx(-sliding_window_nll(lm.model, tokens, 64)[0])
    [generated] = lm.generate_until([_Request("The people", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(generated, str) and "\n" not in generated


@pytest.mark.slow
def test_local_task_through_lm_eval(model_dir, tmp_path):
    task = (ROOT / "docs" / "eval_tasks" / "rt_sentiment.yaml").read_text()
    task = task.replace("src/diffllama/data/", f"{DATA}/")  # the shipped YAML's paths are relative to the repository
    (tmp_path / "rt_sentiment.yaml").write_text(task)
    results = run_harness(str(model_dir), ["rt_sentiment"], include_path=str(tmp_path), limit=6, device="cpu")
    acc = results["rt_sentiment"]["acc,none"]
    assert 0 <= acc <= 1 and math.isclose(acc * 6, round(acc * 6))


@pytest.mark.slow
def test_documented_command_runs_verbatim(model_dir):
    """docs/eval.md's command, from the repository root (where the task YAML's relative paths point)."""
    result = subprocess.run(
        [sys.executable, "-m", "diffllama.eval.harness", "--model", "diffllama", "--model_args",
         f"pretrained={model_dir}", "--tasks", "rt_sentiment", "--include_path", "docs/eval_tasks", "--limit", "4"],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rt_sentiment" in result.stdout and "acc" in result.stdout
