"""One choice selects the architecture: `diffllama train --arch`, preset trios, `diffllama convert`, `train
--init-from`, and generate / finetune / eval on V2 and Llama checkpoints trained through the CLI."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM
from diffllama.cli import app
from diffllama.config import ARCHITECTURES
from diffllama.eval.attention_maps import captured_maps, plain_attention_maps, reference_attention_path
from diffllama.presets import PRESETS, get_preset
from diffllama.train.config import resolve_config
from train_utils import MICRO_MODEL, small_corpus

runner = CliRunner()
MICRO = {name: value for name, value in MICRO_MODEL.items() if name != "intermediate_size"}


def _parameters(model: dict, vocab: int) -> int:
    """Parameters of a model of these config fields, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = DiffLlamaForCausalLM(DiffLlamaConfig(**{**model, "vocab_size": model["vocab_size"] or vocab}))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_trios_match_within_two_percent(name):
    members = {arch: get_preset(name, model_type) for arch, model_type in ARCHITECTURES.items()}
    vocab = -(-members["llama"]["train"]["tokenizer_vocab_size"] // 64) * 64
    counts = {arch: _parameters(member["model"], vocab) for arch, member in members.items()}
    for arch, member in members.items():
        assert member["train"] == members["llama"]["train"]
        assert member["model"]["model_type"] == ARCHITECTURES[arch]
        shape = {k: v for k, v in member["model"].items() if k not in ("intermediate_size", "model_type")}
        assert shape == {k: v for k, v in members["llama"]["model"].items()
                         if k not in ("intermediate_size", "model_type")}
        assert abs(counts[arch] / counts["llama"] - 1) < 0.02, (arch, counts)
    assert counts["diffllama-v2"] != counts["llama"]  # V2 pays for its wider q_proj with a narrower MLP
    assert members["diffllama-v2"]["model"]["intermediate_size"] < members["llama"]["model"]["intermediate_size"]


def test_model_type_picks_the_trio_member(tmp_path):
    assert resolve_config("tiny").model["model_type"] == "diffllama"
    v2 = resolve_config("tiny", overrides={"model": {"model_type": "diffllama_v2"}})
    assert v2.model["intermediate_size"] == 608 and v2.model["hidden_size"] == 256
    path = tmp_path / "run.yaml"
    path.write_text("preset: 0.4b\nmodel: {model_type: diffllama_v2}\n")
    assert resolve_config(None, path).model["intermediate_size"] == 2432
    path.write_text("model: {model_type: diffllama_v2, intermediate_size: 100}\n")  # a given field beats the member
    assert resolve_config(None, path).model["intermediate_size"] == 100
    path.write_text("model: {model_type: gpt}\n")
    with pytest.raises(ValueError, match="model_type must be one of .*'gpt'"):
        resolve_config(None, path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


def _config(folder, corpus, **extra):
    settings = dict(preset="tiny", data=[str(corpus)], cache_dir=str(folder / "cache"), tokenizer_vocab_size=320,
                    seq_len=32, batch_size=4, max_steps=4, warmup_steps=1, eval_every=4, eval_batches=2,
                    log_every=1, save_every=4, device="cpu", val_fraction=0.1, tensorboard=False,
                    model=dict(MICRO, max_position_embeddings=128))
    settings.update(extra)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module", params=["diffllama-v2", "llama"])
def trained(request, tmp_path_factory, corpus):
    """(arch, run folder) of a 4-step micro run trained by `diffllama train --arch ARCH`."""
    folder = tmp_path_factory.mktemp(request.param)
    result = runner.invoke(app, ["train", "--config", str(_config(folder, corpus)), "--arch", request.param,
                                 "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return request.param, folder / "run"


def test_train_arch_prints_architecture_and_saves_it(trained):
    arch, run = trained
    model_type = ARCHITECTURES[arch]
    assert json.loads((run / "model" / "config.json").read_text())["model_type"] == model_type
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["model_type"] == model_type
    # the tiny trio member's MLP width for this arch (the micro file sets no intermediate_size)
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["intermediate_size"] == get_preset("tiny", model_type)["model"]["intermediate_size"]


def test_resume_refuses_another_arch(trained):
    arch, run = trained
    other = "llama" if arch != "llama" else "diffllama"
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--arch", other, "--max-steps", "6"])
    assert result.exit_code == 1, result.output
    assert (f"model.model_type {ARCHITECTURES[arch]!r} in the checkpoint vs {ARCHITECTURES[other]!r} now"
            in result.output)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--arch", arch])  # the same: a no-op
    assert result.exit_code == 0, result.output


def test_generate_on_each_architecture(trained):
    arch, run = trained
    result = runner.invoke(app, ["generate", str(run / "model"), "The people", "-n", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # five tokens of text


def test_finetune_on_each_architecture(trained, tmp_path):
    arch, run = trained
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"Row {i} is {'good' if i % 2 else 'bad'}.,{'pos' if i % 2 else 'neg'}\n"
                                             for i in range(24)))
    result = runner.invoke(app, ["finetune", "sequence-classification", "--model", str(run / "model"), "--data",
                                 str(data), "--out", str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "4",
                                 "--device", "cpu", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert config["model_type"] == ARCHITECTURES[arch] and config["id2label"] == {"0": "neg", "1": "pos"}
    result = runner.invoke(app, ["predict", "sequence-classification", "--model", str(tmp_path / "ft" / "model"),
                                 "--device", "cpu", "-"], input="Row 3 is good.\nRow 4 is bad.\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and all(line["label"] in ("neg", "pos") for line in lines)


def test_eval_on_each_architecture(trained, tmp_path):
    arch, run = trained
    text = tmp_path / "a.txt"
    text.write_text("The people of the United States and their Congress. " * 10)
    threads = torch.get_num_threads()
    result = runner.invoke(app, ["eval", str(run / "model"), "--task", "perplexity,attention", "--text", str(text),
                                 "--lengths", "128", "--window", "64", "--out", str(tmp_path / "eval"),
                                 "--num-threads", "1"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["perplexity"]["bytes"] == len(text.read_bytes())
    assert 0 < saved["attention"]["answer"] < 1 and 0 < saved["attention"]["noise"] < 1


@pytest.mark.parametrize("model_type, kv", [("diffllama_v2", 4), ("diffllama_v2", 2), ("llama", 4), ("llama", 1)])
def test_plain_attention_maps_reproduce_the_model(model_type, kv):
    config = DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=kv, model_type=model_type,
                             attn_implementation="sdpa")
    torch.manual_seed(0)
    model = DiffLlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 64, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        with reference_attention_path(model):
            replaced = model(ids, attention_mask=mask, use_cache=False).logits
        with captured_maps(model) as maps:
            model(ids, attention_mask=mask, use_cache=False)
    keep = mask.bool()
    torch.testing.assert_close(replaced[keep], expected[keep], atol=1e-10, rtol=1e-10)
    combined = maps[0].combined()  # (B, h, S, S)
    assert combined.shape == (2, 4, 11, 11)
    rows = combined.sum(-1)[0]  # rows sum to 1 (Llama) or 1 - λ (V2: λ per token and head)
    target = torch.ones_like(rows) if model_type == "llama" else 1 - maps[0].lambda_full[0, :, :, 0]
    torch.testing.assert_close(rows, target)


def test_v2_maps_refuse_pairs_over_two_value_heads():
    config = DiffLlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=2, model_type="diffllama_v2")
    model = DiffLlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) to divide num_attention_heads \(3\)"):
        with captured_maps(model, plain_attention_maps):
            model(torch.zeros(1, 4, dtype=torch.long), use_cache=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, corpus):
    """(Llama model folder, its `diffllama convert --arch diffllama-v2` output): a Llama trained 4 steps by the CLI
    (so it has a tokenizer), converted by the CLI."""
    folder = tmp_path_factory.mktemp("convert")
    result = runner.invoke(app, ["train", "--config", str(_config(folder, corpus)), "--arch", "llama", "--out",
                                 str(folder / "llama")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(folder / "llama" / "model"), str(folder / "v2"), "--arch",
                                 "diffllama-v2"])
    assert result.exit_code == 0, result.output
    assert f"--init-from {folder / 'v2'}" in result.output
    return folder / "llama" / "model", folder / "v2"


def test_converted_llama_trains_with_init_from(converted, corpus, tmp_path):
    llama, v2 = converted
    assert json.loads((v2 / "config.json").read_text())["model_type"] == "diffllama_v2"
    assert (v2 / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(DiffLlamaForCausalLM.from_pretrained(v2, dtype="float64")(ids).logits,
                                   DiffLlamaForCausalLM.from_pretrained(llama, dtype="float64")(ids).logits,
                                   atol=1e-10, rtol=1e-10)
    # 20 steps at a learning rate too small to move the weights: the run's model is the converted one, trained on
    config = _config(tmp_path, corpus, max_steps=20, eval_every=20, save_every=20, lr=1e-12, warmup_steps=0)
    result = runner.invoke(app, ["train", "--config", str(config), "--init-from", str(v2), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "model: diffllama-v2 (model_type diffllama_v2)" in result.output and f"weights from {v2}" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20
    start = DiffLlamaForCausalLM.from_pretrained(v2).state_dict()
    end = DiffLlamaForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert start.keys() == end.keys()
    for name in start:
        torch.testing.assert_close(end[name], start[name], atol=1e-8, rtol=0)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1  # a new run from step 0, not the source's steps
    # the run resumes from its own checkpoint and saved model settings (the config.yaml holds the checkpoint's)
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "22"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 22


@pytest.mark.parametrize("extra, message", [
    (["--arch", "llama"], "model_type 'llama' given vs 'diffllama_v2' in the checkpoint (--arch llama vs "
                          "--arch diffllama-v2)"),
    (["--tokenizer", "somewhere"], "brings its checkpoint's tokenizer"),
])
def test_init_from_refuses_settings_the_checkpoint_fixes(converted, corpus, tmp_path, extra, message):
    _, v2 = converted
    result = runner.invoke(app, ["train", "--config", str(_config(tmp_path, corpus)), "--init-from", str(v2),
                                 "--out", str(tmp_path / "run"), *extra])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_init_from_refuses_a_shape_the_checkpoint_lacks(converted, corpus, tmp_path):
    _, v2 = converted
    config = tmp_path / "shape.yaml"
    config.write_text(_config(tmp_path, corpus).read_text().replace("hidden_size: 32", "hidden_size: 64"))
    result = runner.invoke(app, ["train", "--config", str(config), "--init-from", str(v2), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "hidden_size 64 given vs 32 in the checkpoint" in result.output


@pytest.mark.parametrize("args, code, message", [
    (["--arch", "llama"], 2, "--arch must be one of diffllama, diffllama-v2 (what a Llama converts to), got 'llama'"),
    (["--arch", "diffllama-v2"], 1, "src_dir must be a Llama checkpoint (model_type 'llama')"),
])
def test_convert_errors(converted, tmp_path, args, code, message):
    _, v2 = converted  # a V2 folder is no Llama source
    result = runner.invoke(app, ["convert", str(v2), str(tmp_path / "out"), *args])
    assert result.exit_code == code and result.output.startswith(f"error: {message}"), result.output
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_unknown_arch(corpus, tmp_path):
    result = runner.invoke(app, ["train", "--config", str(_config(tmp_path, corpus)), "--arch", "gpt", "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "--arch must be one of ('diffllama', 'diffllama-v2', 'llama'), got 'gpt'" in result.output


def test_plot_draws_several_runs_in_one_image(trained, tmp_path):
    _, run = trained
    result = runner.invoke(app, ["plot", str(run), str(run), "--out", str(tmp_path / "trio.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "trio.png").stat().st_size > 1000
    result = runner.invoke(app, ["plot", str(run), str(run)])
    assert result.exit_code == 1 and "several with --out" in result.output
