"""The chunked LM head + cross-entropy against the plain full-logits version."""

import pytest
import torch

from diffllama.train.loss import IGNORE_INDEX, default_chunk_size, linear_cross_entropy, reference_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 0], ids=["chunk1", "chunk7", "chunk64", "auto"])
def test_matches_reference_values_and_grads(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 13))
    targets[0, :4] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, scale=0.25, chunk_size=chunk)
    (loss * 3).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = reference_cross_entropy(hidden, weight, targets, scale=0.25)
    (ref * 3).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_tensor_scale_and_no_grad():
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        a = linear_cross_entropy(hidden, weight, targets, scale=torch.tensor(0.5))
    b = reference_cross_entropy(hidden, weight, targets, scale=0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_grads_in_parameter_dtype():
    torch.manual_seed(2)
    hidden = torch.randn(4, 8, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, scale=1 / 32)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ref = reference_cross_entropy(hidden, weight, targets, scale=1 / 32)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_shape_errors_and_chunk_size():
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(torch.randn(2, 3, 8), torch.randn(10, 8), torch.zeros(2, 4, dtype=torch.long))
    assert default_chunk_size(128256) >= 256
    assert default_chunk_size(4096) * 4096 <= (1 << 26)
