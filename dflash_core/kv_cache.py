"""Preallocated key/value cache with one row per sequence slot and a length per row."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for `num_slots` sequences of up to `max_seq_len` tokens each.

    Row `slot` contains `lengths[slot]` valid entries; entries past that length are garbage and
    are never attended to. Appending writes each row at its own length, so rows of a batch
    may sit at different positions.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_seq_len = max_seq_len
        self.num_slots = num_slots

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        starts: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Store keys/values [batch, kv_heads, seq, head_dim] at positions starts..starts+seq."""
        seq_len = keys.shape[2]
        positions = starts[:, None] + torch.arange(seq_len, device=starts.device)  # [batch, seq]
        if int(positions.max()) >= self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: position {int(positions.max())} is past "
                f"max_seq_len={self.max_seq_len}"
            )
        rows = slots[:, None]
        # Advanced indices around a slice put the indexed dims first: [batch, seq, kv_heads, dim].
        self.keys[layer][rows, :, positions] = keys.transpose(1, 2)
        self.values[layer][rows, :, positions] = values.transpose(1, 2)

    def read(
        self, layer: int, slots: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the first `length` keys and values of each slot: [batch, kv_heads, length, dim]."""
        first = int(slots[0])
        if torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device)):
            # Contiguous slots: a view, no copy.
            sl = slice(first, first + len(slots))
            return self.keys[layer, sl, :, :length], self.values[layer, sl, :, :length]
        return self.keys[layer, slots, :, :length], self.values[layer, slots, :, :length]

    def truncate(self, slot: int, length: int) -> None:
        """Cut a slot back to its first `length` entries (rejected draft tokens)."""
        current = int(self.lengths[slot])
        if not 0 <= length <= current:
            raise ValueError(f"cannot truncate slot {slot} of length {current} to {length}")
        self.lengths[slot] = length

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0
