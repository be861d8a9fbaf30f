"""`diffllama train` and `diffllama plot` through the CLI: a micro run, clear errors, SIGTERM saves and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffllama.cli import app
from train_utils import MICRO_MODEL, small_corpus

runner = CliRunner()


def _config(tmp_path, **extra):
    corpus = small_corpus(tmp_path / "corpus")
    settings = dict(preset="tiny", data=[str(corpus)], cache_dir=str(tmp_path / "cache"), tokenizer_vocab_size=320,
                    seq_len=32, batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=2, log_every=1,
                    save_every=2, device="cpu", val_fraction=0.1, tensorboard=False, model=MICRO_MODEL)
    settings.update(extra)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_train_then_plot(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--lr", "0.002"])
    assert result.exit_code == 0, result.output
    assert "bits/byte" in result.output and "unigram entropy" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["model"]["hidden_size"] == 32 and saved["max_steps"] == 4
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    result = runner.invoke(app, ["plot", str(out)])
    assert result.exit_code == 0 and (out / "loss.png").stat().st_size > 1000
    # Rerunning into the same folder without --resume is refused; --resume on a finished run is a no-op.
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1 and "--resume" in result.output
    result = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    # --resume with another model shape is refused before any work, naming the fields; the run is untouched.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--preset", "small"])
    assert result.exit_code == 1 and result.output.startswith("error: --resume:"), result.output
    assert "hidden_size 32 in the checkpoint vs 512 now" in result.output
    assert "--resume keeps the run's model settings" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # Resuming with a shorter sequence: the token count is the running total, not steps x the new tokens/step.
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "6", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    want = 4 * 4 * 32 + 2 * 4 * 16
    assert json.loads((out / "summary.json").read_text())["tokens"] == want
    assert f"6 steps, {want:,} tokens" in result.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])["tokens"] == want


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/corpus"], "does not exist"),
    (["--lr", "-1"], "lr must be a number > 0"),
    (["--val-fraction", "1.5"], "val_fraction must be a number with 0 < val_fraction < 1"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--seq-len", "100000"], "fewer than seq_len"),
    (["--preset", "huge"], "unknown preset"),
], ids=["missing-corpus", "bad-lr", "bad-val-fraction", "bad-batch", "seq-too-long", "bad-preset"])
def test_clear_errors_and_nothing_written(tmp_path, args, message):
    config = _config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


def test_out_is_a_file_refused_up_front(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "afile"
    out.write_text("keep me")
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: --out '{out}' is a file, expected a run folder"), result.output
    assert out.read_text() == "keep me" and not (tmp_path / "cache").exists()  # no data prepared


def test_flash_on_cpu_refused_before_any_data_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = _config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out),
                                 "--attn-implementation", "flash"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: attn_implementation 'flash' needs a CUDA GPU"), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, RuntimeError)
    assert not out.exists() and not (tmp_path / "cache").exists()  # refused before the data was prepared


@pytest.mark.parametrize("model_extra, message", [
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(hidden_sizee=64), "hidden_sizee"),
])
def test_bad_model_setting_refused_before_any_data_work(tmp_path, model_extra, message):
    config = _config(tmp_path, model=dict(MICRO_MODEL, **model_extra))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "cache").exists()  # no tokenizer trained, no shards written


def test_resume_without_checkpoint_refused(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "x"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--resume"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: --resume: no checkpoint in {out} to resume from (drop --resume to " \
                                    f"start a new run)"
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
    config = _config(tmp_path, max_steps=400, save_every=0, eval_every=1000)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "diffllama", "train", "--config", str(config), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "interrupted by SIGTERM" in output
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.pt").is_file()
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped < 400
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", str(stopped + 2)])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == stopped + 2
