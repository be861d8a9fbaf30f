"""diffllama.integrations.transformers.apply: transformers' own DiffLlama models on diffllama's attention give
transformers' sdpa results (float64, CPU) and keep working under Trainer, PEFT, checkpointing, generate, compile."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_config, tiny_config

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("diffllama.integrations.transformers")

CLASSES = ["DiffLlamaModel", "DiffLlamaForCausalLM", "DiffLlamaForSequenceClassification",
           "DiffLlamaForTokenClassification", "DiffLlamaForQuestionAnswering"]


def _pair(cls_name: str, **overrides):
    """(transformers' model on its sdpa path, a deep copy patched by apply), float64, same weights."""
    torch.manual_seed(0)
    config = hf_config(tiny_config(pad_token_id=0, num_labels=3, **overrides))
    reference = getattr(transformers, cls_name)(config).double().eval()  # no dropout in the heads
    patched = integration.apply(copy.deepcopy(reference))
    return reference, patched


def _ids(pad_left: bool = True):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    if pad_left:
        ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


def _first_output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_outputs_and_gradients_equal_transformers_sdpa(cls_name, padded):
    reference, patched = _pair(cls_name)
    ids, mask = _ids(padded)
    results = []
    for model in (reference, patched):
        out = _first_output(model(input_ids=ids, attention_mask=mask))
        real = mask.bool() if out.dim() == 3 else torch.ones(out.shape[0], dtype=torch.bool)
        loss = (out[real] ** 2).sum() if out.dim() == 3 else (out ** 2).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach()[real], grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert type(patched.get_submodule(_attn_path(patched))).__name__ == "PatchedDiffLlamaAttention"
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-11, msg=name)


def _attn_path(model) -> str:
    return next(n for n, m in model.named_modules() if n.endswith("self_attn"))


def test_loss_and_state_dict_unchanged_gqa():
    reference, patched = _pair("DiffLlamaForCausalLM", num_key_value_heads=2)
    assert list(reference.state_dict()) == list(patched.state_dict())
    assert [n for n, _ in reference.named_modules()] == [n for n, _ in patched.named_modules()]
    ids, _ = _ids(False)
    a, b = reference(input_ids=ids, labels=ids).loss, patched(input_ids=ids, labels=ids).loss
    assert abs(a.item() - b.item()) < 1e-12 and a.item() > 1


def test_a_model_built_for_eager_gets_sdpa_masks():
    """apply() switches the model to transformers' sdpa masks (the eager path's additive float mask also works,
    but transformers' own eager attention is the float32-softmax reference, not the sdpa one compared here)."""
    reference, _ = _pair("DiffLlamaForCausalLM")
    eager = copy.deepcopy(reference)
    eager.set_attn_implementation("eager")
    patched = integration.apply(eager)
    assert patched.config._attn_implementation == "sdpa"
    ids, mask = _ids(True)
    real = mask.bool()
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).logits[real],
                               reference(input_ids=ids, attention_mask=mask).logits[real], rtol=1e-10, atol=1e-12)


def test_generate_with_cache_equals_transformers():
    reference, patched = _pair("DiffLlamaForCausalLM")
    ids, mask = _ids(True)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **kwargs)
    assert torch.equal(patched.generate(ids, **kwargs), expected)
    static = patched.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    reference, patched = _pair("DiffLlamaForCausalLM")
    patched.gradient_checkpointing_enable()
    reference.train(), patched.train()
    ids, _ = _ids(False)
    for model in (reference, patched):
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, a), b in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.slow  # 23 s of compiling
def test_torch_compile_matches_eager_call():
    reference, patched = _pair("DiffLlamaForCausalLM")
    ids, _ = _ids(False)
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(input_ids=ids).logits, reference(input_ids=ids).logits,
                               rtol=1e-10, atol=1e-12)


def test_trainer_and_peft_lora_train_the_patched_model(tmp_path):
    peft = pytest.importorskip("peft")
    reference, patched = _pair("DiffLlamaForCausalLM")
    gen = torch.Generator().manual_seed(2)
    rows = [{"input_ids": (ids := torch.randint(1, 96, (10,), generator=gen).tolist()), "labels": ids}
            for _ in range(4)]
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trained = []
    for model in (reference, patched):
        torch.manual_seed(3)  # the same LoRA A for both models
        model = peft.get_peft_model(model, lora)
        for name, p in model.named_parameters():  # LoRA's B starts at 0: give it values so A's gradient is real
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                              learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                              logging_strategy="no", seed=0, lr_scheduler_type="constant")
        transformers.Trainer(model=model, args=args, train_dataset=rows).train()
        trained.append({n: p.detach() for n, p in model.named_parameters() if "lora_" in n})
    assert trained[0].keys() == trained[1].keys() and len(trained[0]) == 4 * 3 * 2
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=1e-8, atol=1e-10, msg=name)
    assert type(patched.get_submodule(_attn_path(patched))).__name__ == "PatchedDiffLlamaAttention"


def test_apply_refuses_what_it_cannot_patch():
    with pytest.raises(TypeError, match="model must be"):
        integration.apply("model")
    with pytest.raises(ValueError, match="no transformers DiffLlamaAttention"):
        integration.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        integration.apply(_pair("DiffLlamaModel")[1], backend="fast")
