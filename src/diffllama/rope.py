"""Rotary position embeddings (RoPE) and the scaling types transformers supports.

RoPE: Su et al., "RoFormer" (arXiv 2104.09864), in the non-interleaved "rotate half" layout (dimension i pairs with
i + rotary_dim/2). Scaling types, selected by ``config.rope_parameters["rope_type"]``:

- ``default``: plain RoPE, ``inv_freq[i] = theta ** (-2i / dim)``.
- ``linear``: position interpolation, frequencies divided by ``factor``.
- ``dynamic``: NTK-aware scaling with a base that grows with the current sequence length (reddit /u/bloc97,
  /u/emozilla; transformers' ``_compute_dynamic_ntk_parameters``).
- ``yarn``: Peng et al., "YaRN" (arXiv 2309.00071), NTK-by-parts ramp plus an attention factor.
- ``longrope``: Ding et al., "LongRoPE" (arXiv 2402.13753), per-dimension short/long rescale factors.
- ``llama3``: Llama 3.1's wavelength-banded scaling.

Every formula keeps the float32 operation order of transformers' ``modeling_rope_utils`` (5.x), so cos/sin agree
bit for bit; where that order is not the obvious one, a comment says so.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffllama.config import DiffLlamaConfig


def _original_max(config: DiffLlamaConfig) -> int:
    # transformers defaults it to max_position_embeddings for yarn, longrope and llama3.
    return config.rope_parameters.get("original_max_position_embeddings") or config.max_position_embeddings


def compute_inv_freq(
    config: DiffLlamaConfig, seq_len: int | torch.Tensor | None = None, device=None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for ``config.rope_parameters``.

    Matches transformers' ``ROPE_INIT_FUNCTIONS`` / ``compute_default_rope_parameters`` for the types listed in the
    module docstring. ``seq_len`` (an int or a 0-d int tensor: the current sequence length) matters only for
    ``dynamic`` (which uses it when it exceeds ``max_position_embeddings``) and ``longrope`` (long factors when it
    exceeds ``original_max_position_embeddings``, short factors otherwise or when None).

    Returns:
        ``(inv_freq, attention_scaling)``: inv_freq is float32 of shape (rotary_dim // 2,), where rotary_dim is
        ``int(head_dim * partial_rotary_factor)`` (factor default 1.0; ignored by the default type, as in
        transformers' DiffLlama); attention_scaling is the float that
        multiplies cos and sin (1.0 except for yarn and longrope).

    Raises:
        ValueError: an unknown ``rope_type`` (DiffLlamaConfig refuses one first, so only for configs edited after
            construction).
    """
    params = config.rope_parameters
    rope_type, theta = params["rope_type"], params["rope_theta"]
    # transformers' DiffLlama rotates all of head_dim under the default type, whatever partial_rotary_factor says
    dim = int(config.head_dim * (1.0 if rope_type == "default" else params.get("partial_rotary_factor", 1.0)))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # (dim/2,)

    if rope_type == "default":
        return 1.0 / (theta**exponents), 1.0
    if rope_type == "linear":
        return 1.0 / (theta**exponents) / params["factor"], 1.0
    if rope_type == "dynamic":
        factor, max_pos = params["factor"], config.max_position_embeddings
        if seq_len is None:
            seq_len = max_pos
        # A tensor seq_len (as the forward pass gives) makes this float32 arithmetic, as in transformers.
        seq_len = seq_len.clamp(min=max_pos) if torch.is_tensor(seq_len) else max(seq_len, max_pos)
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if rope_type == "yarn":
        return _yarn(config, params, theta, dim, exponents)
    if rope_type == "longrope":
        original_max = _original_max(config)
        factor = params.get("factor")
        if factor is None:
            factor = config.max_position_embeddings / original_max
        scaling = params.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
        long = seq_len is not None and seq_len > original_max
        ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (ext * theta**exponents), scaling
    if rope_type == "llama3":
        inv_freq = 1.0 / (theta**exponents)
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, medium))
        return inv_freq, 1.0
    raise ValueError(f"unknown rope_type {rope_type!r}")


def check_compile_supported(config: DiffLlamaConfig) -> None:
    """Refuse, before any compilation, a RoPE type that ``torch.compile(fullgraph=True)`` cannot trace.

    ``dynamic`` keeps its NTK frequencies as state between calls and recomputes them when ``max(position_ids) + 1``
    grows past the cached length (transformers' ``dynamic_rope_update``): a Python branch on a tensor value, which
    fails inside Dynamo with a data-dependent control-flow error. The other types compile: ``longrope`` picks its
    short or long factors with ``torch.where``, the rest are fixed.

    Raises:
        ValueError: naming ``rope_type``, for ``dynamic``.
    """
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "dynamic":
        raise ValueError(f"rope_type {rope_type!r} cannot be compiled: its frequencies change with the sequence "
                         f"length through state kept between calls; use compile=False (the eager decode step)")


def _yarn(config, params, theta, dim, exponents) -> tuple[torch.Tensor, float]:
    original_max = _original_max(config)
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_max

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = params.get("attention_factor")
    if scaling is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        scaling = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over original_max
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta**exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    # The weight is 1 - ramp and the blend uses 1 - weight, not ramp: transformers' rounding, kept on purpose.
    weight = (1 - ramp).to(pos_freqs.device)
    return interpolation * (1 - weight) + extrapolation * weight, scaling


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, matching transformers' ``DiffLlamaRotaryEmbedding`` with ``dynamic_rope_update``.

    ``inv_freq`` (and ``original_inv_freq``, ``long_inv_freq`` for longrope) are non-persistent float32 buffers:
    they move with the module but are not in the state dict, and they stay float32 whatever the model is cast to
    (``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``from_config``/``from_pretrained`` with a ``dtype``): with
    ``rope_theta`` = 500000 a bfloat16 ``inv_freq`` puts the cosines at position 1000 off by up to 0.25.
    transformers 5.17 keeps them float32 through ``from_pretrained``/``from_config`` but casts them on
    ``.to(dtype)``/``.half()``; here every path gives the numbers of its ``from_pretrained``.

    ``dynamic`` is stateful, as in transformers: a call whose ``max(position_ids) + 1`` exceeds the cached length
    recomputes the frequencies for that length; a call shorter than ``max_position_embeddings`` after a longer one
    reverts to the original frequencies (so it cannot be compiled: :func:`check_compile_supported`). ``longrope``
    picks the long factors when ``max(position_ids) + 1 > original_max_position_embeddings`` (no state, no host
    sync).
    """

    def __init__(self, config: DiffLlamaConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.original_max_seq_len = self.max_seq_len_cached = config.max_position_embeddings
        if self.rope_type == "longrope":
            self.original_max = _original_max(config)
            long_inv_freq, _ = compute_inv_freq(config, self.original_max + 1)
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # nn.Module.to/half/bfloat16/double all end here and would cast the buffers with the weights; the angles
        # must come from float32 frequencies, so a buffer whose dtype fn changed takes the device alone, from the
        # float32 tensor it had before (casting back would keep the rounding).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, new in self._buffers.items():
            if new is not None and new.dtype != before[name].dtype:
                self._buffers[name] = before[name].to(new.device)
        return self

    def _dynamic_update(self, position_ids: torch.Tensor) -> None:
        seq_len = position_ids.max() + 1  # a 0-d tensor, so the NTK base is computed in float32 as transformers does
        cached = self.max_seq_len_cached
        if seq_len > cached:
            self.inv_freq, self.attention_scaling = compute_inv_freq(self.config, seq_len, position_ids.device)
            self.max_seq_len_cached = int(seq_len)
        if seq_len < self.original_max_seq_len and cached > self.original_max_seq_len:
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``position_ids`` (B, S) int64: each (B, S, rotary_dim) in ``x.dtype``, computed in float32.

        rotary_dim is head_dim unless ``partial_rotary_factor`` < 1. Only ``x``'s dtype and device are used.
        """
        inv_freq = self.inv_freq
        if self.rope_type == "dynamic":
            self._dynamic_update(position_ids)
            inv_freq = self.inv_freq
        elif self.rope_type == "longrope":
            is_long = position_ids.max() + 1 > self.original_max
            inv_freq = torch.where(is_long, self.long_inv_freq, self.original_inv_freq)
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = position_ids[:, :, None].float() * inv_freq.to(x.device, torch.float32)  # (B, S, rotary_dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, rotary_dim)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension, split in halves (any shape, any dtype)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, S, d) and k (B, KV, S, d) by cos, sin (B, S, r) from :class:`RotaryEmbedding`.

    Non-interleaved RoPE (RoFormer; transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``):
    ``x * cos + rotate_half(x) * sin`` on the first r dims; the remaining d - r dims (``partial_rotary_factor`` < 1)
    pass through unchanged. Returns ``(q_embed, k_embed)`` with the shapes and dtypes of q and k.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, r): broadcast over heads
    r = cos.shape[-1]

    def rotate(x):
        if r == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)
