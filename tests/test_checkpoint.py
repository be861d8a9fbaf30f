"""Model-level checkpoints: round trips with transformers in both directions, and clear errors on bad files."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import diffllama
from conftest import hf_model, tiny_config

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + 0.1 * i for i in range(4)], "long_factor": [2.0 + 0.3 * i for i in range(4)]},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


def rope_config(rope: str, tied: bool, **kw):
    params = ROPES[rope]
    rope_parameters = None if params is None else {"rope_theta": 10000.0, **params}
    return tiny_config(rope_parameters=rope_parameters, tie_word_embeddings=tied, **kw)


def long_ids(config):
    # 80 positions > original max 32 and > max_position_embeddings 64: exercises dynamic and longrope switching.
    return torch.randint(1, config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_round_trip_with_transformers(tmp_path, rope, tied, sharded):
    import transformers

    config = rope_config(rope, tied)
    shard = "30KB" if sharded else "5GB"
    reference = hf_model("DiffLlamaForCausalLM", config, torch.float64)
    ids = long_ids(config)
    with torch.no_grad():
        expected = reference(ids).logits
    # transformers -> diffllama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    ours = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert ours.dtype == torch.float64 and not ours.training
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == sharded
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-12, atol=1e-12)
    # diffllama -> transformers
    ours.save_pretrained(tmp_path / "ours", max_shard_size=shard)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists() == sharded
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "diffllama" and saved["architectures"] == ["DiffLlamaForCausalLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa").eval()
    assert back.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, rtol=1e-12, atol=1e-12)
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes_round_trip(tmp_path, dtype):
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    loaded = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == getattr(torch, dtype)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32


@pytest.mark.parametrize("cls_name", ["DiffLlamaModel", "DiffLlamaForSequenceClassification",
                                      "DiffLlamaForQuestionAnswering", "DiffLlamaForTokenClassification"])
def test_task_heads_round_trip_with_transformers(tmp_path, cls_name):
    import transformers

    config = tiny_config(id2label={0: "neg", 1: "pos", 2: "neutral"})
    ours = getattr(diffllama, cls_name)(config).double().eval()
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = getattr(transformers, cls_name).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = long_ids(config)[:, :20]
    with torch.no_grad():
        a, b = ours(ids), back(ids)
    field = {"DiffLlamaModel": "last_hidden_state", "DiffLlamaForQuestionAnswering": "start_logits"}.get(cls_name, "logits")
    torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=1e-12)
    if cls_name != "DiffLlamaModel":
        assert back.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}


def test_causal_checkpoint_loads_into_every_head(tmp_path):
    causal = diffllama.DiffLlamaForCausalLM(tiny_config())
    causal.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"newly initialised weights not in the checkpoint: \['qa_outputs.bias'"):
        qa = diffllama.DiffLlamaForQuestionAnswering.from_pretrained(tmp_path)
    assert qa.loading_report == {"new": ["qa_outputs.bias", "qa_outputs.weight"], "dropped": ["lm_head.weight"]}
    torch.testing.assert_close(qa.transformer.embed_tokens.weight, causal.model.embed_tokens.weight)
    base = diffllama.DiffLlamaModel.from_pretrained(tmp_path)
    torch.testing.assert_close(base.norm.weight, causal.model.norm.weight)
    base.save_pretrained(tmp_path / "base")  # a bare decoder (no prefix) loads back into a causal LM's decoder
    with pytest.warns(UserWarning, match="lm_head.weight"):
        again = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(again.model.layers[1].mlp.up_proj.weight, causal.model.layers[1].mlp.up_proj.weight)


# ---- errors -------------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = diffllama.DiffLlamaForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite(directory, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    _rewrite(saved, lambda s: s.pop("model.layers.1.self_attn.lambda_q1"))
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.lambda_q1'\]"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)


def test_unexpected_key_is_named(saved):
    _rewrite(saved, lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.extra.weight'\]"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)


def test_shape_mismatch_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 48
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.0.mlp.down_proj.weight: the config "
                                         r"expects \(32, 48\), the file has \(32, 64\); model.layers.0.mlp.gate_proj"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)


def test_truncated_and_corrupt_weights(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)


def test_other_model_type_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config model_type must be 'diffllama', got 'llama'"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)


def test_missing_directory_and_bad_dtype(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="dtype must be one of"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved, dtype="int8")
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'tpu0'"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved, device="tpu0")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved, attn_implementation="flash3")


def test_failed_save_leaves_previous_checkpoint_loadable(saved, monkeypatch):
    import diffllama.checkpoint as ckpt

    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = diffllama.DiffLlamaForCausalLM(tiny_config())
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    original = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved, max_shard_size="20KB")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    monkeypatch.undo()
    diffllama.DiffLlamaForCausalLM.from_pretrained(saved)  # the old checkpoint still loads


def test_failed_save_into_new_directory_leaves_nothing_loadable(tmp_path, monkeypatch):
    import diffllama.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        diffllama.DiffLlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "new")


def test_generation_config_is_read(saved):
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(saved).generation_config == {}
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "pad_token_id": 0}))
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(saved)
    assert model.generation_config["eos_token_id"] == [2, 7]
