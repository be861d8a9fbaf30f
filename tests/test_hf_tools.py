"""diffllama's models under the Hugging Face tools: PEFT with each task type, Trainer.save_model, AutoTokenizer's
padding side, unknown config.json keys, pipeline (through transformers' class + our attention), lm-eval's HFLM."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings

import pytest
import torch

import diffllama
from conftest import tiny_config
from test_tokenizer import make_bytelevel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SPECIAL = dict(vocab_size=400, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _lora(task_type: str):
    return peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _ids():
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids, mask


def test_peft_causal_lm_forward_generate_and_the_generation_hook():
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(**SPECIAL)).eval()
    ids, mask = _ids()
    base_logits = model(ids, attention_mask=mask).logits
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4)
    wrapped = peft.get_peft_model(model, _lora("CAUSAL_LM"))
    # LoRA's B starts at zero, so the wrapped model computes what the base model does
    torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask).logits, base_logits)
    assert torch.equal(wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4), expected)
    # the hook, driven by hand as transformers' loop drives it, gives generate's greedy tokens
    seq, cache = ids, None
    for _ in range(4):
        full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        inputs = model.prepare_inputs_for_generation(seq, past_key_values=cache, attention_mask=full_mask)
        out = model(**inputs)
        cache = out.past_key_values
        seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, expected)
    loss = wrapped(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("task_type, cls, labels", [
    ("SEQ_CLS", diffllama.DiffLlamaForSequenceClassification, torch.tensor([0, 2])),
    ("TOKEN_CLS", diffllama.DiffLlamaForTokenClassification, torch.zeros(2, 9, dtype=torch.long))])
def test_peft_classification_heads_train_lora_and_the_head(task_type, cls, labels):
    torch.manual_seed(0)
    model = cls(tiny_config(num_labels=3, **SPECIAL)).eval()
    ids, mask = _ids()
    base = model(ids, attention_mask=mask).logits
    wrapped = peft.get_peft_model(model, _lora(task_type))
    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, base)
    out.loss.backward()
    with_grad = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in with_grad) and any("score" in n for n in with_grad)
    assert not any("embed_tokens" in n for n in with_grad)


def test_trainer_save_model_folder_names_save_pretrained_and_that_reloads(tmp_path):
    """With a tokenizer, Trainer aligns the model's special tokens through ``model.generation_config.eos_token_id``
    (was: AttributeError, the generation config was a plain dict)."""
    model = _checkpoint(tmp_path / "start")
    model.train()
    rows = [{"input_ids": list(range(3, 13)), "labels": list(range(3, 13))}] * 2
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[],
                                          save_strategy="no", use_cpu=True, per_device_train_batch_size=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "start"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    assert model.generation_config.eos_token_id in (2, [2]) and model.generation_config["eos_token_id"] in (2, [2])
    trainer.save_model(str(tmp_path / "saved"))
    with pytest.raises(FileNotFoundError, match=r"Trainer .*model\.save_pretrained\(folder\)"):
        diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "saved")
    trainer.model.save_pretrained(tmp_path / "good")
    again = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "good")
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_diffllama_trainer_saves_folders_that_reload_and_resume(tmp_path, tied):
    """DiffLlamaTrainer: save_model and each checkpoint hold config.json + weights that from_pretrained (ours and,
    for V1, transformers' Auto class) load with the trained logits; a tied head is left out and resuming works."""
    from diffllama.integrations.transformers import DiffLlamaTrainer

    model = _checkpoint(tmp_path / "start")
    model.config.tie_word_embeddings = tied
    model.tie_weights()
    rows = [{"input_ids": list(range(3, 13)), "labels": list(range(3, 13))}] * 2
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, report_to=[],
                                          save_strategy="steps", save_steps=1, use_cpu=True,
                                          per_device_train_batch_size=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "start"))
    trainer = DiffLlamaTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = model.eval()(ids).logits
    for folder in (tmp_path / "saved", tmp_path / "run" / "checkpoint-2"):
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "training_args.bin"} <= {p.name for p in folder.iterdir()}
        again = diffllama.DiffLlamaForCausalLM.from_pretrained(folder)
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32)
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    resumed = DiffLlamaTrainer(model=model.train(), args=args.__class__(**{**args.to_dict(), "max_steps": 3}),
                               train_dataset=rows, processing_class=tokenizer)
    assert resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")).global_step == 3


def test_saved_tokenizer_makes_autotokenizer_pad_left(tmp_path):
    make_bytelevel().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["padding_side"] == "left"
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    batch = hf(["a b c d e", "a"], padding=True, return_tensors="pt")
    assert hf.padding_side == "left"
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    model = diffllama.DiffLlamaForCausalLM(tiny_config(**SPECIAL))
    assert model.generate(**batch, max_new_tokens=2).shape[1] == batch["input_ids"].shape[1] + 2


def test_unknown_config_keys_survive_our_load_save_and_transformers(tmp_path):
    diffllama.DiffLlamaForCausalLM(tiny_config(**SPECIAL)).save_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "config.json").read_text())
    data.update(my_key=7, nested={"x": [1, 2]})
    (tmp_path / "a" / "config.json").write_text(json.dumps(data))
    for cls, kwargs in ((diffllama.DiffLlamaForCausalLM, {}), (diffllama.DiffLlamaForCausalLM, {"dtype": "float64"}),
                        (diffllama.DiffLlamaForSequenceClassification, {"num_labels": 3})):
        # a new classification head warns that score.weight is newly initialised; the others load silently
        with pytest.warns(UserWarning, match="score.weight") if "num_labels" in kwargs else _no_warning():
            model = cls.from_pretrained(tmp_path / "a", **kwargs)
        model.save_pretrained(tmp_path / "b")
        saved = json.loads((tmp_path / "b" / "config.json").read_text())
        assert (saved["my_key"], saved["nested"]) == (7, {"x": [1, 2]})
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    hf.save_pretrained(str(tmp_path / "c"))
    model = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "c")
    assert (model.config.extra["my_key"], model.config.extra["nested"]) == (7, {"x": [1, 2]})


@contextlib.contextmanager
def _no_warning():
    """Any warning inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(**SPECIAL)).eval()
    model.save_pretrained(tmp_path)
    make_bytelevel().save_pretrained(tmp_path)
    return model


def test_pipeline_on_our_checkpoint_through_transformers_class_and_our_attention(tmp_path):
    """pipeline() needs a transformers PreTrainedModel: the README's recipe loads our checkpoint with
    transformers' class and puts diffllama's attention in it; greedy text equals our generate's."""
    from diffllama.integrations.transformers import apply

    ours = _checkpoint(tmp_path)
    hf_model = apply(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    generator = transformers.pipeline("text-generation", model=hf_model, tokenizer=tokenizer)
    text = generator("a b c", max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    prompt = tokenizer("a b c", return_tensors="pt")
    expected = ours.generate(**prompt, max_new_tokens=5)[0, prompt["input_ids"].shape[1]:]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_lm_eval_hflm_warns_for_our_model_only_what_it_warns_for_transformers(tmp_path, caplog):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    ours = _checkpoint(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = []
    for model in (ours, transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))):
        caplog.clear()
        with caplog.at_level(logging.WARNING), _no_warning():
            lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
        messages.append([r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING])
        assert lm.backend == "causal"
    assert messages[0] == messages[1]


def test_save_pretrained_expands_the_home_folder_as_from_pretrained_does(tmp_path, monkeypatch):
    """The README's quick start saves to and loads from "~/diffllama-runs/...": saving used to make a folder
    literally named "~" in the current folder, which loading then did not find."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = diffllama.DiffLlamaForCausalLM(tiny_config(**SPECIAL))
    model.save_pretrained("~/runs/m")
    assert (tmp_path / "home" / "runs" / "m" / "config.json").is_file() and not (tmp_path / "~").exists()
    again = diffllama.DiffLlamaForCausalLM.from_pretrained("~/runs/m")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_generation_config_reads_and_writes_entries_as_attributes(tmp_path):
    model = _checkpoint(tmp_path)
    loaded = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path).generation_config
    assert loaded.eos_token_id == 2 == loaded["eos_token_id"] and loaded.temperature is None
    loaded.eos_token_id = [2, 5]  # as transformers' Trainer rewrites it
    assert loaded["eos_token_id"] == [2, 5] and loaded.to_dict() == dict(loaded)
    assert copy.deepcopy(loaded) == loaded and type(copy.deepcopy(loaded)) is type(loaded)
    assert model.generation_config == {}  # a built model's is empty until loaded or set
