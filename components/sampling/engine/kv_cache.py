"""Keys/values of a batch in one preallocated buffer, and the memory such buffers are taken from.

Decoding never concatenates: the buffer is allocated once per batch at its final width and written in place (with
`DynamicCache`, most of a small model's decode time went to `torch.cat`). A context's token sits at its position's
column; a decode step writes every row's token to one shared column.
"""

from __future__ import annotations

import math

import torch


class KVPool:
    """Memory for KV buffers, kept from call to call. On a CPU a fresh tensor of tens of megabytes costs a page
    fault per 4 KiB on first touch, ~10x the time of clearing memory that is already mapped; a backend makes
    several such buffers per agent turn."""

    def __init__(self):
        self._flat: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape` over the pool's memory (valid until the next `take`)."""
        n = math.prod(shape)
        flat = self._flat
        if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != torch.device(device):
            grow = flat.numel() * 5 // 4 if flat is not None and flat.dtype == dtype else 0
            self._flat = flat = torch.empty(max(n, grow), dtype=dtype, device=device)
        return flat[:n].view(shape)


class KVBuffer:
    """Preallocated keys/values for a batch, passed to the model as its `cache`.

    One tensor `data` of shape (layers, 2, batch, kv_heads, capacity + 1, head_dim), zeroed when allocated
    (from a `KVPool` when given one); column `capacity` is scratch space for padding slots. Before each forward,
    `plan` says where this forward's tokens go and how many columns attention reads (`width`): per-slot columns
    `cols` (batch, q_len), as in a prefill where each row's context has its own length, or one column `col`
    shared by every row, as in a decode step. Each layer's `update` writes there and returns views of the first
    `width` columns.
    """

    def __init__(self, batch: int, capacity: int, num_layers: int, pool: KVPool | None = None):
        self.batch, self.capacity, self.num_layers, self.pool = batch, capacity, num_layers, pool
        self.data: torch.Tensor | None = None
        self.layers: list[torch.Tensor] = []
        self.cols: torch.Tensor | None = None
        self.col: int | None = None
        self.width = 0

    def allocate(self, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.num_layers, 2, self.batch, heads, self.capacity + 1, head_dim)
        if self.pool is None:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        else:
            self.data = self.pool.take(shape, dtype, device).zero_()
        self.layers = list(self.data.unbind(0))
        self._layer_kv = [layer.unbind(0) for layer in self.layers]

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s whole keys and values, each (batch, kv_heads, capacity + 1, head_dim)."""
        return self._layer_kv[layer_idx]

    def plan(self, width: int, cols: torch.Tensor | None = None, col: int | None = None,
             rows: torch.Tensor | None = None) -> None:
        """`cols` (batch, q_len), or flat `cols` and `rows` (tokens,) for tokens passed flat, or one `col`."""
        if (cols is None) == (col is None):
            raise ValueError("plan takes exactly one of cols and col")
        self.width, self.cols, self.col, self.flat = width, cols, col, rows is not None
        if rows is not None:
            self._rows = rows
        elif cols is not None:
            self._rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key/value_states: (batch, kv_heads, q_len, head_dim), or (tokens, kv_heads, head_dim) when planned flat
        → views (batch, kv_heads, width, head_dim)."""
        if self.data is None:  # allocated here when no cached prefix fixed the shapes first
            heads, dim = key_states.shape[1], key_states.shape[-1]
            self.allocate(heads, dim, key_states.dtype, key_states.device)
        keys, values = self.layers[layer_idx].unbind(0)
        if self.col is not None:
            keys.narrow(2, self.col, key_states.shape[2]).copy_(key_states)
            values.narrow(2, self.col, key_states.shape[2]).copy_(value_states)
        elif self.flat:
            keys[self._rows, :, self.cols] = key_states
            values[self._rows, :, self.cols] = value_states
        else:
            keys[self._rows, :, self.cols] = key_states.transpose(1, 2)
            values[self._rows, :, self.cols] = value_states.transpose(1, 2)
        return keys.narrow(2, 0, self.width), values.narrow(2, 0, self.width)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def select_rows(self, index: torch.Tensor, pool: KVPool | None = None) -> None:
        """Keep rows `index` (batch' entries, repeats allowed): the KV fork of shared prefixes. `pool`: where the
        new rows go (not this buffer's own pool, which the old rows occupy)."""
        shape = list(self.data.shape)
        shape[2] = int(index.numel())
        out = None if pool is None else pool.take(tuple(shape), self.data.dtype, self.data.device)
        self.data = torch.index_select(self.data, 2, index, out=out)
        self.layers = list(self.data.unbind(0))
        self._layer_kv = [layer.unbind(0) for layer in self.layers]
        self.batch, self.pool = shape[2], pool

    def gather(self, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """A compact copy of the KV of column runs (row, start, end), one after the other:
        (layers, 2, kv_heads, Σ (end - start), head_dim), the buffer's own order, so a slice of it copies back into
        a row in contiguous runs. One pass over the bytes (advanced indexing plus a permute took two, and was
        ~10% of a batch-128 decode)."""
        return torch.cat([self.data[:, :, row, :, start:end] for row, start, end in runs if end > start], dim=3)


def attention_bias(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean attend/not → float32 additive attention bias (0 / -inf), same shape."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))
