"""diffllama's models inside transformers' training tools: the Trainer's loss with gradient accumulation, and
reentrant activation checkpointing with frozen embeddings (as LoRA leaves them)."""

from __future__ import annotations

import pytest
import torch

import diffllama
from conftest import tiny_config

transformers = pytest.importorskip("transformers")


def _rows(n: int = 8, length: int = 12):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 96, (length,), generator=gen)
        labels = ids.clone()
        labels[: 1 + 2 * i % 9] = -100  # a different number of counted tokens in each row
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def _train(model, out):
    args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=4, max_steps=2, learning_rate=1e-2,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          seed=0, lr_scheduler_type="constant", warmup_steps=0)
    transformers.Trainer(model=model, args=args, train_dataset=_rows()).train()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_trainer_with_gradient_accumulation_matches_transformers(tmp_path):
    """Was 3e-2 apart: without ``accepts_loss_kwargs`` the Trainer never passed num_items_in_batch, so each
    micro-batch's mean was averaged instead of transformers' sum over the accumulated batch's tokens."""
    torch.manual_seed(0)
    diffllama.DiffLlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "start")
    ours = _train(diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "start"), tmp_path / "a")
    theirs = _train(transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path / "start"), tmp_path / "b")
    start = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "start").state_dict()
    moved = max((theirs[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the runs trained
    assert max((ours[k] - theirs[k]).abs().max().item() for k in start) < 1e-4


def test_reentrant_checkpointing_trains_layers_under_frozen_embeddings():
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    ids = torch.randint(1, 96, (2, 8))
    model(ids, labels=ids).loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.inference_mode():  # generation is unaffected by the hook
        assert model.generate(ids, max_new_tokens=2).shape == (2, 10)


@pytest.mark.parametrize("tied", [False, True])
def test_num_parameters_takes_transformers_arguments_in_their_order(tied):
    """Was num_parameters(exclude_embeddings): a positional True meant only_trainable in transformers."""
    from conftest import hf_model

    config = tiny_config(tie_word_embeddings=tied)
    ours, theirs = diffllama.DiffLlamaForCausalLM(config), hf_model("DiffLlamaForCausalLM", config)
    for model in (ours, theirs):
        model.get_input_embeddings().weight.requires_grad_(False)
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    for args in [(), (True,), (False, True), (True, True)]:
        assert ours.num_parameters(*args) == theirs.num_parameters(*args), args
