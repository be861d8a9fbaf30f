"""The task heads refuse bad label arguments before running the decoder, and ``from_config`` takes dtype names.

Each refusal test replaces the decoder's forward with one that fails the test: the error must come first.
"""

from __future__ import annotations

import pytest
import torch

import diffllama
from conftest import tiny_config

IDS = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(3))


def _no_decoder(monkeypatch, head):
    def forward(*args, **kwargs):
        raise AssertionError("the decoder ran before the arguments were checked")

    monkeypatch.setattr(head.base_model, "forward", forward)
    return head


CAUSAL_CASES = [
    (dict(input_ids=IDS, labels=IDS[:, :4]), ValueError, r"labels must have shape \(2, 5\), got \(2, 4\)"),
    (dict(inputs_embeds=torch.zeros(2, 5, 32), labels=IDS[:1]), ValueError, r"labels must have shape \(2, 5\)"),
    (dict(input_ids=IDS, labels=torch.full_like(IDS, 96)), ValueError,
     r"labels must lie in \[0, 96\) or be -100 \(ignored\), got 96"),
    (dict(input_ids=IDS, labels=IDS.float()), TypeError, "labels must be an integer tensor of dtype int64 or int32"),
    (dict(input_ids=IDS, labels=IDS, logits_to_keep=-1), ValueError, "logits_to_keep must be an int >= 0"),
    (dict(input_ids=IDS, labels=IDS, num_items_in_batch=0), ValueError, "num_items_in_batch must be None"),
    (dict(labels=IDS), ValueError, "pass exactly one of input_ids or inputs_embeds"),
    (dict(input_ids=IDS, labels=IDS.tolist()), TypeError, "labels must be a tensor, got list"),
]


@pytest.mark.parametrize("kwargs, error, match", CAUSAL_CASES)
def test_causal_lm_refuses_bad_arguments_before_the_decoder(monkeypatch, kwargs, error, match):
    model = _no_decoder(monkeypatch, diffllama.DiffLlamaForCausalLM(tiny_config()))
    with pytest.raises(error, match=match):
        model(**kwargs)


@pytest.mark.parametrize("config, kwargs, error, match", [
    (dict(pad_token_id=None), dict(input_ids=IDS), ValueError,
     "sequence classification of batch size > 1 needs config.pad_token_id"),
    (dict(pad_token_id=None), dict(inputs_embeds=torch.zeros(2, 5, 32)), ValueError, "needs config.pad_token_id"),
    (dict(), dict(input_ids=IDS, labels=torch.tensor([1, 7])), ValueError,
     r"labels must lie in \[0, 2\) or be -100 \(ignored\), got 7"),
    (dict(), dict(input_ids=IDS, labels=torch.tensor([1, 0, 1])), ValueError,
     r"labels for single_label_classification must have shape \(2,\) or \(2, 1\), got \(3,\)"),
    (dict(num_labels=3), dict(input_ids=IDS, labels=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     r"must have shape \(2,\) or \(2, 1\), got \(2, 3\)"),  # the shape given, not its flattening
    (dict(num_labels=3, problem_type="multi_label_classification"), dict(input_ids=IDS, labels=torch.ones(2)),
     ValueError, r"labels for multi_label_classification must have shape \(2, 3\), got \(2,\)"),
    (dict(num_labels=1), dict(input_ids=IDS, labels=torch.ones(3)), ValueError,
     r"labels for regression must have shape \(2,\) or \(2, 1\), got \(3,\)"),
    (dict(problem_type="single_label_classification"), dict(input_ids=IDS, labels=torch.ones(2)), TypeError,
     "labels must be an integer tensor"),
    (dict(), dict(input_ids=IDS, labels=[0, 1]), TypeError, "labels must be a tensor, got list"),
    (dict(), dict(input_ids=IDS, labels=torch.tensor([0, 1]), num_items_in_batch=-2.0), ValueError,
     "num_items_in_batch must be None, a number > 0 or a tensor, got -2.0"),
])
def test_sequence_classification_refuses_bad_arguments_before_the_decoder(monkeypatch, config, kwargs, error,
                                                                           match):
    model = _no_decoder(monkeypatch, diffllama.DiffLlamaForSequenceClassification(tiny_config(**config)))
    with pytest.raises(error, match=match):
        model(**kwargs)
    assert model.config.problem_type == config.get("problem_type")  # a refused call does not infer a type


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=IDS, labels=IDS[:, :3]), ValueError, r"labels must have shape \(2, 5\), got \(2, 3\)"),
    (dict(input_ids=IDS, labels=torch.full_like(IDS, 2)), ValueError, r"labels must lie in \[0, 2\)"),
    (dict(input_ids=IDS, labels=IDS.to(torch.int16)), TypeError, "labels must be an integer tensor"),
    (dict(input_ids=IDS, num_items_in_batch=True), ValueError, "num_items_in_batch must be None"),
])
def test_token_classification_refuses_bad_arguments_before_the_decoder(monkeypatch, kwargs, error, match):
    model = _no_decoder(monkeypatch, diffllama.DiffLlamaForTokenClassification(tiny_config()))
    with pytest.raises(error, match=match):
        model(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=IDS, start_positions=torch.tensor([1.0, 2.0]), end_positions=torch.tensor([1, 2])),
     r"start_positions must be an integer tensor of shape \(batch=2,\)"),
    (dict(input_ids=IDS, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([1j, 2j])),
     "end_positions must be an integer tensor"),
    (dict(start_positions=torch.tensor([1, 2])), "pass exactly one of input_ids or inputs_embeds"),
])
def test_question_answering_refuses_bad_arguments_before_the_decoder(monkeypatch, kwargs, match):
    model = _no_decoder(monkeypatch, diffllama.DiffLlamaForQuestionAnswering(tiny_config()))
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_sequence_classification_checks_num_items_in_batch_but_its_loss_ignores_it():
    model = diffllama.DiffLlamaForSequenceClassification(tiny_config()).eval()
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        plain = model(IDS, labels=labels).loss
        given = model(IDS, labels=labels, num_items_in_batch=7).loss
    assert plain.item() > 0
    assert torch.equal(plain, given)  # as transformers: ForSequenceClassificationLoss gets no num_items_in_batch
    assert model.config.problem_type == "single_label_classification"  # inferred once the loss is computed


# ---- from_config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("half", torch.float16),
                                         ("torch.float64", torch.float64), (torch.float16, torch.float16),
                                         (None, torch.float32)])
def test_from_config_takes_the_dtype_names_of_from_pretrained(name, dtype):
    config = tiny_config()
    torch.manual_seed(5)
    model = diffllama.DiffLlamaForCausalLM.from_config(config, dtype=name, device="cpu")
    torch.manual_seed(5)
    reference = diffllama.DiffLlamaForCausalLM(config)  # float32: from_config casts what it draws
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.dtype == dtype and model.device == torch.device("cpu")
    for (name_ours, ours), (name_ref, ref) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert name_ours == name_ref
        assert torch.equal(ours, ref.to(dtype)), name_ours


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="int8"), r"dtype must be one of \['bfloat16', 'double', 'float', .*got 'int8'"),
    (dict(dtype=torch.int64), "dtype must be one of .*got torch.int64"),
    (dict(dtype="auto"), "dtype must be one of .*got 'auto'"),  # no checkpoint to take a dtype from
    (dict(device="tpu0"), "device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'tpu0'"),
])
def test_from_config_refuses_a_bad_dtype_or_device_before_building(monkeypatch, kwargs, match):
    def build(self, config):
        raise AssertionError("the model was built before dtype and device were checked")

    monkeypatch.setattr(diffllama.DiffLlamaForCausalLM, "__init__", build)
    with pytest.raises(ValueError, match=match):
        diffllama.DiffLlamaForCausalLM.from_config(tiny_config(), **kwargs)
