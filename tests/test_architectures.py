"""The three architectures (DESIGN.md §2): Differential Transformer V2 against an independent float64 reference
written from its formulas, the Llama baseline against transformers' ``LlamaForCausalLM``, caches, decode
speed-ups and checkpoints of both, and the config's architecture choice."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import diffllama
from conftest import TINY, padded_batch, tiny_config
from diffllama import decode
from diffllama.attention import AttentionMask
from diffllama.cache import DynamicCache, StaticCache
from diffllama.config import ARCHITECTURES, DiffLlamaConfig, model_type_for_arch
from diffllama.generation import DecodeStep, position_ids_from_mask

TOL = 1e-10
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
CLASSES = ("DiffLlamaModel", "DiffLlamaForCausalLM", "DiffLlamaForSequenceClassification",
           "DiffLlamaForTokenClassification", "DiffLlamaForQuestionAnswering")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def arch_model(model_type: str, kv_heads: int = 2, cls: str = "DiffLlamaForCausalLM", **overrides):
    """A float64 eval-mode model of ``model_type`` with weights large enough that attention is far from uniform."""
    torch.manual_seed(0)
    config = tiny_config(model_type=model_type, num_key_value_heads=kv_heads, initializer_range=0.2, **overrides)
    return getattr(diffllama, cls)(config).double().eval()


# ---- V2 against the formulas ---------------------------------------------------------------------------------

def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's non-interleaved RoPE on (B, heads, S, d): ``x·cos + [−x2, x1]·sin`` (halves x1, x2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]


def v2_reference(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """DiffLlama V2 attention from the issue's formulas, head by head: (B, S, D) -> (B, S, D). ``allowed`` (B, S, S)
    bool: which keys each query sees (a query seeing none outputs 0)."""
    b, s, _ = x.shape
    h, kv, d = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = rotate((x @ attn.q_proj.weight.T).view(b, s, 2 * h, d).transpose(1, 2), cos, sin)  # (B, 2h, S, d)
    k = rotate((x @ attn.k_proj.weight.T).view(b, s, kv, d).transpose(1, 2), cos, sin)  # (B, KV, S, d)
    v = (x @ attn.v_proj.weight.T).view(b, s, kv, d).transpose(1, 2)
    heads = []
    for j in range(2 * h):
        g = j // (2 * h // kv)
        scores = (q[:, j] @ k[:, g].transpose(-1, -2)) / d ** 0.5
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        heads.append(probs @ v[:, g])  # (B, S, d)
    lam = torch.sigmoid(x @ attn.lambda_proj.weight.T)  # (B, S, h)
    out = torch.cat([heads[2 * i] - lam[..., i:i + 1] * heads[2 * i + 1] for i in range(h)], -1)  # (B, S, h·d)
    return out @ attn.o_proj.weight.T


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1, 8], ids=["mha", "gqa", "mqa", "kv8"])
def test_v2_attention_matches_the_formulas_outputs_and_gradients(kv_heads, padding, implementation):
    """One V2 layer's attention against :func:`v2_reference`: output and the gradients of the input and of every
    parameter (q, k, v, o, lambda_proj), at 11 tokens with rows padded by 0, 2, 5 on the left. kv8: more KV heads
    than output heads (2h = 8 query heads read 8 KV heads)."""
    model = arch_model("diffllama_v2", kv_heads, "DiffLlamaModel", attn_implementation=implementation)
    attn = model.layers[0].self_attn
    _, mask = padded_batch(96, "left", seq=11)
    if padding == "none":
        mask = torch.ones_like(mask)
    x = torch.randn(3, 11, TINY["hidden_size"], dtype=torch.float64, requires_grad=True)
    cos, sin = model.rotary_emb(x, position_ids_from_mask(mask))
    keys = torch.arange(11)
    allowed = (keys[None, :] <= keys[:, None])[None] & mask.bool()[:, None, :]
    attn_mask = AttentionMask(keys, mask.bool() if padding == "left" else None, 11, plain_causal=padding == "none")
    got, _ = attn(x, (cos, sin), attn_mask)
    expected = v2_reference(attn, x, cos, sin, allowed)
    real = mask.bool()  # padded query rows are not compared (their output is arbitrary)
    assert rel_err(got[real], expected[real]) < TOL
    params = [x, *attn.parameters()]
    weights = torch.randn_like(got) * real[..., None]
    grads = torch.autograd.grad((got * weights).sum(), params)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    assert len(params) == 6  # x, q, k, v, o, lambda_proj
    for grad, reference in zip(grads, expected_grads):
        assert rel_err(grad, reference) < TOL


@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=list(HEADS))
def test_eager_and_sdpa_agree_on_the_model_and_its_gradients(model_type, kv_heads):
    """The whole model, left-padded, with labels: eager and sdpa give the same loss, logits and gradients."""
    models = [arch_model(model_type, kv_heads, attn_implementation=name) for name in ("eager", "sdpa")]
    ids, mask = padded_batch(96, "left")
    labels = ids.masked_fill(mask == 0, -100)
    outs = [m(ids, attention_mask=mask, labels=labels) for m in models]
    for out in outs:
        out.loss.backward()
    real = mask.bool()
    assert rel_err(outs[1].logits[real], outs[0].logits[real]) < TOL
    for (name, p0), p1 in zip(models[0].named_parameters(), models[1].parameters()):
        assert rel_err(p1.grad, p0.grad) < TOL, name


@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=list(HEADS))
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_incremental_decode_equals_the_full_forward(kind, kv_heads, model_type):
    """Left-padded prefill of 7 tokens, then chunks of 1, 3 and 1 through a cache: every step's logits equal the
    full forward's."""
    model = arch_model(model_type, kv_heads)
    ids, mask = padded_batch(96, "left", seq=12)
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        cache = DynamicCache() if kind == "dynamic" else StaticCache.from_config(model.config, 3, 16, torch.float64)
        for start, end in [(0, 7), (7, 8), (8, 11), (11, 12)]:
            step_mask = mask[:, :end] if kind == "dynamic" else torch.nn.functional.pad(mask, (0, 4), value=1)
            out = model(ids[:, start:end], attention_mask=step_mask, position_ids=positions[:, start:end],
                        past_key_values=cache, use_cache=True, cache_position=torch.arange(start, end))
            real = mask[:, start:end].bool()
            assert rel_err(out.logits[real], full[:, start:end][real]) < TOL


@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
def test_fused_decode_step_equals_the_plain_step(model_type):
    """prepare_for_decode (fused q/k/v and gate/up; no fixed λ: V2's is per token, Llama has none) leaves the decode
    step's logits as they were, and the state dict unchanged."""
    model, plain = arch_model(model_type), arch_model(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 96, (2, 5))
    caches = [StaticCache.from_config(m.config, 2, 8, torch.float64) for m in (model, plain)]
    steps = [DecodeStep(model, caches[0], fuse=True), DecodeStep(plain, caches[1], fuse=False)]
    assert decode.is_prepared(model) and "fixed_lambda" not in vars(model.model.layers[0].self_attn)
    assert decode.lambda_parameters(model) == []
    with torch.inference_mode():
        for m, cache in zip((model, plain), caches):
            m(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(5))
        args = (ids[:, -1:], torch.full((2, 1), 5), torch.tensor([5]))
        torch.testing.assert_close(steps[0](*args), steps[1](*args), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
def test_compiled_static_decode_matches_eager(model_type):
    """The compiled decode path (fused projections, static cache, torch.compile) generates the eager tokens."""
    model = arch_model(model_type, num_hidden_layers=1).float()
    ids, mask = padded_batch(96, "left", seq=6)
    eager = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    compiled = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], static_cache=True, compile=True)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
@pytest.mark.parametrize("cls", CLASSES)
def test_every_class_round_trips_through_a_checkpoint(cls, model_type, tmp_path):
    """Each of the five classes builds, runs, saves its model_type (V2: no lambda_std_dev; the class name in
    ``architectures``) and loads back with equal outputs."""
    model = arch_model(model_type, cls=cls)
    ids, mask = padded_batch(96, "left")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model_type and "lambda_std_dev" not in saved
    prefix = "Llama" if model_type == "llama" else "DiffLlamaV2"
    assert saved["architectures"] == [prefix + cls.removeprefix("DiffLlama")]
    loaded = getattr(diffllama, cls).from_pretrained(tmp_path)
    assert loaded.config.model_type == model_type
    with torch.no_grad():
        out, back = model(ids, attention_mask=mask), loaded(ids, attention_mask=mask)
    first = next(v for v in out.to_tuple() if isinstance(v, torch.Tensor))
    assert torch.equal(first, next(v for v in back.to_tuple() if isinstance(v, torch.Tensor)))


def test_v2_checkpoint_is_refused_by_transformers_by_name(tmp_path):
    """transformers has no diffllama_v2: AutoModelForCausalLM refuses the folder naming the model_type instead of
    loading mismatched shapes."""
    arch_model("diffllama_v2").save_pretrained(tmp_path)
    with pytest.raises((ValueError, KeyError), match="diffllama_v2"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_v2_parameter_shapes_and_v1_stays_as_it_was():
    """V2's projections have the issue's shapes; V1's parameter names are transformers' DiffLlama ones."""
    attn = arch_model("diffllama_v2", kv_heads=2).model.layers[0].self_attn
    d, hidden = 8, TINY["hidden_size"]
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {"q_proj.weight": (2 * 4 * d, hidden), "k_proj.weight": (2 * d, hidden),
                      "v_proj.weight": (2 * d, hidden), "o_proj.weight": (hidden, 4 * d),
                      "lambda_proj.weight": (4, hidden)}
    v1 = arch_model("diffllama").model.layers[0].self_attn
    assert [n for n, _ in v1.named_parameters()] == ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2",
                                                     "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                     "o_proj.weight"]


def test_modeling_file_stays_within_500_lines():
    """The models file reads in one sitting (an acceptance criterion of issue 10's layout): the variants' attention
    lives in attention_variants.py."""
    source = Path(diffllama.modeling.__file__).read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 500


# ---- Llama against transformers ------------------------------------------------------------------------------

def hf_llama(config: DiffLlamaConfig, cls: str = "LlamaForCausalLM"):
    """transformers' Llama class ``cls`` with ``config``'s fields, float64, eval mode."""
    fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls)(transformers.LlamaConfig(**fields))
    return model.double().eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=list(HEADS))
@pytest.mark.parametrize("cls", CLASSES)
def test_llama_matches_transformers(cls, kv_heads):
    """Same weights, left padding, float64: our outputs and losses equal transformers' Llama* class's."""
    model = arch_model("llama", kv_heads, cls=cls, num_labels=3)
    reference = hf_llama(model.config, cls.replace("DiffLlama", "Llama"))
    reference.load_state_dict(model.state_dict())
    ids, mask = padded_batch(96, "left")
    kwargs = {}
    if cls == "DiffLlamaForCausalLM":
        kwargs = {"labels": ids.masked_fill(mask == 0, -100)}
    elif cls == "DiffLlamaForSequenceClassification":
        kwargs = {"labels": torch.tensor([0, 2, 1])}
    elif cls == "DiffLlamaForQuestionAnswering":
        kwargs = {"start_positions": torch.tensor([3, 4, 6]), "end_positions": torch.tensor([5, 9, 8])}
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask, **kwargs), reference(ids, attention_mask=mask, **kwargs)
    real = mask.bool()
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        if getattr(theirs, name, None) is not None:
            a, b = getattr(ours, name), getattr(theirs, name)
            if a.dim() >= 2 and a.shape[:2] == real.shape:
                a, b = a[real], b[real]
            assert rel_err(a, b) < TOL, name
    if kwargs:
        assert abs(ours.loss.item() - theirs.loss.item()) < TOL * abs(theirs.loss.item())


def test_llama_greedy_generation_matches_transformers():
    """Greedy continuation of left-padded prompts: the same tokens as transformers' generate."""
    model = arch_model("llama", 2)
    reference = hf_llama(model.config)
    reference.load_state_dict(model.state_dict())
    ids, mask = padded_batch(96, "left", seq=6)
    ours = model.generate(ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=[])
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_llama_checkpoints_load_both_ways(tmp_path):
    """Saved here -> transformers' AutoModelForCausalLM (a LlamaForCausalLM, config.json with Llama's keys and no
    DiffLlama-only ones) with equal logits; saved by transformers -> loaded here with equal logits."""
    model = arch_model("llama", 2)
    model.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    reference = hf_llama(model.config)
    reference.save_pretrained(tmp_path / "theirs")
    theirs_config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert set(saved) - {"dtype"} == set(theirs_config) - {"transformers_version", "dtype"}
    assert saved["architectures"] == ["LlamaForCausalLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float64).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    back = diffllama.DiffLlamaForCausalLM.from_pretrained(tmp_path / "theirs")
    assert back.config.model_type == "llama" and back.config.rms_norm_eps == reference.config.rms_norm_eps
    ids, mask = padded_batch(96, "left")
    real = mask.bool()
    with torch.no_grad():
        assert rel_err(loaded(ids, attention_mask=mask).logits[real], model(ids, attention_mask=mask).logits[real]) < TOL
        assert rel_err(back(ids, attention_mask=mask).logits[real],
                       reference(ids, attention_mask=mask).logits[real]) < TOL


def test_llama_may_have_an_odd_head_count():
    """Only V1 pairs heads: a Llama (and a V2) with 3 heads builds and runs; V1 refuses it naming the field."""
    for model_type in ("llama", "diffllama_v2"):
        model = arch_model(model_type, kv_heads=1, num_attention_heads=3, hidden_size=24)
        assert model(torch.randint(1, 96, (1, 5))).logits.isfinite().all()
    with pytest.raises(ValueError, match="num_attention_heads must be even"):
        tiny_config(num_attention_heads=3, hidden_size=24)


# ---- the architecture choice ---------------------------------------------------------------------------------

def test_arch_spellings_map_to_model_types():
    assert ARCHITECTURES == {"diffllama": "diffllama", "diffllama-v2": "diffllama_v2", "llama": "llama"}
    assert [model_type_for_arch(a) for a in ARCHITECTURES] == ["diffllama", "diffllama_v2", "llama"]


@pytest.mark.parametrize("arch", ["diffllama_v2", "Llama", "", None, "gpt2"])
def test_bad_arch_is_refused_naming_the_accepted_values(arch):
    with pytest.raises(ValueError, match=r"arch must be one of \('diffllama', 'diffllama-v2', 'llama'\), got"):
        model_type_for_arch(arch)


@pytest.mark.parametrize(("fields", "message"), [
    ({"model_type": "mistral"}, r"config model_type must be one of \('diffllama', 'diffllama_v2', 'llama'\), "
                                r"got 'mistral'"),
    ({"model_type": "diffllama_v2", "num_key_value_heads": 3},
     r"2 \* num_attention_heads \(8, the query heads of diffllama_v2\) must be a multiple of num_key_value_heads \(3\)"),
    ({"model_type": "llama", "num_key_value_heads": 3},
     r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias must be false"),
])
def test_bad_architecture_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DiffLlamaConfig.from_dict({**TINY, **fields})


def test_v1_config_json_is_unchanged_by_the_architecture_field():
    """V1's config.json keys are those it had before the architectures (model_type 'diffllama', lambda_std_dev);
    V2's drops lambda_std_dev; Llama's adds transformers' mlp_bias and pretraining_tp."""
    v1_keys = {"attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim", "hidden_act",
               "hidden_size", "initializer_range", "intermediate_size", "lambda_std_dev", "max_position_embeddings",
               "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
               "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "use_cache", "vocab_size"}
    assert set(DiffLlamaConfig().to_dict()) == v1_keys and DiffLlamaConfig().to_dict()["model_type"] == "diffllama"
    assert set(DiffLlamaConfig(model_type="diffllama_v2").to_dict()) == v1_keys - {"lambda_std_dev"}
    llama = DiffLlamaConfig(model_type="llama").to_dict()
    assert set(llama) == v1_keys - {"lambda_std_dev"} | {"mlp_bias", "pretraining_tp"}
    assert (llama["mlp_bias"], llama["pretraining_tp"]) == (False, 1)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["diffllama_v2", "llama"])
def test_auto_on_cuda_matches_float64_eager_and_compiled_decode_matches(model_type):
    """On a GPU, "auto" (SDPA's fused kernels for these architectures) in bf16 gives float64 eager's loss, logits
    and gradients to bf16 accuracy, and the compiled, CUDA-graphed decode generates the eager tokens (float32)."""
    reference = arch_model(model_type, attn_implementation="eager", initializer_range=0.05)
    model = arch_model(model_type, attn_implementation="auto", initializer_range=0.05).to("cuda", torch.bfloat16)
    ids, mask = padded_batch(96, "left")
    labels = ids.masked_fill(mask == 0, -100)
    outs = [reference(ids, attention_mask=mask, labels=labels),
            model(ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda())]
    for out in outs:
        out.loss.backward()
    real = mask.bool()
    assert abs(outs[1].loss.item() - outs[0].loss.item()) < 1e-2 * outs[0].loss.item()
    assert rel_err(outs[1].logits.cpu().double()[real], outs[0].logits[real]) < 2e-2
    for (name, p0), p1 in zip(reference.named_parameters(), model.parameters()):
        assert rel_err(p1.grad.cpu().double(), p0.grad) < 5e-2, name
    model = model.float().eval()
    eager = model.generate(ids.cuda(), mask.cuda(), max_new_tokens=8, eos_token_id=[])
    compiled = model.generate(ids.cuda(), mask.cuda(), max_new_tokens=8, eos_token_id=[], static_cache=True,
                              compile=True)
    assert torch.equal(compiled, eager)
