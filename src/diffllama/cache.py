"""KV caches for incremental decoding. Both hold the rotated keys and the values, (B, KV, S, head_dim) per layer:
differential attention needs no more than Llama does (DESIGN.md §1 step 3).

``DynamicCache`` grows by concatenation (any length, not for CUDA graphs). ``StaticCache`` preallocates
``max_length`` slots and writes new entries at ``cache_position`` with ``index_copy_``, so its tensors keep their
shape and address across steps, as ``torch.compile(mode="reduce-overhead")`` and CUDA graphs need. Unwritten slots
need no mask: they lie after every query's position and the causal mask hides them.
"""

from __future__ import annotations

import os

import torch


class DynamicCache:
    """A growing per-layer list of keys and values; ``get_seq_length()`` is the number of cached positions."""

    max_length: int | None = None

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        """Number of positions stored (in layer 0)."""
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, KV, S_new, d) key/value to layer ``layer_idx``; return the layer's full (B, KV, S, d) pair.
        New entries always go at the end, so ``cache_position`` (kept for transformers' signature) is not used."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=2)
        return self.keys[layer_idx], self.values[layer_idx]



def _memory_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (counting what PyTorch's allocator holds unused), the physical memory of the
    host for CPU tensors; None where unknown."""
    if device.type == "cuda":
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + idle
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):  # a platform without these names
            return None
    return None


class StaticCache:
    """Preallocated keys and values, (B, KV, max_length, d) per layer, written in place at ``cache_position``.

    The tensors keep their shape and address for the cache's lifetime, so a decode step that updates it can be
    compiled once (``torch.compile``) and captured in a CUDA graph. Slots past the current position hold stale or
    zero entries; the causal mask (key j visible to query i iff j <= cache_position[i]) hides them, so a cache can be
    reused for a new sequence without clearing it.

    ``get_seq_length()`` is a host-side count of the positions written through :meth:`update` (layer 0, the
    largest ``cache_position`` + 1 seen, taken from the tensor only outside compiled code and CUDA graph capture,
    where reading it would synchronise); decode loops that run compiled steps track positions themselves and may
    call :meth:`set_seq_length`.

    Args:
        num_layers, num_key_value_heads, head_dim: from the model config (see :meth:`from_config`).
        batch_size: B. max_length: slots per sequence (prompt plus new tokens).
        dtype, device: of the stored tensors (the model's activation dtype and device).

    Raises:
        ValueError: a non-positive size, or keys and values that would not fit in the device's free memory (the
            host's physical memory for CPU tensors).
    """

    def __init__(self, *, num_layers: int, num_key_value_heads: int, head_dim: int, batch_size: int,
                 max_length: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("num_key_value_heads", num_key_value_heads),
                            ("head_dim", head_dim), ("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"StaticCache {name} must be a positive int, got {value!r}")
        shape = (batch_size, num_key_value_heads, max_length, head_dim)
        needed = 2 * num_layers * batch_size * num_key_value_heads * max_length * head_dim * dtype.itemsize
        available = _memory_bytes(torch.device(device) if device is not None else torch.device("cpu"))
        if available is not None and needed > available:
            raise ValueError(f"StaticCache of batch_size={batch_size} x max_length={max_length} slots needs "
                             f"{needed / 2**30:.1f} GiB for keys and values, more than the {available / 2**30:.1f} "
                             f"GiB available on {device or 'cpu'}: lower max_length (max_new_tokens) or the batch")
        self.max_length = max_length
        self.batch_size = batch_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._length = 0
        for tensor in self.keys + self.values:
            # Constant addresses: CUDA-graph trees then neither copy these inputs nor refuse their in-place update.
            torch._dynamo.mark_static_address(tensor)

    @classmethod
    def from_config(cls, config, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32,
                    device=None) -> "StaticCache":
        """A cache sized for ``config`` (a DiffLlamaConfig): L layers of (B, KV, max_length, head_dim)."""
        return cls(num_layers=config.num_hidden_layers, num_key_value_heads=config.num_key_value_heads,
                   head_dim=config.head_dim, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device)

    def get_seq_length(self) -> int:
        """Positions written so far (host-side count; see the class docstring)."""
        return self._length

    def set_seq_length(self, length: int) -> None:
        """Record that ``length`` positions are filled (for loops that write through compiled steps)."""
        self._length = int(length)

    def reset(self) -> None:
        """Zero every slot and the length (not needed for reuse, which the causal mask makes safe)."""
        for tensor in self.keys + self.values:
            tensor.zero_()
        self._length = 0

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, KV, S_new, d) ``key``/``value`` at slots ``cache_position`` (S_new,) int64 of layer
        ``layer_idx``; return that layer's full (B, KV, max_length, d) tensors.

        ``cache_position`` None means "append after the current length" (eager use only).

        Raises:
            ValueError: a shape that does not match the cache (checked outside compiled code).
        """
        k_all, v_all = self.keys[layer_idx], self.values[layer_idx]
        compiling = torch.compiler.is_compiling()
        if cache_position is None:
            cache_position = torch.arange(self._length, self._length + key.shape[2], device=k_all.device)
        if not compiling:
            if key.shape[0] != k_all.shape[0] or key.shape[1] != k_all.shape[1] or key.shape[3] != k_all.shape[3]:
                raise ValueError(f"StaticCache holds (B, KV, max_length, d) = {tuple(k_all.shape)}; got keys of "
                                 f"shape {tuple(key.shape)}")
        if layer_idx == 0 and not compiling and not _capturing(k_all):
            end = int(cache_position.max()) + 1
            if end > self.max_length:
                raise ValueError(f"cache_position reaches {end - 1}, past the StaticCache's max_length "
                                 f"{self.max_length}")
            self._length = max(self._length, end)
        k_all.index_copy_(2, cache_position, key.to(k_all.dtype))
        v_all.index_copy_(2, cache_position, value.to(v_all.dtype))
        return k_all, v_all


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()
