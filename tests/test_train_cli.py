"""`diffllama train` and `diffllama plot` through the CLI: a micro run, clear errors, SIGTERM saves and resumes."""

import json
import os
import re
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
    out.mkdir()  # an existing empty folder is a fine --out
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--lr", "0.002"])
    assert result.exit_code == 0, result.output
    assert "bits/byte" in result.output and "unigram entropy" in result.output
    # each evaluation shows its own bar over its eval_batches=2 batches (tqdm redraws at most every 0.1 s)
    assert len(re.findall(r"eval: +\d+%\|.*?\| [0-2]/2 \[", result.output)) >= 2, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["model"]["hidden_size"] == 32 and saved["max_steps"] == 4
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    generation = json.loads((out / "model" / "generation_config.json").read_text())  # as save_pretrained writes
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert generation["eos_token_id"] == model_config["eos_token_id"] and generation["_from_model_config"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    result = runner.invoke(app, ["plot", str(out)])
    assert result.exit_code == 0 and (out / "loss.png").stat().st_size > 1000
    # Rerunning into the same folder without --resume is refused; --resume on a finished run is a no-op.
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1 and "--resume" in result.output
    result = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    # --resume with settings the checkpoint fixes is refused before any work, naming each with its two values; the
    # run is untouched.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    saved_config = (out / "config.yaml").read_text()
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--preset", "small"])
    assert result.exit_code == 1 and result.output.startswith("error: --resume:"), result.output
    assert "model.hidden_size 32 in the checkpoint vs 512 now" in result.output
    assert "seq_len 32 in the checkpoint vs 1024 now" in result.output
    assert "--resume continues the run with its saved settings" in result.output and "Traceback" not in result.output
    for flags, listed in ((["--lr", "0.1"], "(lr 0.002 in the checkpoint vs 0.1 now)"),
                          (["--seq-len", "16"], "(seq_len 32 in the checkpoint vs 16 now)"),
                          (["--warmup-steps", "3", "--batch-size", "2"],
                           "(warmup_steps 1 in the checkpoint vs 3 now, batch_size 4 in the checkpoint vs 2 now)")):
        result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "6", *flags])
        assert result.exit_code == 1 and listed in result.output, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "config.yaml").read_text() == saved_config  # records only what was used
    # --max-steps may change: the run goes on, and config.yaml records the new value.
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    want = 6 * 4 * 32
    assert json.loads((out / "summary.json").read_text())["tokens"] == want
    assert f"6 steps, {want:,} tokens" in result.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])["tokens"] == want
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 6 and saved["lr"] == 0.002


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/corpus"], "does not exist"),
    (["--lr", "-1"], "lr must be a number > 0"),
    (["--val-fraction", "1.5"], "val_fraction must be a number with 0 < val_fraction < 1"),
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    # was OOM-killed (21.5 GB and growing): the memory estimate refuses it before any data work
    (["--seq-len", "100000"], "this run needs about"),
    (["--preset", "huge"], "unknown preset"),
    (["--seed", "99999999999999999999999"], "seed must be an integer in [0, 2**64 - 1], got 99999999999999999999999"),
], ids=["missing-corpus", "bad-lr", "bad-val-fraction", "bad-batch", "seq-past-memory", "bad-preset", "huge-seed"])
def test_clear_errors_and_nothing_written(tmp_path, args, message):
    config = _config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-file"])
@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_a_folder_flag_that_is_a_file_refused_up_front(tmp_path, flag, under):
    config = _config(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    target = afile / "sub" if under else afile
    out = target if flag == "--out" else tmp_path / "run"
    extra = [] if flag == "--out" else ["--cache-dir", str(target)]
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), *extra])
    assert result.exit_code == 1 and "Traceback" not in result.output
    if flag == "--out":
        where = f"cannot be created: {afile} is a file" if under else "is a file"
        expected = (f"error: --out '{out}' {where}, expected a run folder (a new or empty folder, or an existing "
                    f"run's folder with --resume)")
    else:
        where = f"lies under the file {afile}" if under else "is a file"
        expected = (f"error: cache_dir (--cache-dir) '{target}' {where}, expected a folder for the tokenized-data "
                    f"cache (it is created when missing)")
    assert result.output.startswith(expected), result.output
    assert afile.read_text() == "keep me" and not (tmp_path / "cache").exists()  # no data prepared
    assert flag == "--out" or not out.exists()


def test_non_utf8_corpus_refused_before_any_write(tmp_path):
    config = _config(tmp_path)
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Le café est bon.\n".encode("latin-1"))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--data", str(corpus)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (f"error: corpus file '{corpus}' is not UTF-8 text: byte 0xe9 at byte offset 6 "
                                     f"(line 1): invalid continuation byte; convert it to UTF-8 (e.g. iconv -f latin1 "
                                     f"-t utf-8)")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_out_that_is_not_a_run_folder_refused_up_front(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "model"  # e.g. a finished run's model folder
    out.mkdir()
    (out / "config.json").write_text("{}")
    for resume in ([], ["--resume"]):
        result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), *resume])
        assert result.exit_code == 1
        assert result.output.strip() == (
            f"error: --out '{out}' is an existing folder that is not a run folder (no config.yaml with "
            f"metrics.jsonl or checkpoints/), expected a new or empty folder, or an existing run's folder with "
            f"--resume"), result.output
    assert [p.name for p in out.iterdir()] == ["config.json"] and not (tmp_path / "cache").exists()


def test_empty_out_refused(tmp_path):
    config = _config(tmp_path)
    result = runner.invoke(app, ["train", "--config", str(config), "--out", ""])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --out must be a folder path, got ''; leave --out out for the default " \
                                    "runs/PRESET"
    assert not (tmp_path / "cache").exists()


def test_folder_left_before_the_first_step_is_a_run_folder(tmp_path):
    from diffllama.train.checkpoint import check_run_dir, is_run_dir
    from diffllama.train.loop import Trainer
    from diffllama.train.config import resolve_config

    out = tmp_path / "run"
    cfg = resolve_config(None, _config(tmp_path))
    Trainer(cfg, out, quiet=True)._prepare_run_dir()  # what a run killed before its first step leaves
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "metrics.jsonl"] and is_run_dir(out)
    check_run_dir(out)  # a rerun may use it
    (out / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match="is an existing folder that is not a run folder"):
        check_run_dir(out)  # config.yaml alone may be anyone's


def test_config_file_model_not_a_mapping(tmp_path):
    config = _config(tmp_path, model=5)
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == "error: model in the config file must be a mapping of DiffLlamaConfig fields " \
                                    "(e.g. model: {num_hidden_layers: 2}), got 5"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_parallel_without_torchrun_refused_before_any_data_work(tmp_path, monkeypatch, parallel):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = _config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--parallel", parallel])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"error: --parallel {parallel} needs processes launched by torchrun (e.g. torchrun --nproc_per_node=N -m "
        f"diffllama train ... --parallel {parallel}); for one process use --parallel none or auto")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_seq_len_above_max_positions_is_noticed_and_recorded(tmp_path):
    config = _config(tmp_path, max_steps=1, save_every=1, eval_every=1)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--seq-len", "80"])
    assert result.exit_code == 0, result.output
    notices = [line for line in result.output.splitlines() if "max_position_embeddings" in line]
    assert notices == ["note: seq_len 80 is above the model's max_position_embeddings 64; the model is saved with "
                       "max_position_embeddings 80"]
    recorded = [yaml.safe_load((out / "config.yaml").read_text()),
                yaml.safe_load((out / "checkpoints" / "step-000001" / "train_config.yaml").read_text())]
    assert [r["model"]["max_position_embeddings"] for r in recorded] == [80, 80]
    assert json.loads((out / "model" / "config.json").read_text())["max_position_embeddings"] == 80
    result = runner.invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "2"])
    assert result.exit_code == 0, result.output  # the recorded settings resume as they are
    assert "max_position_embeddings" not in result.output


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
    (dict(hidden_sizee=64), "unknown model setting(s) ['hidden_sizee']; the model settings are DiffLlamaConfig's "
                            "fields: attention_bias, attention_dropout, attn_implementation, bos_token_id, "),
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
