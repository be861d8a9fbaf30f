"""RoPE parity with transformers' DiffLlamaRotaryEmbedding / apply_rotary_pos_emb, plus independent checks."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.diffllama import modeling_diffllama as hf

from diffllama import DiffLlamaForCausalLM
from diffllama.config import DiffLlamaConfig
from diffllama.rope import RotaryEmbedding, apply_rotary_pos_emb, compute_inv_freq, rotate_half

SIZES = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
HALF = SIZES["head_dim"] // 2
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "default-partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},  # ignored
    "linear-partial": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale-untruncated": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "mscale": 1.0,
                                "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False,
                                "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                 "long_factor": [2.0 + 0.5 * i for i in range(HALF)]},
    "longrope-attention-factor": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0,
                                  "attention_factor": 1.2, "original_max_position_embeddings": 32,
                                  "short_factor": [1.0] * HALF, "long_factor": [4.0] * HALF},
    # Wavelengths 2*pi*10000**(i/8): i = 0 is kept (< 32/4), i = 1 interpolated, i >= 2 divided by factor (> 32/1).
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}
# Sequence lengths in call order: short, past max_position_embeddings (64) and the longrope original max (32),
# longer, shrinking but still long, longer, short again (dynamic resets), and the boundaries. (dynamic at 65 with
# factor 3 differs by an ulp if the NTK base is computed in float64 instead of transformers' float32.)
LENGTHS = (20, 65, 100, 80, 120, 20, 32, 33, 64, 65, 100, 10)


def configs(rope):
    ours = DiffLlamaConfig(**SIZES, rope_parameters=dict(rope))
    theirs = transformers.DiffLlamaConfig(**SIZES, rope_parameters=dict(rope))
    return ours, theirs


def positions(length):
    # Two rows with different offsets, so max(position_ids) + 1 = length and rows differ.
    return torch.stack([torch.arange(length), torch.arange(length) // 2 + (length + 1) // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rope", ROPE_CASES.values(), ids=ROPE_CASES.keys())
def test_cos_sin_match_transformers(rope, dtype):
    ours, theirs = configs(rope)
    ours, theirs = RotaryEmbedding(ours), hf.DiffLlamaRotaryEmbedding(theirs)
    x = torch.zeros(1, dtype=dtype)
    for length in LENGTHS:
        pos = positions(length)
        cos, sin = ours(x, pos)
        ref_cos, ref_sin = theirs(x, pos)
        assert cos.dtype == sin.dtype == dtype
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6, msg=f"cos, length {length}")
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6, msg=f"sin, length {length}")


@pytest.mark.parametrize("rope", ["yarn", "longrope", "llama3"])
@pytest.mark.parametrize("top_level", [None, 8], ids=["absent", "top-level-8"])
def test_original_max_position_embeddings_resolves_as_in_transformers(rope, top_level):
    """A top-level original_max_position_embeddings (Phi-3 style config.json) wins over the dict's own value;
    without one, the dict's value, else max_position_embeddings. (transformers' config object alone keeps the
    dict's value; building the model re-reads the config and lets the top-level key win: the model is what counts.)"""
    data = {**SIZES, "rope_parameters": dict(ROPE_CASES[rope])}
    if top_level is None:
        data["rope_parameters"].pop("original_max_position_embeddings")
    else:
        data["original_max_position_embeddings"] = top_level
    ours = DiffLlamaConfig.from_dict(data)
    theirs = hf.DiffLlamaModel(transformers.DiffLlamaConfig(**data))
    expected = top_level or SIZES["max_position_embeddings"]
    assert ours.rope_parameters["original_max_position_embeddings"] == expected
    assert theirs.config.rope_parameters["original_max_position_embeddings"] == expected
    x, pos = torch.zeros(1, dtype=torch.float64), positions(40)
    for got, ref in zip(RotaryEmbedding(ours)(x, pos), theirs.rotary_emb(x, pos)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_rope_scaling_beside_rope_parameters_wins_as_in_transformers():
    data = {**SIZES, "rope_parameters": {"rope_type": "default", "rope_theta": 999.0},
            "rope_scaling": {"type": "linear", "factor": 2.0}}
    ours = DiffLlamaConfig.from_dict(data)
    theirs = hf.DiffLlamaModel(transformers.DiffLlamaConfig(**data))
    assert ours.rope_parameters["rope_type"] == "linear" and ours.rope_parameters["rope_theta"] == 10000.0
    x, pos = torch.zeros(1, dtype=torch.float64), positions(40)
    for got, ref in zip(RotaryEmbedding(ours)(x, pos), theirs.rotary_emb(x, pos)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seq_len", [None, 20, 64, 100, torch.tensor(65)], ids=["none", "20", "64", "100", "65-tensor"])
@pytest.mark.parametrize("rope", ROPE_CASES.values(), ids=ROPE_CASES.keys())
def test_compute_inv_freq_matches_transformers(rope, seq_len):
    ours, theirs = configs(rope)
    if rope["rope_type"] == "default":
        ref, ref_scaling = hf.DiffLlamaRotaryEmbedding.compute_default_rope_parameters(theirs)
    else:
        ref, ref_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](theirs, None, seq_len=seq_len)
    inv_freq, scaling = compute_inv_freq(ours, seq_len)
    assert inv_freq.dtype == torch.float32
    assert inv_freq.shape == ref.shape == (int(16 * ours.rope_parameters.get("partial_rotary_factor", 1.0)) // 2
                                           if rope["rope_type"] != "default" else 8,)
    torch.testing.assert_close(inv_freq, ref, rtol=0, atol=0)
    assert scaling == pytest.approx(ref_scaling, rel=1e-12)


def test_dynamic_switches_and_resets():
    rotary = RotaryEmbedding(DiffLlamaConfig(**SIZES, rope_parameters=ROPE_CASES["dynamic"]))
    original = rotary.inv_freq.clone()
    rotary(torch.zeros(1), positions(100))
    assert rotary.max_seq_len_cached == 100 and not torch.equal(rotary.inv_freq, original)
    rotary(torch.zeros(1), positions(80))  # shorter but past the original max: keeps the 100-token frequencies
    assert rotary.max_seq_len_cached == 100
    rotary(torch.zeros(1), positions(20))
    assert rotary.max_seq_len_cached == 64 and torch.equal(rotary.inv_freq, original)


def test_inv_freq_is_a_non_persistent_buffer():
    for rope in ROPE_CASES.values():
        rotary = RotaryEmbedding(DiffLlamaConfig(**SIZES, rope_parameters=rope))
        assert "inv_freq" in dict(rotary.named_buffers())
        assert rotary.state_dict() == {}


def test_output_dtype_follows_x():
    rotary = RotaryEmbedding(DiffLlamaConfig(**SIZES))
    cos, sin = rotary(torch.zeros(1, dtype=torch.bfloat16), positions(10))
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (2, 10, 16)


def qk(kv_heads, seq=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, seq, 16, generator=g, dtype=dtype)
    k = torch.randn(2, kv_heads, seq, 16, generator=g, dtype=dtype)
    return q, k


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_apply_rotary_matches_transformers(kv_heads):
    rotary = RotaryEmbedding(DiffLlamaConfig(**SIZES, rope_parameters=ROPE_CASES["yarn"]))
    q, k = qk(kv_heads)
    cos, sin = rotary(q, positions(7))
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    assert q_embed.shape == q.shape and k_embed.shape == k.shape
    torch.testing.assert_close(q_embed, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(k_embed, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(rotate_half(q), hf.rotate_half(q), rtol=0, atol=0)


@pytest.mark.parametrize("rope", ["default", "linear-partial"])
def test_rotation_preserves_norms_and_relative_position(rope):
    # Independent of transformers: RoPE rotates each (i, i + r/2) pair, so norms are kept, the pass-through dims are
    # untouched, and q_m . k_n depends only on m - n.
    rotary = RotaryEmbedding(DiffLlamaConfig(**SIZES, rope_parameters=ROPE_CASES[rope]))
    q, k = qk(2, seq=5, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # the second row is the first shifted by 7
    cos, sin = rotary(q, pos)
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_embed.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_embed.norm(dim=-1), k.norm(dim=-1))
    r = cos.shape[-1]
    torch.testing.assert_close(q_embed[..., r:], q[..., r:], rtol=0, atol=0)
    q, k = q[:1].expand(2, -1, -1, -1), k[:1].expand(2, -1, -1, -1)  # same vectors in both rows
    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    scores = q_embed[:, :2] @ k_embed.transpose(-1, -2)  # (2, 2, 5, 5): query head h against kv head h
    # Angles are rounded in float32 (as transformers), so shifted positions agree to ~1e-7 relative, not exactly.
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


# ---- float32 frequencies whatever the model dtype (issue 14) -----------------------------------------------------

THETA_500K = {  # rope_theta 500000 (Llama 3's): a bfloat16 inv_freq puts cos off by 0.25 at position 1000
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "dynamic": {**ROPE_CASES["dynamic"], "rope_theta": 500000.0},
    "longrope": {**ROPE_CASES["longrope"], "rope_theta": 500000.0},
}
# Every way a half-precision model comes to be: (config, checkpoint folder) -> model.
LOW_PRECISION_PATHS = {
    "to-bf16": lambda config, folder: DiffLlamaForCausalLM(config).to(torch.bfloat16),
    "to-device-and-fp16": lambda config, folder: DiffLlamaForCausalLM(config).to("cpu", torch.float16),
    "half": lambda config, folder: DiffLlamaForCausalLM(config).half(),
    "bfloat16": lambda config, folder: DiffLlamaForCausalLM(config).bfloat16(),
    "from_config": lambda config, folder: DiffLlamaForCausalLM.from_config(config, dtype="bfloat16"),
    "from_pretrained-dtype": lambda config, folder: DiffLlamaForCausalLM.from_pretrained(folder, dtype="bfloat16"),
    "from_pretrained-bf16-checkpoint": lambda config, folder: DiffLlamaForCausalLM.from_pretrained(folder),
}
LONG_POSITIONS = (1, 1000, 4000, 8191, 16384, 30000, 32767)


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    """A bfloat16 checkpoint folder per THETA_500K case (config.json says dtype bfloat16)."""
    folders = {}
    for name, rope in THETA_500K.items():
        folders[name] = tmp_path_factory.mktemp(f"bf16-{name}")
        DiffLlamaForCausalLM(DiffLlamaConfig(**SIZES, rope_parameters=dict(rope))).bfloat16().save_pretrained(
            folders[name])
    return folders


@pytest.mark.parametrize("path", LOW_PRECISION_PATHS, ids=LOW_PRECISION_PATHS.keys())
@pytest.mark.parametrize("rope", THETA_500K, ids=THETA_500K.keys())
def test_half_precision_models_keep_float32_frequencies_and_transformers_cos_sin(rope, path, bf16_checkpoints):
    """The rotary buffers stay float32 (bit for bit the freshly computed ones) through every cast and load, and
    the cos/sin up to position 32767 equal those of transformers' rotary module (float32 buffers, as its
    from_pretrained leaves them) for activations of the model's dtype, i.e. are float32 angles rounded once."""
    config, theirs = configs(THETA_500K[rope])
    model = LOW_PRECISION_PATHS[path](config, bf16_checkpoints[rope])
    assert model.dtype in (torch.bfloat16, torch.float16)
    rotary = model.model.rotary_emb
    fresh = RotaryEmbedding(config)
    buffers = dict(rotary.named_buffers())
    assert set(buffers) == set(dict(fresh.named_buffers())) and len(buffers) >= 2
    for name, buffer in buffers.items():
        assert buffer.dtype == torch.float32, name
        assert torch.equal(buffer, getattr(fresh, name)), name
    x = torch.zeros(1, dtype=model.dtype)
    inv_freq, scaling = compute_inv_freq(config, torch.tensor(1001))  # dynamic, longrope: for length 1001
    cos = rotary(x, torch.tensor([[1000]]))[0][0, 0, :HALF].double()
    # Within one bf16 ulp of the exact value: rounding of the result, not of the angle (0.25 off with a bf16 inv_freq).
    assert (cos - (1000 * inv_freq.double()).cos() * scaling).abs().max() <= 2 ** -7
    reference = hf.DiffLlamaRotaryEmbedding(theirs)
    for last in (20, *LONG_POSITIONS):  # in call order, so the dynamic state moves alike
        pos = torch.tensor([[0, 1, last // 2, last]])
        for got, ref in zip(rotary(x, pos), reference(x, pos)):
            assert got.dtype == model.dtype
            assert torch.equal(got, ref), (last, (got.float() - ref.float()).abs().max())


def test_double_keeps_float32_buffers_and_float64_model_matches_transformers():
    config, theirs = configs(THETA_500K["default"])
    rotary = RotaryEmbedding(config).double()
    assert rotary.inv_freq.dtype == torch.float32
    x, pos = torch.zeros(1, dtype=torch.float64), torch.tensor([[0, 1000, 32767]])
    for got, ref in zip(rotary(x, pos), hf.DiffLlamaRotaryEmbedding(theirs)(x, pos)):
        assert got.dtype == torch.float64 and torch.equal(got, ref)


def test_bf16_logits_match_transformers_bf16_model_at_large_positions(tmp_path):
    """A tiny bfloat16 model at positions up to 32767, against transformers' bfloat16 model (from_pretrained) with
    the same weights: both err from the float64 run by bfloat16 rounding alone. With a bfloat16 inv_freq the
    relative angles between far-apart positions are off by whole turns and the logits by O(1)."""
    from conftest import hf_model, tiny_config

    config = tiny_config(num_hidden_layers=2, num_key_value_heads=2, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    reference64 = hf_model("DiffLlamaForCausalLM", config, torch.float64)
    ours = DiffLlamaForCausalLM(config)
    ours.load_state_dict(reference64.state_dict())
    ours.bfloat16().save_pretrained(tmp_path)
    with torch.no_grad():
        reference64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    theirs = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert theirs.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(1, 96, (2, 8))
    pos = torch.stack([torch.arange(8) + 30000, torch.linspace(0, 32767, 8).long()])  # far apart in row 1
    with torch.no_grad():
        exact = reference64(input_ids=ids, position_ids=pos).logits
        got = ours(input_ids=ids, position_ids=pos).logits.double()
        ref = theirs(input_ids=ids, position_ids=pos).logits.double()
    ours_err, theirs_err = (got - exact).abs().max().item(), (ref - exact).abs().max().item()
    # Logits of size ~4: both ~0.06-0.08 from float64 (bfloat16 weights and activations); ~1.0 with bf16 angles.
    assert theirs_err < 0.15
    assert ours_err <= 1.5 * theirs_err, (ours_err, theirs_err)
    torch.testing.assert_close(got, ref, rtol=0, atol=0.15)
