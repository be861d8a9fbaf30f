"""KV caches for incremental decoding. Both hold the rotated keys and the values, (B, KV, S, head_dim) per layer:
differential attention needs no more than Llama does (DESIGN.md §1 step 3).

``DynamicCache`` grows by concatenation (any length, not for CUDA graphs). ``StaticCache`` preallocates
``max_length`` slots and writes new entries at ``cache_position`` with ``index_copy_``, so its tensors keep their
shape and address across steps, as ``torch.compile(mode="reduce-overhead")`` and CUDA graphs need. Unwritten slots
need no mask: they lie after every query's position and the causal mask hides them.
"""

from __future__ import annotations

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
        """Append (B, KV, S_new, d) key/value to layer ``layer_idx``; return the layer's full (B, KV, S, d) pair."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Keep batch rows ``beam_idx`` (e.g. drop finished sequences)."""
        self.keys = [k.index_select(0, beam_idx) for k in self.keys]
        self.values = [v.index_select(0, beam_idx) for v in self.values]
