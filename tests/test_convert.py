"""Llama -> DiffLlama conversion (diffllama.convert): V2 exact to 1e-10 against transformers' Llama in float64, V1
loads and runs, converted models train, and bad arguments are refused before anything is written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

import diffllama
from conftest import TINY, padded_batch
from diffllama import convert as conversion
from diffllama.config import DiffLlamaConfig

TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_llama(kv_heads: int = 2, **overrides) -> transformers.LlamaForCausalLM:
    """A transformers Llama (tiny, float64, eval) with weights far from uniform attention."""
    torch.manual_seed(0)
    fields = {**TINY, "num_key_value_heads": kv_heads, "initializer_range": 0.2, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).double().eval()


@pytest.fixture
def llama_dir(tmp_path):
    """A transformers Llama checkpoint folder with tokenizer files beside it; yields (folder, model)."""
    model = hf_llama()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (folder / "tokenizer.model").write_bytes(b"\x00\x01sentencepiece")
    return folder, model


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llama_to_v2_preserves_the_logits(kv_heads, attention_bias):
    """The converted state in a V2 model gives transformers' Llama logits (float64, relative 1e-10), left-padded."""
    reference = hf_llama(kv_heads, attention_bias=attention_bias)
    config = DiffLlamaConfig.from_dict(reference.config.to_dict(), attn_implementation="eager")
    state, v2_config = conversion.llama_to_v2(reference.state_dict(), config)
    assert v2_config.model_type == "diffllama_v2"
    model = diffllama.DiffLlamaForCausalLM(v2_config).double().eval()
    model.load_state_dict(state)
    ids, mask = padded_batch(96, "left")
    assert rel_err(logits(model, ids, mask), logits(reference, ids, mask)) < TOL


def test_convert_writes_a_complete_v2_folder(llama_dir, tmp_path):
    """convert(..., "diffllama-v2"): config (model_type diffllama_v2, no Llama-only keys), weights, generation
    config and tokenizer files; the folder loads with the Llama's logits."""
    source, reference = llama_dir
    out = conversion.convert(source, tmp_path / "out" / "v2", "diffllama-v2")
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                     "tokenizer.model"}
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diffllama_v2" and config["architectures"] == ["DiffLlamaV2ForCausalLM"]
    assert not {"mlp_bias", "pretraining_tp", "lambda_std_dev"} & set(config)
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float64
    ids, mask = padded_batch(96, "left")
    assert rel_err(logits(model, ids, mask), logits(reference, ids, mask)) < TOL


def test_convert_to_v1_loads_and_runs(llama_dir, tmp_path):
    """convert(..., "diffllama"): a V1 checkpoint that transformers' DiffLlama loads too; the positive half holds
    Llama's first H/2 query heads, the negative half and λ are zero, K/V/MLP/embedding unchanged."""
    source, reference = llama_dir
    out = conversion.convert(source, tmp_path / "v1", "diffllama")
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(out)
    attn, llama_attn = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    half = 2 * 8  # H/2 heads of d = 8
    assert torch.equal(attn.q_proj.weight[:half], llama_attn.q_proj.weight[:half])
    assert not attn.q_proj.weight[half:].any() and not any(p.any() for p in attn.lambda_parameters())
    assert torch.equal(attn.k_proj.weight, llama_attn.k_proj.weight)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)
    ids, mask = padded_batch(96, "left")
    assert logits(model, ids, mask).isfinite().all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(logits(theirs, ids, mask), logits(model, ids, mask)) < TOL


@pytest.mark.parametrize("to_arch", [conversion.llama_to_v2, conversion.llama_to_v1], ids=["v2", "v1"])
def test_a_converted_model_trains(to_arch):
    """20 AdamW steps on one batch (one layer, float32: fast): the converted model's loss stays finite and falls."""
    reference = hf_llama(num_hidden_layers=1)
    config = DiffLlamaConfig.from_dict(reference.config.to_dict())
    state, new_config = to_arch(reference.state_dict(), config)
    model = diffllama.DiffLlamaForCausalLM(new_config)
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0]


def test_wrong_source_model_type_is_refused_naming_it(tmp_path):
    diffllama.DiffLlamaForCausalLM(DiffLlamaConfig(**TINY)).save_pretrained(tmp_path / "v1")
    with pytest.raises(ValueError, match=r"src_dir must be a Llama checkpoint \(model_type 'llama'\), .* has "
                                         r"model_type 'diffllama'"):
        conversion.convert(tmp_path / "v1", tmp_path / "out", "diffllama-v2")
    with pytest.raises(ValueError, match=r"config.model_type must be 'llama' .*got 'diffllama'"):
        conversion.llama_to_v2({}, DiffLlamaConfig(**TINY))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "diffllama_v2", "v2", None])
def test_bad_arch_is_refused_before_anything_is_read_or_written(arch, tmp_path):
    with pytest.raises(ValueError, match=r"arch must be one of \('diffllama', 'diffllama-v2'\) \(what a Llama "
                                         r"converts to\), got"):
        conversion.convert(tmp_path / "no-such-source", tmp_path / "out", arch)
    assert not (tmp_path / "out").exists()


def test_bad_out_dir_and_odd_heads_are_refused_before_writing(llama_dir, tmp_path):
    source, _ = llama_dir
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="out_dir must be a new or empty folder, .* is not empty"):
        conversion.convert(source, tmp_path / "full", "diffllama-v2")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    odd = tmp_path / "odd"
    hf_llama(1, num_attention_heads=3, hidden_size=24).save_pretrained(odd)
    with pytest.raises(ValueError, match="needs an even num_attention_heads; .* has 3: convert to .diffllama-v2. instead"):
        conversion.convert(odd, tmp_path / "new" / "v1", "diffllama")
    assert not (tmp_path / "new").exists()
    conversion.convert(odd, tmp_path / "new" / "v2", "diffllama-v2")  # V2 needs no pairs


def test_a_failed_write_leaves_no_folder(llama_dir, tmp_path, monkeypatch):
    """A failure while the folder is built removes it and the folders above it that convert created."""
    source, _ = llama_dir

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conversion.shutil, "copy2", fail)
    with pytest.raises(OSError, match="disk full"):
        conversion.convert(source, tmp_path / "a" / "b" / "out", "diffllama-v2")
    assert not (tmp_path / "a").exists()
