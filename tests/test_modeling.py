"""Parity of every model class with transformers' DiffLlama, and with an independent float64 reference.

transformers' *sdpa* path is the reference: its eager path takes the softmax in float32 even for float64 inputs
and turns fully padded rows into NaN, so it cannot be held to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import diffllama
from conftest import hf_model, padded_batch, tiny_config

CLASSES = ["DiffLlamaModel", "DiffLlamaForCausalLM", "DiffLlamaForSequenceClassification",
           "DiffLlamaForQuestionAnswering", "DiffLlamaForTokenClassification"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def task_kwargs(cls_name: str, ids: torch.Tensor, config) -> dict:
    """The label arguments each class takes, with values that exercise its loss."""
    gen = torch.Generator().manual_seed(1)
    b, s = ids.shape
    if cls_name == "DiffLlamaForCausalLM":
        labels = ids.clone()
        labels[:, :2] = -100
        return {"labels": labels}
    if cls_name == "DiffLlamaForSequenceClassification":
        return {"labels": torch.randint(0, config.num_labels, (b,), generator=gen)}
    if cls_name == "DiffLlamaForTokenClassification":
        labels = torch.randint(0, config.num_labels, (b, s), generator=gen)
        labels[:, -1] = -100
        return {"labels": labels}
    if cls_name == "DiffLlamaForQuestionAnswering":
        return {"start_positions": torch.tensor([1, 3, 40][:b]), "end_positions": torch.tensor([2, 6, 5][:b])}
    return {}


def compared_outputs(out) -> dict[str, torch.Tensor]:
    fields = ("last_hidden_state", "logits", "start_logits", "end_logits", "loss")
    found = {f: getattr(out, f) for f in fields if getattr(out, f, None) is not None}
    for i, h in enumerate(out.hidden_states):
        found[f"hidden_states[{i}]"] = h
    return found


def load_same_weights(cls_name: str, config, dtype):
    reference = hf_model(cls_name, config, dtype)
    ours = getattr(diffllama, cls_name)(config).to(dtype)
    ours.load_state_dict(reference.state_dict())
    return ours.eval(), reference


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_parity_with_transformers(cls_name, dtype, implementation, padding, kv_heads):
    config = tiny_config(num_key_value_heads=kv_heads, attn_implementation=implementation)
    ours, reference = load_same_weights(cls_name, config, dtype)
    ids, mask = padded_batch(config.vocab_size, padding)
    kwargs = task_kwargs(cls_name, ids, config)
    with torch.no_grad():
        expected = compared_outputs(reference(ids, attention_mask=mask, output_hidden_states=True, **kwargs))
        got = compared_outputs(ours(ids, attention_mask=mask, output_hidden_states=True, **kwargs))
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert value.shape == expected[name].shape, name
        assert not value.isnan().any(), f"NaN in {name}"
        assert rel_err(value, expected[name]) < TOLERANCE[dtype], name


# ---- an independent float64 reference: loops over head pairs, written from the paper and DESIGN.md ---------------

def reference_forward(model: diffllama.DiffLlamaModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state (B, S, D) computed head pair by head pair with two explicit softmaxes (default RoPE)."""
    cfg = model.config
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b, s = ids.shape
    theta = cfg.rope_parameters["rope_theta"]
    # RoPE angles in float32, as transformers computes them whatever the model dtype (part of the checkpoint format).
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1).double() for f in (torch.cos, torch.sin))

    def rope(x):  # x (B, n, S, d)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def rms(x, weight=None):
        if weight is None:  # the per-head norm of the differential output: in the activation dtype
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        # The layer norms compute x·rsqrt(mean(x²) + eps) in float32 (DESIGN.md §1), as transformers does.
        y = x.float()
        return weight * (y * torch.rsqrt((y * y).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(x.dtype)

    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & mask.bool()[:, None, :]  # (B, S, S)
    x = model.embed_tokens.weight[ids]
    for layer_idx, layer in enumerate(model.layers):
        attn = layer.self_attn
        y = rms(x, layer.input_layernorm.weight)
        q = rope(attn.q_proj(y).view(b, s, h, d).transpose(1, 2))
        k = rope(attn.k_proj(y).view(b, s, kv, d).transpose(1, 2))
        v = attn.v_proj(y).view(b, s, kv, d).transpose(1, 2)
        k_h = torch.stack([k[:, j * kv // h] for j in range(h)], 1)  # head j reads KV head j // (H/KV)
        v_h = torch.stack([v[:, j * kv // h] for j in range(h)], 1)
        # λ's sums and exps in float32: part of the spec (DESIGN.md §1 step 5), as transformers does.
        exps = [torch.exp(torch.sum(a * b, dtype=torch.float32)).item()
                for a, b in ((attn.lambda_q1, attn.lambda_k1), (attn.lambda_q2, attn.lambda_k2))]
        lam = exps[0] - exps[1] + 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        pairs = []
        for i in range(h // 2):
            def softmax(j):
                scores = q[:, j] @ k_h[:, j].transpose(-1, -2) / math.sqrt(d)
                probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
                return probs.nan_to_num(0.0)  # rows with no visible key give zeros
            value = torch.cat((v_h[:, i], v_h[:, i + h // 2]), -1)  # (B, S, 2d)
            o = (softmax(i) - lam * softmax(i + h // 2)) @ value
            pairs.append((1 - (0.8 - 0.6 * math.exp(-0.3 * layer_idx))) * rms(o))
        x = x + attn.o_proj(torch.cat(pairs, -1))
        x = x + layer.mlp(rms(x, layer.post_attention_layernorm.weight))
    return rms(x, model.norm.weight)


@pytest.mark.parametrize("kv_heads", [4, 2, 1, 3], ids=["mha", "gqa", "mqa", "odd-kv3"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_independent_float64_reference(kv_heads, implementation, padding):
    heads = 6 if kv_heads == 3 else 4
    config = tiny_config(num_attention_heads=heads, hidden_size=48 if heads == 6 else 32, num_key_value_heads=kv_heads,
                         attn_implementation=implementation)
    model = diffllama.DiffLlamaModel(config).double().eval()
    ids, mask = padded_batch(config.vocab_size, padding)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).last_hidden_state
        expected = reference_forward(model, ids, mask)
    assert not got.isnan().any()
    assert rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("kv_heads", [4, 2, 1, 3], ids=["mha", "gqa", "mqa", "odd-kv3"])
def test_eager_and_sdpa_agree_on_outputs_and_gradients(kv_heads):
    heads = 6 if kv_heads == 3 else 4
    config = tiny_config(num_attention_heads=heads, hidden_size=48 if heads == 6 else 32, num_key_value_heads=kv_heads)
    model = diffllama.DiffLlamaForCausalLM(config).double()
    ids, mask = padded_batch(config.vocab_size, "left")
    results = {}
    for implementation in ("eager", "sdpa"):
        model.config.attn_implementation = implementation
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        results[implementation] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (logits_e, grads_e), (logits_s, grads_s) = results["eager"], results["sdpa"]
    assert rel_err(logits_s, logits_e) < 1e-10
    for name, grad in grads_e.items():
        assert not grad.isnan().any(), name
        assert rel_err(grads_s[name], grad) < 1e-9, name
    assert grads_e["model.layers.0.self_attn.lambda_q1"].abs().sum() > 0


def test_fully_padded_row_has_no_nan():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.tensor([[0, 0, 0, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    for implementation in ("eager", "sdpa"):
        model.config.attn_implementation = implementation
        out = model(ids, attention_mask=mask, labels=ids)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


# ---- behaviour of the forward arguments -----------------------------------------------------------------------

def test_logits_to_keep_and_inputs_embeds():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).double().eval()
    ids, mask = padded_batch(96, "left")
    full = model(ids, attention_mask=mask).logits
    assert model(ids, attention_mask=mask, logits_to_keep=1).logits.shape == (3, 1, 96)
    torch.testing.assert_close(model(ids, attention_mask=mask, logits_to_keep=3).logits, full[:, -3:])
    embeds = model.model.embed_tokens(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, full)
    kept = model(ids, attention_mask=mask, logits_to_keep=torch.tensor([0, 4])).logits
    torch.testing.assert_close(kept, full[:, [0, 4]])


def test_causal_lm_loss_is_shifted_cross_entropy():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).double().eval()
    ids = torch.randint(1, 96, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1].float(), labels[:, 1:]  # the loss is taken in float32, as transformers
    keep = targets != -100
    expected = -torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep].mean()
    assert abs(out.loss.item() - expected.item()) < 1e-6
    summed = model(ids, labels=labels, num_items_in_batch=4).loss
    assert abs(summed.item() - expected.item() * keep.sum().item() / 4) < 1e-5


@pytest.mark.parametrize("problem, labels", [
    ("regression", torch.tensor([0.5, -1.0, 2.0])),
    ("single_label_classification", torch.tensor([0, 2, 1])),
    ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
])
def test_sequence_classification_problem_types(problem, labels):
    n = 1 if problem == "regression" else 3
    config = tiny_config(id2label={i: f"L{i}" for i in range(n)})
    ours, reference = load_same_weights("DiffLlamaForSequenceClassification", config, torch.float64)
    ids, mask = padded_batch(96, "right")
    got = ours(ids, attention_mask=mask, labels=labels.double() if labels.is_floating_point() else labels)
    expected = reference(ids, attention_mask=mask, labels=labels.double() if labels.is_floating_point() else labels)
    assert ours.config.problem_type == problem
    assert abs(got.loss.item() - expected.loss.item()) < 1e-10


def test_output_attentions_eager():
    model = diffllama.DiffLlamaModel(tiny_config(attn_implementation="eager")).double().eval()
    ids, mask = padded_batch(96, "right")
    out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (3, 4, 11, 11)
    sums = out.attentions[0].sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (out.attentions[0][1, :, :, 9:] == 0).all()  # right-padded keys get no weight
    model.config.attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        model(ids, output_attentions=True)


def test_gradient_checkpointing_gives_same_gradients():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).double().train()
    ids = torch.randint(1, 96, (2, 8))
    grads = []
    for enabled in (False, True):
        model.gradient_checkpointing_enable() if enabled else model.gradient_checkpointing_disable()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_attention_dropout_shares_one_mask_per_head():
    config = tiny_config(attention_dropout=0.5)
    model = diffllama.DiffLlamaForCausalLM(config).double()
    ids = torch.randint(1, 96, (2, 8))
    model.eval()
    eval_logits = model(ids).logits
    model.config.attention_dropout = 0.0
    torch.testing.assert_close(model(ids).logits, eval_logits)  # dropout is inactive in eval mode
    model.config.attention_dropout = 0.5
    model.train()
    for implementation in ("eager", "sdpa"):
        model.config.attn_implementation = implementation
        logits = model(ids).logits
        assert torch.isfinite(logits).all() and (logits - eval_logits).abs().max() > 1e-3


def test_dropout_in_eager_drops_softmax_entries_shared_by_both_halves(monkeypatch):
    """With p > 0 the eager backend drops softmax entries (one mask per head) before the 2d-wide value product."""
    from diffllama.attention import AttentionMask
    from diffllama.attention.eager import attention

    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = AttentionMask(query_positions=torch.arange(5), key_padding=None, k_len=5, plain_causal=True)
    lam = torch.tensor(0.3, dtype=torch.float64)
    keep = (torch.rand(1, 2, 5, 5) >= 0.4).double() / 0.6
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p: x * keep)
    dropped, _ = attention(q, k, v, mask, scale=0.5, lambda_full=lam, dropout_p=0.4)
    _, probs = attention(q, k, v, mask, scale=0.5, lambda_full=lam, output_attentions=True)
    value = torch.cat((v[:, 0], v[:, 1]), -1)  # the pair's 2d-wide value
    probs = probs * keep
    expected = probs[:, 0] @ value - lam * (probs[:, 1] @ value)
    torch.testing.assert_close(dropped[:, :, 0], expected, rtol=1e-12, atol=1e-12)


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_bad_forward_inputs_raise_clear_errors():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 96, (2, 5))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=96\), got values in \[.*, 96\]"):
        model(torch.tensor([[1, 96]]))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch=2, past \+ seq=5\), got \(2, 4\)"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be a bool, integer or float"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=torch.full((2, 5), 0.5))
    with pytest.raises(TypeError, match="past_key_values must be None or a diffllama.cache DynamicCache"):
        model(ids, past_key_values=object())
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="inputs_embeds must be a floating tensor of shape"):
        model(inputs_embeds=torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\)"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 96\) or be -100 \(ignored\), got 500"):
        model(ids, labels=torch.full_like(ids, 500))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 \\(padding\\) and 1"):
        model(ids, attention_mask=torch.full_like(ids, 2))
    classifier = diffllama.DiffLlamaForSequenceClassification(tiny_config())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\) or be -100 \(ignored\), got 7"):
        classifier(ids, labels=torch.tensor([1, 7]))
    tagger = diffllama.DiffLlamaForTokenClassification(tiny_config())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        tagger(ids, labels=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(ids, position_ids=torch.arange(4)[None])
    classifier = diffllama.DiffLlamaForSequenceClassification(tiny_config(pad_token_id=None))
    with pytest.raises(ValueError, match="needs config.pad_token_id"):
        classifier(ids)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8, torch.bool, torch.float32],
                         ids=["uint8", "int16", "int8", "bool", "float32"])
@pytest.mark.parametrize("name", ["input_ids", "position_ids", "labels"])
def test_index_tensors_of_other_dtypes_are_refused_with_one_message(name, dtype):
    """uint8/int16 ids used to reach nn.Embedding's own RuntimeError; bool positions were read as 0/1."""
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 2, (2, 5))
    args = {"input_ids": ids, "position_ids": torch.arange(5)[None], "labels": ids}
    args[name] = args[name].to(dtype)
    with pytest.raises(TypeError, match=rf"^{name} must be an integer tensor of dtype int64 or int32, got {dtype}$"):
        model(**args)


@pytest.mark.parametrize("head", ["DiffLlamaForCausalLM", "DiffLlamaForSequenceClassification",
                                  "DiffLlamaForTokenClassification"])
def test_int32_ids_positions_and_labels_match_int64(head):
    """int32 labels used to fail in cross-entropy ("expected target dtype to be Long")."""
    model = getattr(diffllama, head)(tiny_config()).eval()
    ids = torch.randint(1, 2, (2, 5))
    labels = ids if head != "DiffLlamaForSequenceClassification" else torch.tensor([0, 1])
    positions = torch.arange(5)[None]
    expected = model(ids, position_ids=positions, labels=labels)
    got = model(ids.int(), position_ids=positions.int(), labels=labels.int())
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_sdpa_zero_padded_head_dim_is_exact():
    """The CUDA flash layout (q, k zero-padded to the 2d value width) gives the same attention as the plain call."""
    from diffllama.attention import pair_values
    from diffllama.attention.sdpa import pad_head_dim

    q = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    k, v2 = pair_values(k, v, 4)
    plain = F.scaled_dot_product_attention(q, k, v2, is_causal=True, scale=8 ** -0.5, enable_gqa=True)
    qp, kp = pad_head_dim(q, k, 16)
    padded = F.scaled_dot_product_attention(qp, kp, v2, is_causal=True, scale=8 ** -0.5, enable_gqa=True)
    torch.testing.assert_close(padded, plain, rtol=1e-13, atol=1e-13)


# ---- transformers' calling conventions ---------------------------------------------------------------------------

HEADS = ["DiffLlamaModel", "DiffLlamaForCausalLM", "DiffLlamaForSequenceClassification",
         "DiffLlamaForTokenClassification", "DiffLlamaForQuestionAnswering"]


@pytest.mark.parametrize("cls_name", HEADS)
def test_outputs_index_like_transformers_and_return_dict_false_gives_its_tuple(cls_name):
    """Keys, integer/str indexing, to_tuple and return_dict=False match transformers' ModelOutput (cache default
    from config.use_cache included), and the positional parameters come in transformers' order."""
    import inspect

    import transformers

    config = tiny_config(pad_token_id=0)
    torch.manual_seed(0)
    reference = hf_model(cls_name, config)
    ours = getattr(diffllama, cls_name)(config).double().eval()
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 96, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6], dtype=torch.float64)  # float 0/1 masks work, as there
    extra = {"labels": torch.randint(0, 2, (2,))} if "Sequence" in cls_name else {}
    with torch.no_grad():
        got, ref = ours(ids, attention_mask=mask, **extra), reference(ids, attention_mask=mask, **extra)
        got_tuple = ours(ids, attention_mask=mask, return_dict=False, **extra)
        ref_tuple = reference(ids, attention_mask=mask, return_dict=False, **extra)
    assert list(got.keys()) == list(ref.keys())
    assert len(got_tuple) == len(ref_tuple) == len(got)
    for key, a, b, c in zip(got.keys(), got.values(), ref.values(), got_tuple):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(c, a, rtol=0, atol=0)
            assert got[key] is a and got[list(got.keys()).index(key)] is a
        else:  # the caches: each library's own class, holding the same keys and values
            assert key == "past_key_values" and a.get_seq_length() == b.get_seq_length() == 6
    with pytest.raises(KeyError):
        got["attentions"]  # unset fields are absent, as there
    ours_params = list(inspect.signature(ours.forward).parameters)
    ref_params = [p for p in inspect.signature(getattr(transformers, cls_name).forward).parameters
                  if p not in ("self", "kwargs")]
    assert ours_params[:len(ref_params)] == ref_params


def test_cache_default_follows_config_use_cache_and_continues_a_prefix():
    model = diffllama.DiffLlamaForCausalLM(tiny_config(initializer_range=0.2)).double().eval()
    ids = torch.randint(1, 96, (1, 8))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :5])  # cache by default, as transformers
        rest = model(ids[:, 5:], past_key_values=prefix.past_key_values).logits
        torch.testing.assert_close(rest, full[:, 5:], rtol=1e-10, atol=1e-12)
        model.config.use_cache = False
        assert model(ids).past_key_values is None
        assert model(ids, use_cache=True).past_key_values.get_seq_length() == 8
    model.config.use_cache = True
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    assert model(ids).past_key_values is None  # off under checkpointed training, as transformers
    assert model(ids, use_cache=True).past_key_values is None  # even when asked for


def test_question_answering_loss_uses_num_items_in_batch_like_transformers():
    config = tiny_config()
    torch.manual_seed(0)
    reference = hf_model("DiffLlamaForQuestionAnswering", config)
    ours = diffllama.DiffLlamaForQuestionAnswering(config).double().eval()
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 96, (4, 7))
    start, end = torch.tensor([1, 2, 9, 0]), torch.tensor([3, 6, 9, 0])  # 9 is out of range: ignored
    for items in (None, 4, torch.tensor(3)):
        kwargs = {} if items is None else {"num_items_in_batch": items}
        with torch.no_grad():
            got = ours(ids, start_positions=start, end_positions=end, **kwargs).loss
            ref = reference(ids, start_positions=start, end_positions=end, **kwargs).loss
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    assert ours(ids, start_positions=start, end_positions=end, num_items_in_batch=4).loss != \
        ours(ids, start_positions=start, end_positions=end).loss


def test_embedding_accessors_and_resize_token_embeddings():
    config = tiny_config(tie_word_embeddings=False, pad_token_id=3, initializer_range=0.2)
    model = diffllama.DiffLlamaForCausalLM(config).double().eval()
    assert model.get_input_embeddings() is model.model.embed_tokens and model.get_decoder() is model.model
    assert model.get_output_embeddings() is model.lm_head and model.can_generate()
    assert diffllama.DiffLlamaModel(config).get_output_embeddings() is None
    assert not diffllama.DiffLlamaForSequenceClassification.can_generate()
    ids = torch.randint(1, 96, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
    old_embed, old_head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    new = model.resize_token_embeddings(100, pad_to_multiple_of=64)
    assert new.weight.shape == (128, 32) and model.lm_head.weight.shape == (128, 32)
    assert model.config.vocab_size == 128 and new.padding_idx == 3
    assert torch.equal(new.weight[:96], old_embed) and torch.equal(model.lm_head.weight[:96], old_head)
    torch.testing.assert_close(new.weight[127], old_embed.mean(0), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :96], before, rtol=0, atol=0)
        model(torch.tensor([[120, 127]]))  # the new ids embed
    tied = diffllama.DiffLlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    tied.resize_token_embeddings(90)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and tied.lm_head.weight.shape == (90, 32)
    with pytest.raises(ValueError, match="would drop special token id 3"):
        model.resize_token_embeddings(3)
    with pytest.raises(ValueError, match="new_num_tokens must be None or an int >= 1"):
        model.resize_token_embeddings(0)
    with pytest.raises(ValueError, match="embedding_dim = hidden_size = 32"):
        model.set_input_embeddings(torch.nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="value must have vocab_size = 128 rows, got 200"):
        model.set_input_embeddings(torch.nn.Embedding(200, 32))
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen embeddings stay frozen, as in transformers
    model.lm_head.weight.requires_grad_(False)
    model.resize_token_embeddings(130)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_every_accepted_hidden_act_is_transformers_formula():
    from transformers.activations import ACT2FN

    from diffllama.config import ACTIVATIONS
    from diffllama.modeling import ACT_FNS

    assert set(ACT_FNS) == set(ACTIVATIONS)
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    for name in ACTIVATIONS:
        torch.testing.assert_close(ACT_FNS[name]()(x), ACT2FN[name](x), rtol=1e-14, atol=1e-14, msg=name)


def test_more_bad_inputs_raise_clear_errors_not_torch_errors():
    model = diffllama.DiffLlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 96, (2, 5))
    cases = [
        (dict(input_ids=ids[:0]), r"input_ids must have shape \(batch, seq\) with batch, seq >= 1, got \(0, 5\)"),
        (dict(inputs_embeds=torch.zeros(2, 0, 32)), "inputs_embeds must be a floating tensor of shape"),
        (dict(inputs_embeds=torch.zeros(2, 5, 32, dtype=torch.float64)), "inputs_embeds must have the model's dtype"),
        (dict(input_ids=ids, logits_to_keep=1.0), "logits_to_keep must be an int >= 0"),
        (dict(input_ids=ids, logits_to_keep=-1), "logits_to_keep must be an int >= 0"),
        (dict(input_ids=ids, labels=ids, num_items_in_batch=0), "num_items_in_batch must be None, a number > 0"),
        (dict(input_ids=ids, cache_position=torch.arange(5, 10)), "cache_position needs past_key_values"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model(**kwargs)
    with torch.no_grad():
        cache = model(ids).past_key_values
    with pytest.raises(ValueError, match="past_key_values holds a batch of 2 rows, the input has 1"):
        model(ids[:1, :1], past_key_values=cache)
    qa = diffllama.DiffLlamaForQuestionAnswering(tiny_config())
    with pytest.raises(ValueError, match=r"start_positions must be an integer tensor of shape \(batch=2,\)"):
        qa(ids, start_positions=torch.tensor([1.0, 2.0]), end_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="end_positions must be an integer tensor"):
        qa(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([1, 2, 3]))
    classifier = diffllama.DiffLlamaForSequenceClassification(tiny_config(pad_token_id=0, num_labels=3,
                                                                          problem_type="multi_label_classification"))
    with pytest.raises(ValueError, match=r"labels for multi_label_classification must have shape \(2, 3\), got \(2,\)"):
        classifier(ids, labels=torch.ones(2))
