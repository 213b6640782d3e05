"""A preallocated KV cache with one slot per running sequence; each slot has its own length."""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's view of the cache, for one forward call over `slot_ids`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot_ids: torch.Tensor,
                 positions: torch.Tensor, kv_len: int, single: tuple[int, int] | None,
                 first_slot: int | None = None) -> None:
        self.keys = keys  # [slots, KVH, max_len, D]: one sequence's keys per head are contiguous
        self.values = values
        self.slot_ids = slot_ids  # [B]
        self.kv_len = kv_len  # keys 0..kv_len-1 are read
        self.positions = positions  # [B, T] where the new keys go
        # (slot, start) when B == 1: write a slice and read a view, no gather
        self.single_slot, self.single_start = single if single is not None else (None, 0)
        # set when slot_ids are first_slot, first_slot + 1, ...: read a view instead of gathering
        # (the gather copied every row's cache each layer: 225 us of a 3 ms layer at 8 rows)
        self.first_slot = first_slot

    def write_and_read(self, k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, T, KVH, D], written at self.positions -> keys, values [B, KVH, kv_len, D]
        positions = self.positions
        k = k.to(self.keys.dtype).transpose(1, 2)  # [B, KVH, T, D]
        v = v.to(self.values.dtype).transpose(1, 2)
        if self.single_slot is not None:
            start, s = self.single_start, self.single_slot
            self.keys[s, :, start : start + k.shape[2]] = k[0]
            self.values[s, :, start : start + v.shape[2]] = v[0]
            return self.keys[s : s + 1, :, : self.kv_len], self.values[s : s + 1, :, : self.kv_len]
        rows = self.slot_ids.unsqueeze(1).expand_as(positions)  # [B, T]
        # advanced indices around a slice put their broadcast dims first: [B, T, KVH, D]
        self.keys[rows, :, positions] = k.transpose(1, 2)
        self.values[rows, :, positions] = v.transpose(1, 2)
        if self.first_slot is not None:
            picked = slice(self.first_slot, self.first_slot + positions.shape[0])
            return self.keys[picked, :, : self.kv_len], self.values[picked, :, : self.kv_len]
        return self.keys[self.slot_ids, :, : self.kv_len], self.values[self.slot_ids, :, : self.kv_len]


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, index: int, slot_ids: torch.Tensor, positions: torch.Tensor, kv_len: int,
              single: tuple[int, int] | None, first_slot: int | None = None) -> LayerCache:
        return LayerCache(self.keys[index], self.values[index], slot_ids, positions, kv_len, single, first_slot)
