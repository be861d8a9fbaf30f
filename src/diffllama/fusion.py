"""Fused projections for inference: linear layers that share an input, computed by one matmul.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the weights, and every
product pays a launch and a ramp-up before it streams at full bandwidth; q/k/v as one product and gate/up as
one pay them once for fewer, larger reads (gpt-fast's ``wqkv`` and vLLM's merged projections do the same; written
here from scratch). The checkpoint keeps transformers' separate ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/
``up_proj``, so the fusion lives outside the state dict: each layer's weight becomes a view of the concatenated
tensor. The state dict, the values and the memory stay as they were, and in-place updates (optimizer steps,
``load_state_dict``, ``nn.init``) reach the fused tensor by themselves. Replacing a parameter instead
(``module.to(dtype)``, ``load_state_dict(assign=True)``, ``param.data = ...``) ends the fusion, which
:meth:`FusedLinear.valid` detects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffllama import gemv


class FusedLinear:
    """``nn.Linear`` layers with one input, computed as one ``F.linear`` over their concatenated weights.

    Building it makes each layer's weight a view of one (ΣN, D) tensor and each bias a view of one (ΣN,) tensor,
    in the order given; the layers keep their parameters (same objects, shapes, values, ``requires_grad``).

    Args:
        linears: two or more layers with equal ``in_features``, dtype and device, all with or all without bias.
        site: the product's name for :func:`diffllama.gemv.linear` (``"qkv"`` or ``"gate_up"``).

    Raises:
        ValueError: layers that cannot share one matmul (different inputs, dtypes, devices or bias settings).
    """

    def __init__(self, linears: Sequence[nn.Linear], site: str) -> None:
        first = linears[0]
        for layer in linears:
            if layer.in_features != first.in_features or layer.weight.dtype != first.weight.dtype \
                    or layer.weight.device != first.weight.device or (layer.bias is None) != (first.bias is None):
                raise ValueError("FusedLinear needs layers with equal in_features, dtype, device and bias setting")
        self.linears = list(linears)
        self.site = site
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

    def needs_grad(self) -> bool:
        """Whether autograd must see the separate parameters (the fused tensor is not one of them)."""
        return torch.is_grad_enabled() and any(p.requires_grad for layer in self.linears for p in layer.parameters())

    def active(self, trusted: bool) -> bool:
        """Use the fused matmul now? Never when a gradient is needed; in compiled code when ``trusted`` (the
        caller checked :meth:`valid` before entering it, see ``DiffLlamaPreTrainedModel.inference_caches``);
        in eager code when :meth:`valid`."""
        if self.needs_grad():
            return False
        if torch.compiler.is_compiling():
            return trusted
        return self.valid()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(..., D) -> one (..., N_i) output per layer, equal to ``layer(x)`` for each."""
        return gemv.linear(x, self.weight, self.bias, self.site).split(self.sizes, dim=-1)


class TrustSwitch:
    """Whether compiled code may use a module's inference caches without checking them (``on``).

    ``torch.compile`` guards on the value, so code compiled with it on is not reused with it off. A plain object
    rather than a module attribute: :meth:`DiffLlamaPreTrainedModel.inference_caches` flips one per module on every
    decode step, and ``nn.Module`` attribute writes cost microseconds each.
    """

    def __init__(self) -> None:
        self.on = False
