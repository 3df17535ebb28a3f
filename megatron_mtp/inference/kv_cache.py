"""A static, preallocated, GQA-aware key/value cache with a length per sequence (rollback = a shorter length).

Layout: one buffer pair per attention layer (``trunk.i``, ``heads.i``), ``[batch, n_kv_heads, capacity,
head_dim]`` — the KV heads are stored once, not expanded to the query heads; layers that run side by side
(the draft heads) share one stacked pair, each layer's buffers a view into it. Buffers are allocated on the
first use and never change address afterwards: a CUDA graph
captured over a decode step keeps reading and writing the same memory on every replay.

Every sequence ``b`` owns slots ``[start[b], length[b])``: ``start`` skips its left padding, ``length`` is
how far it is committed. A forward over ``s`` new tokens writes every layer's keys at slots
``length[b] .. length[b] + s - 1`` (``model.transformer.decode_qkv`` does, fused with RoPE) (sequences may sit at different lengths after speculative decoding).
Attention always runs over the whole capacity — one shape for every step, which is what makes the step
capturable — and the mask hides padding, stale slots and the future. Nothing is committed until
:meth:`advance` — rejecting speculative tokens is simply advancing by fewer (or :meth:`rollback` to any
shorter length): the rejected slots are overwritten by the next write.

``start`` and ``lengths`` live on the device only, so masks, positions and write indices need no host sync;
``lengths_host()`` reads them back when a caller (a test, a tool) wants them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_mtp.model.transformer import decode_attention, decode_mlp, decode_qkv


def _visible(lengths: torch.Tensor, start: torch.Tensor, query: torch.Tensor, capacity: int) -> torch.Tensor:
    """Bool [b, rows, capacity]: a row holding query i (``query`` [rows]) of sequence b sees slots
    start[b] .. lengths[b] + i, or its own slot alone when that range is empty (a padding query; its output is
    never used)."""
    slot = torch.arange(capacity, device=lengths.device)[None, None, :]  # [1, 1, capacity]
    last = lengths[:, None, None] + query[None, :, None]  # [b, rows, 1]
    return ((slot <= last) & (slot >= start[:, None, None])) | (slot == last)


def decode_mask(lengths: torch.Tensor, start: torch.Tensor, s_new: int, capacity: int) -> torch.Tensor:
    """Bool [b, 1, s_new, capacity]: query i of sequence b sees slots start[b] .. lengths[b] + i (see
    ``_visible``)."""
    return _visible(lengths, start, torch.arange(s_new, device=lengths.device), capacity)[:, None]


def decode_positions(lengths: torch.Tensor, start: torch.Tensor, s_new: int) -> torch.Tensor:
    """RoPE positions [b, s_new] of the next ``s_new`` tokens (padding does not count; pads get 0)."""
    return ((lengths - start)[:, None] + torch.arange(s_new, device=lengths.device)[None]).clamp(min=0)


def decode_bias(lengths: torch.Tensor, start: torch.Tensor, s_new: int, capacity: int, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The mask as an additive bias [b, 1, group * s_new, capacity] (0 or -inf) in ``dtype``, repeated for the
    ``group`` query heads that share a KV head: the decode path folds those heads into the query rows (see
    ``model.transformer.decode_qkv``), and building the bias once per forward spares every layer a
    bool-to-float conversion. A pure function of tensors, so a decoder can compile it."""
    # Row r is query r % s_new of head group r // s_new: built in that shape directly, since reshaping an
    # expanded [b, 1, group, s_new, capacity] is a view or a copy depending on s_new == 1, which a compiler
    # would specialise on.
    mask = _visible(lengths, start, torch.arange(group * s_new, device=lengths.device) % s_new, capacity)
    return _as_bias(mask, dtype)


def _as_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask [b, rows, capacity] as the additive bias [b, 1, rows, capacity] (0 or -inf) in ``dtype``."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))[:, None]


def tree_bias(lengths: torch.Tensor, start: torch.Tensor, ancestors: torch.Tensor, capacity: int, group: int,
              dtype: torch.dtype) -> torch.Tensor:
    """``decode_bias`` of a forward over a draft tree per sequence (``inference.tree``): node i of sequence b,
    written at slot lengths[b] + i, sees the committed slots start[b] .. lengths[b] - 1 and the slots of its
    ancestors and itself (``ancestors`` bool [b, N, N]) — a linear chain's ancestors are the lower triangle,
    which is ``decode_bias``. Rows in the folded order of ``decode_bias`` [b, 1, group * N, capacity]."""
    b, n = ancestors.size(0), ancestors.size(1)
    slot = torch.arange(capacity, device=lengths.device)[None, None, :]  # [1, 1, capacity]
    rel = slot - lengths[:, None, None]  # [b, 1, capacity]: the node a new slot holds
    node = (torch.arange(group * n, device=lengths.device) % n)[None, :, None]  # [1, rows, 1]
    seq = torch.arange(b, device=lengths.device)[:, None, None]
    mine = ancestors[seq, node, rel.clamp(min=0, max=n - 1)] & (rel >= 0) & (rel < n)
    return _as_bias(((slot >= start[:, None, None]) & (rel < 0)) | mine, dtype)


def compact_slots(k_all: torch.Tensor, v_all: torch.Tensor, lengths: torch.Tensor, nodes: torch.Tensor) -> None:
    """Move the keys and values of each sequence's accepted draft-tree path to consecutive slots, in place:
    slot lengths[b] + nodes[b, d] -> lengths[b] + d (``nodes`` [b, depth + 1], node 0 the root). ``k_all``
    / ``v_all`` [m * b, n_kv, capacity, head_dim] hold m layers side by side. The whole path is read before
    any slot is written (nodes[b, d] >= d, so an in-order copy could overwrite a source)."""
    b, width = nodes.shape
    m, capacity = k_all.size(0) // b, k_all.size(2)
    src = (lengths[:, None] + nodes).clamp(max=capacity - 1).repeat(m, 1)  # [m * b, width]
    dst = (lengths[:, None] + torch.arange(width, device=nodes.device)[None]).clamp(max=capacity - 1).repeat(m, 1)
    rows = torch.arange(m * b, device=nodes.device)[:, None, None]
    heads = torch.arange(k_all.size(1), device=nodes.device)[None, :, None]
    for buf in (k_all, v_all):
        moved = buf[rows, heads, src[:, None, :]]  # [m * b, n_kv, width, head_dim]
        buf.index_put_((rows, heads, dst[:, None, :]), moved)


class KVCache:
    # The per-layer math of a decode step (pure functions of tensors). The decoder swaps in compiled
    # versions on CUDA; the model itself makes no compile decisions.
    kernels = (decode_qkv, decode_attention, decode_mlp)

    def __init__(self, batch_size: int, capacity: int, device: torch.device,
                 start: Optional[Sequence[int]] = None):
        self.batch_size, self.capacity, self.device = batch_size, capacity, torch.device(device)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._k: dict = {}
        self._v: dict = {}
        self._stacks: dict = {}  # tuple of layer keys -> their shared buffer pair
        self.reset(start)

    # ---- bookkeeping (in place: the tensors keep their addresses for captured graphs) -----------------

    def reset(self, start=None) -> None:
        """Empty every sequence; ``start[b]`` (a list or a device tensor) is its first real slot."""
        if start is None:
            self.start.zero_()
        elif torch.is_tensor(start):
            self.start.copy_(start)
        else:
            start = list(start)
            if len(start) != self.batch_size:
                raise ValueError(f"start has {len(start)} entries for a batch of {self.batch_size}.")
            self.start.copy_(torch.tensor(start, dtype=torch.long))
        self.lengths.zero_()

    def advance(self, counts) -> None:
        """Commit ``counts[b]`` of the slots written by the last forward (an int, or a tensor per sequence)."""
        if isinstance(counts, int):
            self.lengths += counts
        else:
            self.lengths += torch.as_tensor(counts, device=self.device).to(torch.long)

    def lengths_host(self) -> list:
        return self.lengths.tolist()

    def rollback(self, lengths: Sequence[int]) -> None:
        """Shrink each sequence's committed length to ``lengths[b]`` (never beyond what it holds)."""
        lengths = [int(x) for x in lengths]
        for b, (new, old, first) in enumerate(zip(lengths, self.lengths.tolist(), self.start.tolist())):
            if not first <= new <= old:
                raise ValueError(f"cannot roll sequence {b} back to {new}: it holds slots {first}..{old}.")
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.long))

    def compact(self, nodes: torch.Tensor, program=compact_slots) -> None:
        """After a draft-tree forward: every layer's accepted path (``nodes`` [b, depth + 1], offsets of the
        slots written at ``lengths``) moved to consecutive slots (``compact_slots``, or a compiled
        ``program``), before :meth:`advance` commits them."""
        for k_all, v_all in self._stacks.values():
            program(k_all, v_all, self.lengths, nodes)

    def positions(self, s_new: int) -> torch.Tensor:
        """RoPE positions [b, s_new] of the next ``s_new`` tokens (see ``decode_positions``)."""
        return decode_positions(self.lengths, self.start, s_new)

    def attention_mask(self, s_new: int) -> torch.Tensor:
        """Bool [b, 1, s_new, capacity]: query i of sequence b sees slots start[b] .. length[b] + i.

        A padding query (prefill of a shorter prompt) would see nothing; it sees its own slot instead, so
        attention never divides by zero (its output is never used).
        """
        return decode_mask(self.lengths, self.start, s_new, self.capacity)

    def attention_bias(self, s_new: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias [b, 1, group * s_new, capacity] (see ``decode_bias``)."""
        return decode_bias(self.lengths, self.start, s_new, self.capacity, group, dtype)

    # ---- the interface the attention layers call -----------------------------------------------------

    def buffers(self, key: str, n_kv: int, head_dim: int, dtype: torch.dtype) -> tuple:
        """The key and value buffers [b, n_kv, capacity, head_dim] of layer ``key`` (allocated on first use).
        The layer writes its new keys and values at slots ``lengths[b] ..`` itself (``decode_qkv``); the
        mask says which slots count."""
        if key not in self._k:
            self.stack([key], n_kv, head_dim, dtype)
        return self._k[key], self._v[key]

    def stack(self, keys: Sequence[str], n_kv: int, head_dim: int, dtype: torch.dtype) -> tuple:
        """One buffer pair [len(keys) * b, n_kv, capacity, head_dim] for layers that run side by side (the
        draft heads), allocated on first use; each key's own buffers are views into it, so the batched and
        the one-layer-at-a-time paths read and write the same memory."""
        keys = list(keys)
        first = self._stacks.get(tuple(keys))
        if first is not None:
            return first
        if any(key in self._k for key in keys):
            raise ValueError(f"KV-cache layers {keys} were already allocated apart; stack them before first use.")
        shape = (len(keys) * self.batch_size, n_kv, self.capacity, head_dim)
        # Zeros, not empty: slots a sequence never wrote are masked, but a masked NaN in V would still poison
        # the attention output (0 * NaN).
        k_all = torch.zeros(shape, dtype=dtype, device=self.device)
        v_all = torch.zeros(shape, dtype=dtype, device=self.device)
        b = self.batch_size
        for i, key in enumerate(keys):
            self._k[key], self._v[key] = k_all[i * b: (i + 1) * b], v_all[i * b: (i + 1) * b]
        self._stacks[tuple(keys)] = (k_all, v_all)
        return k_all, v_all

    def committed(self, key: str, b: int) -> tuple:
        """Sequence b's committed keys and values of layer ``key`` [n_kv, length - start, head_dim] (tests)."""
        first, end = int(self.start[b]), int(self.lengths[b])
        return self._k[key][b, :, first:end], self._v[key][b, :, first:end]

    def memory_bytes(self) -> int:
        own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in list(self._k.values()) + list(self._v.values())}
        return sum(own.values())
