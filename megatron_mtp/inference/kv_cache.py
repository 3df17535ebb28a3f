"""A preallocated, GQA-aware key/value cache with a length per sequence (rollback = shrinking a length).

Layout: one buffer pair per attention layer (``trunk.i``, ``heads.i``), ``[batch, n_kv_heads, capacity,
head_dim]`` — the KV heads are stored once, not expanded to the query heads (grouped-query attention reads
them through ``scaled_dot_product_attention(enable_gqa=True)``). Buffers are allocated on the first write,
with the dtype and device of the keys.

Every sequence ``b`` owns slots ``[start[b], length[b])``: ``start`` skips its left padding, ``length`` is
how far it is committed. A forward over ``s`` new tokens writes every layer's keys at slots
``length[b] .. length[b] + s - 1`` (sequences may sit at different lengths after speculative decoding),
and the attention mask from :meth:`attention_mask` hides padding, stale slots and the future. Nothing is
committed until :meth:`advance` — rejecting speculative tokens is simply advancing by fewer (or
:meth:`rollback` to any shorter length): the rejected slots are overwritten by the next write.

The per-sequence lengths live on the host (a list) and on the device (a tensor) so that building masks,
positions and write indices needs no host sync.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class KVCache:
    def __init__(self, batch_size: int, capacity: int, device: torch.device,
                 start: Optional[Sequence[int]] = None):
        self.batch_size, self.capacity, self.device = batch_size, capacity, torch.device(device)
        start = list(start) if start is not None else [0] * batch_size
        if len(start) != batch_size:
            raise ValueError(f"start has {len(start)} entries for a batch of {batch_size}.")
        self.start_host = start
        self.start = torch.tensor(start, dtype=torch.long, device=self.device)
        self.lengths_host = [0] * batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._k: dict = {}
        self._v: dict = {}
        self._arange = torch.arange(capacity, device=self.device)
        self._batch_index = torch.arange(batch_size, device=self.device)[:, None]

    # ---- bookkeeping ---------------------------------------------------------------------------------

    @property
    def uniform(self) -> bool:
        """All sequences at the same length (plain decoding, prefill): writes are one slice."""
        first = self.lengths_host[0]
        return all(length == first for length in self.lengths_host)

    def advance(self, counts, counts_host: Optional[Sequence[int]] = None) -> None:
        """Commit ``counts[b]`` of the slots written by the last forward (an int, or one per sequence)."""
        if isinstance(counts, int):
            self.lengths_host = [length + counts for length in self.lengths_host]
            self.lengths += counts
            return
        if counts_host is None:
            counts_host = counts.tolist() if torch.is_tensor(counts) else list(counts)
        if not torch.is_tensor(counts):
            counts = torch.tensor(counts, dtype=torch.long, device=self.device)
        self.lengths_host = [length + int(c) for length, c in zip(self.lengths_host, counts_host)]
        self.lengths += counts.to(self.device, torch.long)
        if max(self.lengths_host) > self.capacity:
            raise RuntimeError(f"KV cache overflow: length {max(self.lengths_host)} > capacity {self.capacity}.")

    def rollback(self, lengths: Sequence[int]) -> None:
        """Shrink each sequence's committed length to ``lengths[b]`` (never beyond what it holds)."""
        lengths = [int(x) for x in lengths]
        for b, (new, old) in enumerate(zip(lengths, self.lengths_host)):
            if not self.start_host[b] <= new <= old:
                raise ValueError(f"cannot roll sequence {b} back to {new}: it holds slots {self.start_host[b]}..{old}.")
        self.lengths_host = lengths
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)

    def positions(self, s_new: int) -> torch.Tensor:
        """RoPE positions [b, s_new] of the next ``s_new`` tokens (padding does not count; pads get 0)."""
        pos = (self.lengths - self.start)[:, None] + self._arange[None, :s_new]
        return pos.clamp(min=0)

    def kv_length(self, s_new: int) -> int:
        """How many slots the next forward of ``s_new`` tokens attends over (host-side, no sync)."""
        return max(self.lengths_host) + s_new

    def attention_mask(self, s_new: int) -> torch.Tensor:
        """Bool [b, 1, s_new, kv_length]: query i of sequence b sees slots start[b] .. length[b] + i.

        A padding query (prefill of a shorter prompt) would see nothing; it sees its own slot instead, so
        attention never divides by zero (its output is never used).
        """
        kv = self.kv_length(s_new)
        slot = self._arange[:kv][None, None, :]  # [1, 1, kv]
        last = self.lengths[:, None, None] + self._arange[:s_new][None, :, None]  # [b, s_new, 1]
        mask = (slot <= last) & (slot >= self.start[:, None, None])
        mask |= slot == last
        return mask[:, None]

    # ---- the interface the attention layers call -----------------------------------------------------

    def update(self, key: str, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Write k, v ([b, n_kv, s_new, head_dim], after RoPE) at each sequence's next slots; return the
        cache's keys and values over the slots the mask covers."""
        b, n_kv, s_new, head_dim = k.shape
        if b != self.batch_size:
            raise ValueError(f"KV cache for batch {self.batch_size} got a batch of {b}.")
        buf_k = self._k.get(key)
        if buf_k is None:
            shape = (b, n_kv, self.capacity, head_dim)
            # Zeros, not empty: slots a sequence never wrote are masked, but a masked NaN in V would
            # still poison the attention output (0 * NaN).
            buf_k = self._k[key] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self._v[key] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        buf_v = self._v[key]
        end = self.kv_length(s_new)
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}.")
        if self.uniform:
            first = self.lengths_host[0]
            buf_k[:, :, first: first + s_new] = k
            buf_v[:, :, first: first + s_new] = v
        else:
            slots = self.lengths[:, None] + self._arange[None, :s_new]  # [b, s_new]
            # Advanced indices around a slice put the indexed dims first: [b, s_new, n_kv, head_dim].
            buf_k[self._batch_index, :, slots] = k.transpose(1, 2)
            buf_v[self._batch_index, :, slots] = v.transpose(1, 2)
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self._k.values()) + list(self._v.values()))
