"""Decode speed-ups applied to a model from outside: fused projections, a fixed λ, the batch-1 Triton GEMV.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the weights, and each product
pays a launch and a ramp-up before it streams at full bandwidth; q/k/v as one product and gate/up as one pay them
once (gpt-fast's load-time ``wqkv`` and vLLM's merged projections do the same; written here from scratch). λ is
constant at inference, yet computing it costs two tiny kernels per layer and step. :func:`prepare_for_decode`
changes a built model without touching its file, as gpt-fast's ``tp.py`` applies tensor parallelism: each
attention and MLP module gets instance-level replacements of its ``qkv``/``gate_up``/``compute_lambda`` methods
(and each chosen ``nn.Linear`` of its ``forward``) that share the module's Parameters.

The checkpoint keeps transformers' separate ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj``, so the
fused weight lives outside the state dict: each projection's weight (and bias) becomes a view of one concatenated
tensor. Parameter names, values, the state dict and the saved bytes stay as they were, no memory is added, and
in-place updates (optimizer steps, ``load_state_dict``) reach the fused tensor by themselves.

Contract (what the replacements do):
- whenever a gradient is needed, the plain projections and a freshly computed λ run: training a prepared model is
  exactly training the plain one;
- in eager code the fused product runs only while the projections are still the views made here (a host-side
  address check, no device sync); replacing parameters (``.to(dtype)``, ``load_state_dict(assign=True)``) falls
  back to the plain projections until :func:`prepare_for_decode` is called again;
- the fixed λ is read only by compiled code (``torch.compile`` cannot check it against the parameters); eager code
  computes λ. After changing λ's parameters call :func:`refresh_lambda` (or :func:`prepare_for_decode`) before
  running compiled code: :class:`diffllama.generation.DecodeStep` does so when their version counters moved, and
  ``generate`` on every call. Compiled code trusts the fusion as well: re-prepare after replacing parameters.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from diffllama import gemv, settings

# The instance attributes set by prepare_for_decode, removed by undo_prepare_for_decode.
_ATTENTION_OVERRIDES = ("qkv", "compute_lambda", "fused_qkv", "fixed_lambda")
_MLP_OVERRIDES = ("gate_up", "fused_gate_up")


class FusedWeights:
    """``nn.Linear`` layers with one input whose weights (and biases) are made views of one concatenated tensor.

    Args:
        linears: two or more layers with equal ``in_features``, dtype and device, all with or all without bias;
            they keep their Parameters (same objects, shapes, values, ``requires_grad``).

    Raises:
        ValueError: layers that cannot share one matmul (different inputs, dtypes, devices or bias settings).
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        first = linears[0]
        for layer in linears:
            if layer.in_features != first.in_features or layer.weight.dtype != first.weight.dtype \
                    or layer.weight.device != first.weight.device or (layer.bias is None) != (first.bias is None):
                raise ValueError("fused projections need layers with equal in_features, dtype, device and bias "
                                 "setting")
        self.linears = linears
        self.sizes = [layer.out_features for layer in linears]
        # Normal (not inference) tensors even when built under inference_mode: training may update them in place.
        with torch.no_grad(), torch.inference_mode(False):
            self.weight = torch.cat([layer.weight for layer in linears])  # (ΣN, D)
            self.bias = None if first.bias is None else torch.cat([layer.bias for layer in linears])  # (ΣN,)
            for layer, weight in zip(linears, self.weight.split(self.sizes)):
                layer.weight.data = weight
            if self.bias is not None:
                for layer, bias in zip(linears, self.bias.split(self.sizes)):
                    layer.bias.data = bias
        self._pointers = self._current_pointers()

    def _current_pointers(self) -> tuple:
        # A replaced parameter lives elsewhere: the fused tensor keeps the old memory alive, so no new tensor of
        # the same device can have the old address.
        return (self.linears[0].weight.device, *(layer.weight.data_ptr() for layer in self.linears),
                *(layer.bias.data_ptr() for layer in self.linears if layer.bias is not None))

    def valid(self) -> bool:
        """Whether every layer's parameters are still the views made at build time (host-side, no sync)."""
        return self._current_pointers() == self._pointers

    def usable(self) -> bool:
        """Run the fused product now? Never when a gradient is needed (autograd must see the Parameters); in
        compiled code always (see the module docstring); in eager code while :meth:`valid`."""
        if torch.is_grad_enabled() and any(p.requires_grad for layer in self.linears for p in layer.parameters()):
            return False
        return torch.compiler.is_compiling() or self.valid()

    def __call__(self, x: torch.Tensor, site: str, sites: frozenset[str]) -> tuple[torch.Tensor, ...]:
        """(..., D) -> one (..., N_i) output per layer, equal to ``layer(x)``; through :func:`diffllama.gemv.linear`
        (the Triton GEMV for one row on CUDA when ``site`` is in ``sites``)."""
        return gemv.linear(x, self.weight, self.bias, site, sites).split(self.sizes, dim=-1)


def _fused_qkv(attn, x: torch.Tensor, sites: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if attn.fused_qkv.usable():
        return attn.fused_qkv(x, "qkv", sites)
    return type(attn).qkv(attn, x)


def _fused_gate_up(mlp, x: torch.Tensor, sites: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if mlp.fused_gate_up.usable():
        return mlp.fused_gate_up(x, "gate_up", sites)
    return type(mlp).gate_up(mlp, x)


def _fixed_lambda(attn, dtype: torch.dtype) -> torch.Tensor:
    fixed = attn.fixed_lambda
    if torch.compiler.is_compiling() and fixed.dtype == dtype and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in attn.lambda_parameters())):
        return fixed
    return type(attn).compute_lambda(attn, dtype)


def _gemv_forward(linear: nn.Linear, x: torch.Tensor, site: str, sites: frozenset[str]) -> torch.Tensor:
    return gemv.linear(x, linear.weight, linear.bias, site, sites)


def _route_to_gemv(linear: nn.Module, site: str, sites: frozenset[str]) -> None:
    # Only a plain layer: a subclass (e.g. an adapter) keeps its own forward.
    if site in sites and type(linear) is nn.Linear:
        linear.forward = functools.partial(_gemv_forward, linear, site=site, sites=sites)


def prepare_for_decode(model: nn.Module, gemv_sites: frozenset[str] = settings.GEMV_SITES) -> nn.Module:
    """Make ``model`` (any diffllama model class) decode fast; results unchanged up to float summation order.

    For each layer: q/k/v as one product and gate/up as one (:class:`FusedWeights`, built anew where parameters
    were replaced since), a fixed λ for compiled code where λ is a constant (:func:`refresh_lambda`; V1 only: V2's
    λ depends on the token, its ``lambda_proj`` runs as it is), and the products named by
    ``gemv_sites`` (default :data:`diffllama.settings.GEMV_SITES`: the fused q/k/v, or ``DIFFLLAMA_GEMV``) through
    the batch-1 Triton GEMV.
    The state dict, parameter names and values do not change (see the module docstring for the contract).
    Idempotent; :func:`undo_prepare_for_decode` reverses it. Returns ``model``.

    Raises:
        ValueError: projections of one layer that cannot share a matmul (e.g. cast to different dtypes).
    """
    for layer in model.base_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if "fused_qkv" not in vars(attn) or not attn.fused_qkv.valid():
            attn.fused_qkv = FusedWeights([attn.q_proj, attn.k_proj, attn.v_proj])
        if "fused_gate_up" not in vars(mlp) or not mlp.fused_gate_up.valid():
            mlp.fused_gate_up = FusedWeights([mlp.gate_proj, mlp.up_proj])
        attn.qkv = functools.partial(_fused_qkv, attn, sites=gemv_sites)
        if has_fixed_lambda(attn):
            attn.compute_lambda = types.MethodType(_fixed_lambda, attn)
        mlp.gate_up = functools.partial(_fused_gate_up, mlp, sites=gemv_sites)
        for linear, site in ((attn.o_proj, "o"), (mlp.down_proj, "down")):
            _route_to_gemv(linear, site, gemv_sites)
    head = getattr(model, "lm_head", None)
    if head is not None:
        _route_to_gemv(head, "lm_head", gemv_sites)
    refresh_lambda(model)
    return model


def undo_prepare_for_decode(model: nn.Module) -> nn.Module:
    """Remove what :func:`prepare_for_decode` added: plain projections and λ again (the weights keep their
    values; they stay views of the concatenated tensors, which changes nothing). Returns ``model``."""
    for layer in model.base_model.layers:
        for module, names in ((layer.self_attn, _ATTENTION_OVERRIDES), (layer.mlp, _MLP_OVERRIDES)):
            for name in names:
                vars(module).pop(name, None)
        vars(layer.self_attn.o_proj).pop("forward", None)
        vars(layer.mlp.down_proj).pop("forward", None)
    head = getattr(model, "lm_head", None)
    if head is not None:
        vars(head).pop("forward", None)
    return model


def has_fixed_lambda(attn: nn.Module) -> bool:
    """Whether the attention module's λ is a constant of its parameters (DiffLlama V1's ``compute_lambda``); V2's
    λ is computed from each token (``lambda_proj``) and Llama has none, so neither gets a fixed λ."""
    return hasattr(type(attn), "compute_lambda")


def is_prepared(model: nn.Module) -> bool:
    """Whether :func:`prepare_for_decode` is in effect."""
    return "fused_qkv" in vars(model.base_model.layers[0].self_attn)


@torch.no_grad()
def refresh_lambda(model: nn.Module) -> None:
    """Recompute each prepared layer's fixed λ from its parameters, in the activation dtype (the embedding's),
    in place where it already exists (a captured CUDA graph reads the new value). No-op for a model that is
    not prepared. Host work plus two tiny kernels per layer."""
    if not is_prepared(model):
        return
    dtype = model.base_model.embed_tokens.weight.dtype
    with torch.inference_mode(False):  # a normal tensor, updatable outside inference mode
        for layer in model.base_model.layers:
            attn = layer.self_attn
            if not has_fixed_lambda(attn):
                continue
            value = type(attn).compute_lambda(attn, dtype)
            fixed = vars(attn).get("fixed_lambda")
            if fixed is not None and fixed.dtype == value.dtype and fixed.device == value.device:
                fixed.copy_(value)
            else:
                attn.fixed_lambda = value


def lambda_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every layer's λ parameters (not inference tensors), whose version counters tell in-place updates; none for
    the architectures without a fixed λ (:func:`has_fixed_lambda`)."""
    return [p for layer in model.base_model.layers if has_fixed_lambda(layer.self_attn)
            for p in layer.self_attn.lambda_parameters() if not p.is_inference()]
