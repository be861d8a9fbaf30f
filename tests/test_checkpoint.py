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
    config["model_type"] = "mistral"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config model_type must be one of \('diffllama', 'diffllama_v2', 'llama'\), "
                                         r"got 'mistral'"):
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


def test_training_run_folder_names_the_model_to_load(saved, tmp_path):
    import shutil

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000004"
    shutil.copytree(saved, step)
    (step / "trainer_state.pt").write_bytes(b"")  # what marks a complete training checkpoint
    (run / "config.yaml").write_text("max_steps: 4\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=f"unfinished training run folder: its newest checkpoint is {step}"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(run)
    shutil.copytree(saved, run / "model")
    with pytest.raises(FileNotFoundError, match=f"training run folder: its final model is in {run / 'model'}"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(run)
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(run / "model").num_parameters() > 0


def test_failed_save_leaves_previous_checkpoint_loadable(saved, monkeypatch):
    import diffllama.hf_format as ckpt

    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert "generation_config.json" in before
    model = diffllama.DiffLlamaForCausalLM(tiny_config(eos_token_id=5))  # its generation_config.json differs too
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
    import diffllama.hf_format as ckpt

    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        diffllama.DiffLlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "new")


def test_generation_config_is_read(saved):
    (saved / "generation_config.json").unlink()
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(saved).generation_config == {}
    (saved / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "pad_token_id": 0}))
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(saved)
    assert model.generation_config["eos_token_id"] == [2, 7]


# ---- generation_config.json -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(eos_token_id=[2, 5]), dict(bos_token_id=None, pad_token_id=None),
                                       dict(eos_token_id=None, use_cache=False)],
                         ids=["default", "eos-list", "no-bos-pad", "no-eos-no-cache"])
def test_generation_config_file_as_transformers_writes_it(tmp_path, overrides):
    config = tiny_config(**overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model("DiffLlamaForCausalLM", config, torch.float32).save_pretrained(tmp_path / "hf")
    diffllama.DiffLlamaForCausalLM(config).save_pretrained(tmp_path / "ours")
    expected = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    expected.pop("transformers_version")  # our config.json does not claim a transformers version either
    text = (tmp_path / "ours" / "generation_config.json").read_text()
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert "transformers_version" not in json.loads((tmp_path / "ours" / "config.json").read_text())


@pytest.mark.parametrize("cls_name", ["DiffLlamaModel", "DiffLlamaForSequenceClassification"])
def test_only_the_causal_lm_writes_a_generation_config(tmp_path, cls_name):
    getattr(diffllama, cls_name)(tiny_config()).save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():  # transformers does not write one for these classes either
        warnings.simplefilter("ignore")
        hf_model(cls_name, tiny_config(), torch.float32).save_pretrained(tmp_path / "hf")
    files = [sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("ours", "hf")]
    assert files[0] == files[1]
    assert not (tmp_path / "ours" / "generation_config.json").exists()


def test_generation_config_round_trips_with_transformers_and_keeps_eos_behaviour(tmp_path):
    import transformers

    torch.manual_seed(0)
    ours = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.15)).double().eval()
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    free = ours.generate(ids, max_new_tokens=10, eos_token_id=[])
    ours.config.eos_token_id = int(free[0, 7 + 2])  # row 0 stops at step 2, then is padded with pad_token_id 0
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa").eval()
        hf.save_pretrained(tmp_path / "hf")
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert hf.generation_config.eos_token_id == ours.config.eos_token_id and hf.generation_config.pad_token_id == 0
    assert expected.shape == (2, 17) and expected[0, 7 + 3:].eq(0).all()
    for directory in ("ours", "hf"):  # ours <- ours, ours <- transformers: the file gives the same EOS/pad ids
        loaded = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / directory)
        assert loaded.generation_config["eos_token_id"] == ours.config.eos_token_id
        assert torch.equal(loaded.generate(ids, max_new_tokens=10), expected), directory


def test_a_loaded_generation_config_is_saved_as_it_was(saved, tmp_path):
    custom = {"eos_token_id": [2, 7], "pad_token_id": 0, "max_length": 40, "transformers_version": "5.17.0"}
    (saved / "generation_config.json").write_text(json.dumps(custom))
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(saved)
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == custom


# ---- from_pretrained: dtype, torch_dtype, device_map ---------------------------------------------------------

def test_dtype_auto_is_the_checkpoints_like_transformers(tmp_path):
    import transformers

    diffllama.DiffLlamaForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dtype"]  # no entry: the weights' dtype, as transformers reads it
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype
    assert reference == torch.bfloat16
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == reference
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path).dtype == reference
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "auto"}))  # the same as no entry
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path).dtype == reference
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "int7"}))
    with pytest.raises(ValueError, match="config.json's 'dtype' entry: dtype must be one of"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path)


def test_torch_dtype_is_a_deprecated_alias(saved):
    with pytest.warns(FutureWarning, match="torch_dtype is deprecated .* use dtype instead"):
        model = diffllama.DiffLlamaForCausalLM.from_pretrained(saved, torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    with pytest.warns(FutureWarning):
        assert diffllama.DiffLlamaForCausalLM.from_pretrained(saved, torch_dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="give dtype or torch_dtype .*not both: got dtype='float32', "
                                         "torch_dtype=torch.float16"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved, dtype="float32", torch_dtype=torch.float16)


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, "auto"])
def test_device_map_of_one_device(saved, device_map):
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(saved, device_map=device_map)
    auto = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert model.device == (auto if device_map == "auto" else torch.device("cpu"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(device_map={"model": "cpu", "lm_head": "cpu"}), NotImplementedError,
     r"device_map=\{'model': 'cpu', 'lm_head': 'cpu'\} places the model over several devices, which is not "
     r"supported"),
    (dict(device_map="balanced"), NotImplementedError,
     "device_map='balanced' places the model over several devices"),
    (dict(device_map="tpu0"), ValueError, "device_map must be one device such as 'cpu', .* got 'tpu0'"),
    (dict(device_map=True), ValueError, "device_map must be one device .* got True"),
    (dict(device="cpu", device_map="cpu"), ValueError, "give device or device_map, not both"),
    (dict(dtype="int8"), ValueError, r"dtype must be one of .*; or 'auto' \(the checkpoint's\)"),
    (dict(torch_dtype="int8"), ValueError, "dtype must be one of"),
])
def test_bad_loading_arguments_are_refused_before_reading_files(tmp_path, kwargs, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(error, match=match):  # a missing directory: the argument is refused first
            diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "does-not-exist", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_map_cuda_without_cuda(saved):
    for device_map in ("cuda:0", 0, {"": 0}):  # a GPU index says CUDA is missing too (was: "got 0")
        with pytest.raises(ValueError, match="CUDA is not available"):
            diffllama.DiffLlamaForCausalLM.from_pretrained(saved, device_map=device_map)
    # transformers' loading flags that mean nothing here are accepted, not taken for config fields
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(saved, low_cpu_mem_usage=True, trust_remote_code=False)
    assert model.device.type == "cpu"


# ---- from_pretrained: what is checked before the hub is asked and before the weights are read -------------------

class _Resolved(Exception):
    """Raised by the stand-in resolver: the arguments got past every check to resolution."""


def _no_resolution(monkeypatch):
    import diffllama.hf_format as ckpt

    def resolve(path_or_repo_id, **kwargs):
        raise _Resolved(path_or_repo_id)

    monkeypatch.setattr(ckpt, "resolve_checkpoint_dir", resolve)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_thetaa=1e6), r"unknown config field\(s\) \['rope_thetaa'\]"),
    (dict(num_label=3, pad_token_id=0), r"unknown config field\(s\) \['num_label'\]"),
    (dict(extra={"a": 1}), r"unknown config field\(s\) \['extra'\]"),  # extra is where config.json's unknown keys go
    (dict(attn_implementation="flash3"), r"attn_implementation must be one of \('eager', 'sdpa', 'flash', 'auto'\), "
                                         r"got 'flash3'"),
])
def test_bad_overrides_are_refused_before_a_hub_id_is_resolved(monkeypatch, kwargs, match):
    _no_resolution(monkeypatch)
    with pytest.raises(ValueError, match=match):
        diffllama.DiffLlamaForCausalLM.from_pretrained("some-org/some-model", **kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_labels=3), dict(rope_theta=5e5, pad_token_id=0),
                                    dict(attn_implementation="eager"), dict(use_cache=False, head_dim=8)])
def test_valid_overrides_pass_the_early_checks(monkeypatch, kwargs):
    _no_resolution(monkeypatch)
    with pytest.raises(_Resolved, match="some-org/some-model"):
        diffllama.DiffLlamaForCausalLM.from_pretrained("some-org/some-model", **kwargs)


def test_every_config_field_is_an_accepted_override():
    import dataclasses

    from diffllama.hf_format import config_override_names

    fields = {f.name for f in dataclasses.fields(diffllama.DiffLlamaConfig)}
    assert config_override_names() == fields - {"extra"} | {"num_labels"}
    assert {"rope_theta", "attn_implementation", "id2label", "num_labels"} <= config_override_names()


def test_config_dtype_is_checked_before_the_weights_are_read(saved, monkeypatch):
    import diffllama.hf_format as ckpt

    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "dtype": "int7"}))

    def no_weights(directory):
        raise AssertionError("the weights were read before config.json's dtype was checked")

    monkeypatch.setattr(ckpt, "load_state_dict", no_weights)
    with pytest.raises(ValueError, match="config.json's 'dtype' entry: dtype must be one of"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match="config.json's 'dtype' entry"):  # "auto" reads the entry too
        diffllama.DiffLlamaForCausalLM.from_pretrained(saved, dtype="auto")
    # An explicit dtype does not consult the entry, as in transformers.
    monkeypatch.undo()
    assert diffllama.DiffLlamaForCausalLM.from_pretrained(saved, dtype="float64").dtype == torch.float64
