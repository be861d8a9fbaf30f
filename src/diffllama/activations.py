"""Activation functions by transformers' ``ACT2FN`` names, each the same formula as transformers' (the source of
truth for every name, including the tanh-approximated GELU variants)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Activation(nn.Module):
    """A stateless activation given as a function (for those torch has no module of)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _gelu_tanh_form(x: torch.Tensor) -> torch.Tensor:  # transformers' gelu_accurate
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:  # transformers' gelu_fast
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# transformers' ACT2FN names (config.ACTIVATIONS) -> module factories, each the same formula as transformers'.
ACT_FNS = {
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu_new": lambda: nn.GELU(approximate="tanh"), "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_accurate": lambda: _Activation(_gelu_tanh_form), "gelu_fast": lambda: _Activation(_gelu_fast),
    "quick_gelu": lambda: _Activation(lambda x: x * torch.sigmoid(1.702 * x)),
    "relu2": lambda: _Activation(lambda x: torch.square(F.relu(x))), "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU, "mish": nn.Mish, "hardswish": nn.Hardswish, "linear": nn.Identity,
}
