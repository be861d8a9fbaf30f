"""diffllama.train.resources: the training memory estimate, the refusal before a run, the bf16-on-CPU warning."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from diffllama.modeling import DiffLlamaForCausalLM
from diffllama.train import resources


@pytest.mark.parametrize("tied", [True, False])
def test_estimate_counts_the_parameters_of_the_model(tied):
    config = tiny_config(num_key_value_heads=2, tie_word_embeddings=tied)
    n = sum(p.numel() for p in DiffLlamaForCausalLM(config).parameters())  # tied weights are counted once
    estimate = resources.estimate_training_memory(config, batch_size=2, seq_len=8, quadratic_attention=False)
    assert estimate.parameters == 4 * n and estimate.optimizer == 12 * n


def test_estimate_grows_with_the_attention_scores_and_shrinks_with_checkpointing():
    config = tiny_config()
    b, s = 3, 50
    plain = resources.estimate_training_memory(config, batch_size=b, seq_len=s, quadratic_attention=False)
    quadratic = resources.estimate_training_memory(config, batch_size=b, seq_len=s, quadratic_attention=True)
    scores = 2 * 4 * b * config.num_attention_heads * s * s * config.num_hidden_layers
    assert quadratic.activations - plain.activations == scores
    checkpointed = resources.estimate_training_memory(config, batch_size=b, seq_len=s, quadratic_attention=False,
                                                      activation_checkpointing=True)
    assert checkpointed.activations < plain.activations
    bf16 = resources.estimate_training_memory(config, batch_size=b, seq_len=s, quadratic_attention=False,
                                              activation_dtype=torch.bfloat16)
    logits = 3 * 4 * b * s * config.vocab_size
    assert (bf16.activations - logits) * 2 == plain.activations - logits
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        resources.estimate_training_memory(config, batch_size=1, seq_len=0, quadratic_attention=False)


def test_check_fits_refuses_with_the_estimate(monkeypatch):
    estimate = resources.MemoryEstimate(parameters=10**9, optimizer=3 * 10**9, activations=20 * 10**9)
    monkeypatch.setattr(resources, "free_memory", lambda device: 8 * 10**9)
    with pytest.raises(MemoryError, match=re.escape("needs about 24.0 GB (parameters 1.0 GB, gradients + "
                                                    "optimizer 3.0 GB, activations 20.0 GB), more than the 8.0 GB "
                                                    "of free RAM on cpu: lower it")):
        resources.check_fits(estimate, torch.device("cpu"), "lower it")
    monkeypatch.setattr(resources, "free_memory", lambda device: None)  # unknown: no refusal
    resources.check_fits(estimate, torch.device("cpu"), "lower it")


def test_free_memory_is_positive_and_below_the_physical_memory():
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < resources.free_memory(torch.device("cpu")) <= physical
    assert resources.free_memory(torch.device("meta")) is None


def test_bf16_warning_only_on_a_cpu_without_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="about 30x slower than float32"):
        resources.warn_slow_bf16(cpu, torch.bfloat16, "--dtype bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resources.warn_slow_bf16(cpu, torch.float32, "--dtype float32")
        resources.warn_slow_bf16(cuda, "bfloat16", "--dtype bfloat16")
        monkeypatch.setattr(resources, "cpu_has_bf16", lambda: True)
        resources.warn_slow_bf16(cpu, "bfloat16", "--dtype bfloat16")


def test_cpu_has_bf16_agrees_with_the_cpuinfo_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        assert resources.cpu_has_bf16() is None
        return
    words = set(cpuinfo.read_text().split())
    assert resources.cpu_has_bf16() == bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def test_trainer_warns_about_bf16_and_refuses_what_cannot_fit_before_any_data_work(tmp_path, monkeypatch):
    from diffllama.train.loop import Trainer
    from train_utils import micro_config, small_corpus

    corpus = small_corpus(tmp_path / "corpus")
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(resources, "free_memory", lambda device: 10**6)  # 1 MB: nothing fits
    with pytest.warns(UserWarning, match="dtype bfloat16 on this CPU"), \
            pytest.raises(MemoryError, match=r"needs about .* activations .* lower --seq-len or --batch-size"):
        Trainer(micro_config(corpus, tmp_path / "cache", dtype="bfloat16"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "cache").exists()  # refused before the tokenizer and the shards were made
