"""DiffLlamaConfig: transformers' fields and defaults, both RoPE spellings, JSON round trip, validation messages."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from diffllama import DiffLlamaConfig


def test_defaults_and_json_match_transformers(tmp_path):
    import transformers

    ours, theirs = DiffLlamaConfig(), transformers.DiffLlamaConfig()
    expected = json.loads(theirs.to_json_string(use_diff=True))
    expected.pop("transformers_version")
    assert {k: v for k, v in ours.to_dict().items() if k in expected} == expected
    assert set(expected) <= set(ours.to_dict())
    ours.save_pretrained(tmp_path)
    reread = transformers.DiffLlamaConfig.from_pretrained(tmp_path)
    assert reread.to_dict()["rope_parameters"] == theirs.to_dict()["rope_parameters"]
    assert reread.head_dim == 64 and reread.lambda_std_dev == 0.1


def test_transformers_config_json_round_trips(tmp_path):
    import transformers

    theirs = transformers.DiffLlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                                           "original_max_position_embeddings": 512},
                                          id2label={0: "a", 1: "b", 2: "c"}, pad_token_id=3)
    theirs.save_pretrained(tmp_path)
    ours = DiffLlamaConfig.from_pretrained(tmp_path)
    assert ours.rope_parameters == theirs.rope_parameters and ours.rope_theta == 5e5
    assert ours.num_labels == 3 and ours.id2label == {0: "a", 1: "b", 2: "c"} and ours.label2id["c"] == 2
    assert ours.extra["transformers_version"] == transformers.__version__
    again = DiffLlamaConfig.from_dict(ours.to_dict())
    assert again == ours


@pytest.mark.parametrize("legacy", [
    {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
])
def test_legacy_rope_keys_are_folded_into_rope_parameters(legacy):
    config = DiffLlamaConfig.from_dict({"model_type": "diffllama", **legacy})
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["rope_theta"] == 5e5
    assert "rope_scaling" not in config.to_dict() and "rope_theta" not in config.to_dict()


def test_legacy_theta_alone():
    assert DiffLlamaConfig(rope_theta=1234.0).rope_parameters == {"rope_type": "default", "rope_theta": 1234.0}


def test_derived_fields():
    config = DiffLlamaConfig(hidden_size=96, num_attention_heads=6)
    assert config.num_key_value_heads == 6 and config.head_dim == 16
    assert DiffLlamaConfig(hidden_size=96, num_attention_heads=4, head_dim=32).head_dim == 32
    assert dataclasses.replace(config).head_dim == 16


@pytest.mark.parametrize("fields, message", [
    ({"num_attention_heads": 5, "hidden_size": 40}, "num_attention_heads must be even"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)"),
    ({"hidden_size": 100, "num_attention_heads": 8}, r"hidden_size \(100\) must be divisible by num_attention_heads \(8\) when head_dim is not set"),
    ({"hidden_size": -4}, "hidden_size must be a positive integer, got -4"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"intermediate_size": 1.5}, "intermediate_size must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"hidden_act": "swiglu"}, "hidden_act must be one of .* got 'swiglu'"),
    ({"rope_parameters": {"rope_type": "ntk", "rope_theta": 1e4}}, r"rope_parameters\['rope_type'\] must be one of .* got 'ntk'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"rope_parameters of type 'linear' is missing required key\(s\) \['factor'\]"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, r"missing required key\(s\) \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, r"rope_parameters\['short_factor'\] must have head_dim // 2 = 32 entries, got 1"),
    ({"rope_theta": -1.0}, r"rope_parameters\['rope_theta'\] must be a finite number > 0, got -1.0"),
    # A string where a number belongs: was TypeError: '>' not supported between instances of 'str' and 'int'.
    ({"rope_theta": "abc"}, r"^rope_parameters\['rope_theta'\] must be a finite number > 0, got 'abc'$"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}, r"rope_theta'\] must be a finite"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}},
     r"^rope_parameters\['factor'\] must be a finite number >= 1 for 'linear', got '2'$"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 0.5}}, r"rope_parameters\['factor'\] must be .* >= 1"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation must be one of .* got 'flash_attention_2'"),
    ({"attention_dropout": 1.5}, r"attention_dropout must be a number in \[0, 1\), got 1.5"),
    ({"attention_dropout": "0.1"}, r"^attention_dropout must be a number in \[0, 1\), got '0.1'$"),
    ({"classifier_dropout": "0.1"}, r"^classifier_dropout must be None or a number in \[0, 1\), got '0.1'$"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a finite number > 0, got 0.0"),
    ({"rms_norm_eps": "1e-5"}, r"^rms_norm_eps must be a finite number > 0, got '1e-5'$"),
    ({"head_dim": 7}, "head_dim must be a positive even integer"),
    ({"problem_type": "ranking"}, "problem_type must be None"),
    ({"initializer_range": -1.0}, r"initializer_range must be a finite number >= 0 \(a standard deviation\), got -1.0"),
    ({"lambda_std_dev": float("nan")}, "lambda_std_dev must be a finite number >= 0"),
    ({"initializer_range": "0.02"}, "initializer_range must be a finite number >= 0"),
    ({"vocab_size": 128, "pad_token_id": 500}, "pad_token_id must be None or a token id below vocab_size=128"),
    ({"rope_scaling": "linear"}, "rope_scaling must be None or a dict"),
    # Strings in bool fields: "false" would act as True.
    ({"tie_word_embeddings": "false"}, r"^tie_word_embeddings must be true or false \(a bool\), got 'false'$"),
    ({"attention_bias": "no"}, "attention_bias must be true or false"),
    ({"use_cache": 1}, "use_cache must be true or false"),
    # RoPE keys that reached a ZeroDivisionError, math domain error or TypeError at model build or forward.
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0}},
     r"rope_parameters\['low_freq_factor'\] must be a finite number > 0, got 0"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4, "high_freq_factor": 4.0}},
     r"rope_parameters\['high_freq_factor'\] must be > low_freq_factor \(4\), got 4.0"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": -5}},
     r"original_max_position_embeddings must be a number >= 1"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}},
     r"rope_parameters\['beta_fast'\] must be a finite number > 0, got '32'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 2.0}},
     r"partial_rotary_factor'\] must be a number in \(0, 1\]"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": "0.5"}},
     r"partial_rotary_factor'\] must be a number in \(0, 1\]"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": 5, "long_factor": [1.0]}},
     r"rope_parameters\['short_factor'\] must be a list of finite numbers > 0, got 5"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "head_dim": 2}, "dynamic RoPE needs head_dim >= 4"),
    ({"id2label": {"a": "x"}}, r"id2label must map integer ids to string names, got the entry 'a': 'x'"),
    ({"id2label": ["x", "y"]}, "id2label must be a dict of label ids to names"),
    ({"id2label": {0: "x", 1: "y"}, "label2id": {"x": 1, "y": 0}}, "label2id must be the inverse of id2label"),
    ({"vocab_size": 128, "eos_token_id": 128}, r"eos_token_id must hold ids in \[0, vocab_size=128\), got \[128\]"),
    ({"vocab_size": 128, "eos_token_id": [2, -1]}, r"eos_token_id must hold ids in \[0, vocab_size=128\), got \[-1\]"),
    ({"vocab_size": 128, "bos_token_id": 500}, r"bos_token_id must be an id in \[0, vocab_size=128\), got 500"),
    ({"eos_token_id": "2"}, "eos_token_id must be None, an int or a list of ints, got '2'"),
    ({"eos_token_id": [2, True]}, r"eos_token_id must be None, an int or a list of ints, got \[2, True\]"),
    ({"bos_token_id": [1]}, r"bos_token_id must be None or an int, got \[1\]"),
])
def test_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        DiffLlamaConfig(**fields)


def test_wrong_model_type_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match=r"config model_type must be one of \('diffllama', 'diffllama_v2', 'llama'\), "
                                         r"got 'mistral'"):
        DiffLlamaConfig.from_dict({"model_type": "mistral"})
    only = DiffLlamaConfig(label2id={"neg": 0, "pos": "1"})  # label2id alone names the labels (ids as ints)
    assert only.id2label == {0: "neg", 1: "pos"} and only.label2id == {"neg": 0, "pos": 1} and only.num_labels == 2
    assert DiffLlamaConfig.from_dict(only.to_dict()).id2label == {0: "neg", 1: "pos"}
    with pytest.raises(ValueError, match=r"a config must be a JSON object \(a dict of fields\), got list"):
        DiffLlamaConfig.from_dict([{"model_type": "diffllama"}])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        DiffLlamaConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*missing' does not exist"):
        DiffLlamaConfig.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json at .*empty/config.json"):
        DiffLlamaConfig.from_pretrained(tmp_path / "empty")


def test_a_config_that_validates_builds_a_model():
    """Values the model constructor would reject with torch's own message are refused by the config first."""
    from diffllama import DiffLlamaForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    for fields in ({"pad_token_id": 63}, {"pad_token_id": -1}, {"initializer_range": 0.0, "lambda_std_dev": 0.0}):
        DiffLlamaForCausalLM(DiffLlamaConfig(**small, **fields))


def test_overrides_must_be_fields(tmp_path):
    """A misspelt keyword (attn_implmentation=...) is an error, not a silent entry in ``extra``."""
    DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['attn_implmentation', 'bogus'\]"):
        DiffLlamaConfig.from_pretrained(tmp_path, attn_implmentation="eager", bogus=3)
    config = DiffLlamaConfig.from_pretrained(tmp_path, attn_implementation="eager", num_labels=3, pad_token_id=5)
    assert config.attn_implementation == "eager" and len(config.id2label) == 3 and config.pad_token_id == 5
    assert config.extra == DiffLlamaConfig.from_pretrained(tmp_path).extra


def test_num_labels_keyword_replaces_a_label_set_of_another_size(tmp_path):
    DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    id2label={0: "neg", 1: "pos", 2: "mixed"}).save_pretrained(tmp_path)
    five = DiffLlamaConfig.from_pretrained(tmp_path, num_labels=5)
    assert five.id2label == {i: f"LABEL_{i}" for i in range(5)} and five.label2id == {f"LABEL_{i}": i for i in range(5)}
    same = DiffLlamaConfig.from_pretrained(tmp_path, num_labels=3)  # same count: the checkpoint's names stay
    assert same.id2label == {0: "neg", 1: "pos", 2: "mixed"} and same.label2id["mixed"] == 2
    with pytest.raises(ValueError, match="num_labels=3 disagrees with the 2 entries of id2label"):
        DiffLlamaConfig.from_pretrained(tmp_path, num_labels=3, id2label={0: "a", 1: "b"})
    for bad in (0, -1, "3", 2.5, True):
        with pytest.raises(ValueError, match="num_labels must be an int >= 1"):
            DiffLlamaConfig.from_pretrained(tmp_path, num_labels=bad)


def test_special_token_ids_outside_the_vocabulary_are_refused_at_load(tmp_path):
    """transformers only warns about such ids; generate() would refuse them later, so loading refuses them."""
    import transformers

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    for ids in (dict(eos_token_id=None, bos_token_id=None), dict(eos_token_id=[0, 63], bos_token_id=63)):
        transformers.DiffLlamaConfig(**small, **ids).save_pretrained(tmp_path)
        config = DiffLlamaConfig.from_pretrained(tmp_path)
        assert (config.eos_token_id, config.bos_token_id) == (ids["eos_token_id"], ids["bos_token_id"])
    transformers.DiffLlamaConfig(**small, eos_token_id=[2, 64]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^eos_token_id must hold ids in \[0, vocab_size=64\), got \[64\]$"):
        DiffLlamaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^bos_token_id must be an id in \[0, vocab_size=64\), got -1$"):
        DiffLlamaConfig.from_dict({**small, "bos_token_id": -1})
    with pytest.raises(ValueError, match=r"eos_token_id must hold ids in \[0, vocab_size=32\), got \[40\]"):
        DiffLlamaConfig.from_pretrained(tmp_path, vocab_size=32, eos_token_id=40)


def test_num_labels_constructor_keyword_matches_transformers():
    import transformers

    config = DiffLlamaConfig(num_labels=3)
    theirs = transformers.DiffLlamaConfig(num_labels=3)
    assert config.num_labels == 3
    assert config.id2label == theirs.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert config.label2id == theirs.label2id
    assert DiffLlamaConfig.from_dict(config.to_dict()) == config
    named = DiffLlamaConfig(num_labels=2, id2label={0: "neg", 1: "pos"})
    assert named.id2label == {0: "neg", 1: "pos"} and named.label2id == {"neg": 0, "pos": 1}
    assert dataclasses.replace(config) == config and dataclasses.replace(DiffLlamaConfig()).id2label is None
    with pytest.raises(ValueError, match="num_labels=3 disagrees with the 2 entries of id2label"):
        DiffLlamaConfig(num_labels=3, id2label={0: "neg", 1: "pos"})
    for bad in (0, -2, 2.5, "3", True):
        with pytest.raises(ValueError, match=f"^num_labels must be an int >= 1, got {re.escape(repr(bad))}$"):
            DiffLlamaConfig(num_labels=bad)


def test_failed_config_save_removes_the_folders_it_created(tmp_path, monkeypatch):
    from diffllama import config as config_module

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(config_module, "atomic_write_text", no_space)
    with pytest.raises(OSError, match="No space left"):
        DiffLlamaConfig().save_pretrained(tmp_path / "cfg" / "x" / "y")
    assert not any(tmp_path.iterdir())


def test_read_json_object_names_the_file_for_each_way_it_can_be_wrong(tmp_path):
    from diffllama.io import read_json_object

    path = tmp_path / "generation_config.json"
    path.write_text('{"max_new_tokens": 5}')
    assert read_json_object(path) == {"max_new_tokens": 5}
    for data, message in [(b"[1, 2]", "must hold a JSON object ({...}), got a list"),
                          (b'{"a": 1', "is not valid JSON"), (b'{"a": "\xff"}', "is not valid JSON")]:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
            read_json_object(path)
