"""4-D attention masks (issue 14): every model class's forward and generate refuse them with one message that says
they are not supported and names the supported forms, before the decoder runs."""

from __future__ import annotations

import pytest
import torch

import diffllama
from conftest import tiny_config

CLASSES = ["DiffLlamaModel", "DiffLlamaForCausalLM", "DiffLlamaForSequenceClassification",
           "DiffLlamaForTokenClassification", "DiffLlamaForQuestionAnswering"]
MESSAGE = (r"a 4-D attention_mask \(batch, 1, query, key\) is not supported: pass attention_mask as None .* or a "
           r"2-D \(batch, past \+ seq\) tensor of 0 \(padding\) and 1 \(real token\)")
IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
# transformers' own form: (B, 1, S, S), 0 where attended (float) or True (bool)
MASKS = {"float": torch.zeros(2, 1, 4, 4), "bool": torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("cls", CLASSES)
def test_forward_refuses_4d_masks(cls, mask):
    model = getattr(diffllama, cls)(tiny_config(pad_token_id=0)).eval()
    layers = []
    model.base_model.layers[0].register_forward_pre_hook(lambda *args: layers.append(1))
    with pytest.raises(ValueError, match=MESSAGE):
        model(IDS, attention_mask=MASKS[mask])
    assert layers == []


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_generate_refuses_4d_masks(static):
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=MESSAGE):
        model.generate(IDS, MASKS["float"], max_new_tokens=2, static_cache=static)
    embeds = model.model.embed_tokens(IDS).detach()
    with pytest.raises(ValueError, match=MESSAGE):
        model.generate(attention_mask=MASKS["bool"], inputs_embeds=embeds, max_new_tokens=2)
