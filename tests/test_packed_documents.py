"""Packed rows (several documents in one row, issue 14): each document's logits and gradients equal those of the
document run alone, whichever way the documents are given (position_ids restarts as transformers'
``DataCollatorWithFlattening`` makes them, ``document_ids``, ``cu_seq_lens_q/k``), in eager and sdpa, MHA/GQA/MQA;
transformers 5 agrees on the same packed input; bad packing arguments are refused by name.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import diffllama
from conftest import hf_model, tiny_config
from diffllama import masks
from diffllama.masks import document_position_ids

# Two rows of 23 tokens: 3 and 5 documents, all of odd lengths.
LENGTHS = [[7, 5, 11], [3, 9, 5, 5, 1]]
SEQ = 23


def packed_arguments(form: str) -> dict:
    """The packing keyword arguments of ``form`` for :data:`LENGTHS`."""
    if form == "position_ids":
        return {"position_ids": torch.tensor([[i for n in row for i in range(n)] for row in LENGTHS])}
    if form == "document_ids":  # any non-decreasing values, not only 0, 1, 2, ...
        return {"document_ids": torch.tensor([[3 * d + 5 for d, n in enumerate(row) for _ in range(n)]
                                              for row in LENGTHS])}
    ends = list(itertools.accumulate(n for row in LENGTHS for n in row))
    cu = torch.tensor([0] + ends, dtype=torch.int32)
    longest = max(n for row in LENGTHS for n in row)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def documents(x: torch.Tensor):
    """(row, start, end) of every document, and the slice of ``x`` (B, S, ...) it covers."""
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            yield row, start, start + n, x[row:row + 1, start:start + n]
            start += n


def float64_model(implementation: str, kv_heads: int, cls=diffllama.DiffLlamaForCausalLM):
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=kv_heads, attn_implementation=implementation, num_hidden_layers=2)
    return cls(config).double().eval()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_each_document_equals_the_document_alone_with_gradients(kv_heads, implementation):
    """Packed as transformers' flattening collator packs (position_ids restarts, no mask); the other forms give
    the same documents (test_the_three_forms_agree)."""
    model = float64_model(implementation, kv_heads)
    gen = torch.Generator().manual_seed(2)
    embeds = torch.randn(2, SEQ, model.config.hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, SEQ, model.config.vocab_size, generator=gen, dtype=torch.float64)
    out = model(inputs_embeds=embeds, use_cache=False, **packed_arguments("position_ids"))
    (out.logits * weights).sum().backward()
    # every parameter but the token embedding (inputs_embeds go in) gets a gradient
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(packed_grads) == len(list(model.parameters())) - 1
    model.zero_grad()

    alone_embeds = embeds.detach().clone().requires_grad_(True)
    for row, start, end, piece in documents(alone_embeds):
        logits = model(inputs_embeds=piece, use_cache=False).logits  # positions 0.., as alone
        assert (logits - out.logits[row:row + 1, start:end]).abs().max() < 1e-10
        (logits * weights[row:row + 1, start:end]).sum().backward()
    assert (embeds.grad - alone_embeds.grad).abs().max() < 1e-10
    # λ's sums and exps run in float32 by the spec (DESIGN.md §1 step 5), so the λ vectors' gradients pass
    # through float32: equal at its resolution, relative to their largest; every other gradient to 1e-10.
    lambda_scale = max(grad.abs().max() for name, grad in packed_grads.items() if "lambda_" in name)
    for name, grad in packed_grads.items():
        error = (grad - model.get_parameter(name).grad).abs().max()
        assert error < (1e-6 * lambda_scale if "lambda_" in name else 1e-10), name


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_the_three_forms_agree(kv_heads):
    """position_ids restarts, document_ids and cu_seq_lens describe the same documents; with document_ids or
    cu_seq_lens alone the positions restart in each document."""
    model = float64_model("sdpa", kv_heads)
    ids = torch.randint(1, 96, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids, use_cache=False, **packed_arguments("position_ids")).logits
        for form in ("document_ids", "cu_seq_lens"):
            assert (model(ids, **packed_arguments(form)).logits - reference).abs().max() < 1e-10, form
        row, start, end, piece = list(documents(ids))[-2]
        alone = model(piece, use_cache=False).logits
        assert (reference[row:row + 1, start:end] - alone).abs().max() < 1e-10


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_rows_match_transformers(implementation):
    """transformers 5 masks documents from position_ids restarts when no cache is built (use_cache=False)."""
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=2, attn_implementation=implementation)
    reference = hf_model("DiffLlamaForCausalLM", config)  # sdpa: its eager softmax is float32 (test_modeling)
    ours = diffllama.DiffLlamaForCausalLM(config).double().eval()
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(1, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    positions = packed_arguments("position_ids")["position_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        out = ours(input_ids=ids, position_ids=positions, use_cache=False)
        assert (out.logits - expected).abs().max() < 1e-10
        assert out.past_key_values is None
        # With a cache built (use_cache unset: the config's True) transformers reads position_ids as positions only.
        cached = reference(input_ids=ids, position_ids=positions).logits
        assert (cached - expected).abs().max() > 1e-3  # the documents do see each other there
        assert (ours(input_ids=ids, position_ids=positions).logits - cached).abs().max() < 1e-10
        explicit = ours(input_ids=ids, **packed_arguments("cu_seq_lens")).logits  # transformers' collator kwargs
        assert (explicit - expected).abs().max() < 1e-10


def test_transformers_collator_output_goes_straight_in():
    from transformers import DataCollatorWithFlattening

    model = float64_model("sdpa", 2)
    features = [{"input_ids": list(range(1 + i, 1 + i + n))} for i, n in enumerate([7, 5, 11])]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    with torch.no_grad():
        packed = model(**batch).logits
        start = 0
        for feature in features:
            n = len(feature["input_ids"])
            alone = model(torch.tensor([feature["input_ids"]]), use_cache=False).logits
            assert (packed[:, start:start + n] - alone).abs().max() < 1e-10
            start += n


def test_padding_mask_with_explicit_documents_is_their_intersection():
    """Right-padded packed rows: the padding is no key, each document still equals the document alone."""
    lengths = [[4, 3], [5]]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    for implementation in ("eager", "sdpa"):
        model = float64_model(implementation, 2)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, document_ids=docs).logits
            for row, start, n in ((0, 0, 4), (0, 4, 3), (1, 0, 5)):
                alone = model(ids[row:row + 1, start:start + n], use_cache=False).logits
                assert (logits[row:row + 1, start:start + n] - alone).abs().max() < 1e-10
    assert lengths  # the layout above, for the reader


@pytest.mark.parametrize("cls_name", ["DiffLlamaForTokenClassification", "DiffLlamaForQuestionAnswering",
                                      "DiffLlamaModel"])
def test_every_class_passes_packing_to_the_decoder(cls_name):
    model = float64_model("sdpa", 2, getattr(diffllama, cls_name))
    ids = torch.randint(1, 96, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, **packed_arguments("document_ids"))
        last = out.hidden_states[-1]
        for row, start, end, piece in documents(ids):
            alone = model(piece, output_hidden_states=True, use_cache=False).hidden_states[-1]
            assert (last[row:row + 1, start:end] - alone).abs().max() < 1e-10


def test_document_position_ids_restart_in_each_document():
    docs = torch.tensor([[0, 0, 0, 4, 4, 9], [2, 2, 2, 2, 2, 2]])
    assert document_position_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_contiguous_position_ids_keep_the_fast_causal_path(monkeypatch):
    """An offset without restarts is one document (as transformers); the mask stays plain causal."""
    model = float64_model("sdpa", 2)
    seen = []
    monkeypatch.setattr(masks, "build_mask", lambda *a, _f=masks.build_mask: seen.append(_f(*a)) or seen[-1])
    with torch.no_grad():
        model(torch.ones(2, 5, dtype=torch.long), position_ids=torch.arange(3, 8)[None], use_cache=False)
    assert seen[0].document_ids is None and seen[0].plain_causal


def test_bad_packing_arguments_are_refused_by_name():
    model = float64_model("sdpa", 2)
    ids = torch.ones(2, 6, dtype=torch.long)
    cu = torch.tensor([0, 2, 6, 12], dtype=torch.int32)
    cases = [
        (dict(document_ids=torch.tensor([[0, 0, 1, 1, 0, 0]] * 2)), ValueError, "non-decreasing"),
        (dict(document_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"document_ids must have shape \(batch=2, seq=6\)"),
        (dict(document_ids=torch.zeros(2, 6)), TypeError, "document_ids must be an integer tensor"),
        (dict(cu_seq_lens_q=torch.tensor([1, 6, 12])), ValueError, "from 0 to batch x seq = 12"),
        (dict(cu_seq_lens_q=torch.tensor([0, 6, 11])), ValueError, "from 0 to batch x seq = 12"),
        (dict(cu_seq_lens_q=torch.tensor([0, 4, 4, 12])), ValueError, "rise strictly"),
        (dict(cu_seq_lens_q=torch.tensor([0, 4, 12])), ValueError, "cannot span two rows, but 6 is missing"),
        (dict(cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6, 12])), ValueError, "must be equal"),
        (dict(cu_seq_lens_q=cu.view(1, -1)), ValueError, "cu_seq_lens_q must be a 1-D tensor"),
        (dict(cu_seq_lens_q=cu.float()), TypeError, "cu_seq_lens_q must be an integer tensor"),
        (dict(cu_seq_lens_q=cu, max_length_q=4), ValueError, "max_length_q must be the longest document's length 6"),
        (dict(max_length_k=6), ValueError, "go with cu_seq_lens_q/cu_seq_lens_k"),
        (dict(cu_seq_lens_q=cu, document_ids=torch.zeros(2, 6, dtype=torch.long)), ValueError, "not both"),
        (dict(document_ids=torch.zeros(2, 6, dtype=torch.long), use_cache=True), ValueError, "use_cache=False"),
        (dict(document_ids=torch.zeros(2, 6, dtype=torch.long), past_key_values=diffllama.DynamicCache()),
         ValueError, "past_key_values"),
        (dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), TypeError, "seq_idx"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model(ids, **kwargs)
