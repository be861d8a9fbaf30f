"""--document-mask (issue 14): packed training rows split at the EOS separators train each document as if alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import tiny_config
from diffllama import DiffLlamaForCausalLM
from diffllama.train.config import resolve_config
from diffllama.train.loop import TrainModule, separator_documents

EOS = 2


def test_separator_ends_its_document():
    ids = torch.tensor([[5, EOS, 7, 8, EOS, EOS, 9], [EOS, 4, 4, 4, 4, 4, EOS]])
    assert separator_documents(ids, EOS).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert separator_documents(ids, EOS).dtype == torch.int32


def test_document_mask_loss_is_the_sum_of_the_documents_alone():
    """Each document's tokens attend to that document only, with positions from 0 (the explicit choice of
    TrainModule), and every target counts as before (an EOS predicts the next document's first token)."""
    torch.manual_seed(0)
    model = DiffLlamaForCausalLM(tiny_config(num_key_value_heads=2, attn_implementation="sdpa")).double()
    ids = torch.tensor([[5, 6, 7, EOS, 9, 10, 11, 12, 13, EOS, 14, 15, 16],
                        [20, 21, EOS, 22, 23, 24, 25, 26, 27, 28, 29, EOS, 30]])
    targets = torch.roll(ids, -1, dims=1)
    masked = TrainModule(model, document_separator=EOS)(ids, targets, 1.0)
    plain = TrainModule(model)(ids, targets, 1.0)
    expected = torch.zeros((), dtype=torch.float64)
    for row in range(2):
        ends = [i + 1 for i, t in enumerate(ids[row].tolist()) if t == EOS]
        for start, end in zip([0] + ends, ends + [ids.shape[1]]):
            logits = model(ids[row:row + 1, start:end], use_cache=False).logits[0]  # positions 0.., alone
            expected = expected + F.cross_entropy(logits.float(), targets[row, start:end], reduction="sum")
    assert abs(masked.item() - expected.item()) < 1e-6 * expected.item()  # the loss sums in float32
    assert abs(plain.item() - masked.item()) > 1e-2  # the mask changes the loss (context across documents)


def test_document_mask_is_a_config_field_and_a_flag():
    assert resolve_config("tiny").document_mask is False
    cfg = resolve_config("tiny", overrides={"document_mask": True})
    assert cfg.document_mask is True and "document_mask: true" in cfg.to_yaml()
    import pytest

    with pytest.raises(ValueError, match="document_mask must be true or false"):
        resolve_config("tiny", overrides={"document_mask": "yes"})
