"""Prefill: lay out a batch's contexts in the KV buffer, reusing cached prefixes, before the forward runs.

Every context is stored from column 0, so a token's cache column is its position. Identical contexts in one call
(the M trees of a prompt, a node drawn twice) are fed once and their rows repeated afterwards (the KV fork); each
distinct context starts from the longest prefix the prefix cache holds and feeds only the rest, its "suffix".
Suffixes are right-aligned in a (distinct, longest suffix) grid so every row's last token sits in the last slot;
padding slots write to the buffer's scratch column. The engine runs the forward over that grid (or over the real
tokens only, packed) between `plan_prefill` and `finish_prefill`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arborl.components.sampling.engine.kv_cache import KVBuffer, KVPool, attention_bias
from arborl.components.sampling.engine.prefix_cache import PrefixCache


@dataclass
class PrefillPlan:
    """What a prefill feeds. `ids`, `positions`, `attend`: (distinct, width_q) long; padding slots have position
    `capacity` (the scratch column) and attend to column 0."""

    row_of: list[int]  # batch row → index of its distinct context
    distinct: list[list[int]]
    hits: list[tuple[int | None, int]]  # per distinct context: (prefix-cache entry, common prefix length)
    cached: list[int]  # per distinct context: tokens taken from the cache (at most its length − 1)
    suffix: list[int]  # per distinct context: tokens fed now
    bases: list[list[torch.Tensor]]  # per distinct context: the cached KV segments it starts from
    cache: KVBuffer
    ids: torch.Tensor
    positions: torch.Tensor
    attend: torch.Tensor
    width: int  # the longest context: columns attention reads
    capacity: int

    @property
    def width_q(self) -> int:
        return self.ids.shape[1]

    def causal_bias(self) -> torch.Tensor:
        """(distinct, 1, width_q, width) float32: each slot attends to its row's columns up to its own position."""
        cols = torch.arange(self.width, device=self.ids.device)
        return attention_bias((cols[None, None, :] <= self.attend[:, :, None])[:, None])


@dataclass
class Prefilled:
    """A prefilled batch: the KV buffer over every batch row, and per row what the decode loop needs."""

    cache: KVBuffer
    logits: torch.Tensor  # (batch, vocab) float32: the next token after each context
    prefilled: list[int]  # context tokens fed for the row (0 for a repeat of a context fed for another row)
    extended: list[int | None]  # prefix-cache entry the row extended in full (superseded once the row is cached)
    origins: list[tuple[list[torch.Tensor], int]]  # the cached segments the row started from, and their length


def plan_prefill(contexts: list[list[int]], capacity: int, prefix_cache: PrefixCache, pad_id: int, num_layers: int,
                 pool: KVPool, device: torch.device) -> PrefillPlan:
    """Find each distinct context's cached prefix, copy it into a fresh buffer of `capacity` columns, and build the
    suffix grid."""
    unique: dict[tuple[int, ...], int] = {}
    row_of = [unique.setdefault(tuple(c), len(unique)) for c in contexts]
    distinct = [list(c) for c in unique]
    hits = [prefix_cache.longest(c) for c in distinct]
    cached = [min(n, len(c) - 1) for c, (_, n) in zip(distinct, hits, strict=True)]
    suffix = [len(c) - n for c, n in zip(distinct, cached, strict=True)]
    width_q = max(suffix)

    cache = KVBuffer(len(distinct), capacity, num_layers, pool)
    # the cached segments each distinct context starts from, taken now: entries may be evicted by the time this
    # call's own entries (which share them) are made
    bases = [prefix_cache.entries[key].first(n) if n else [] for (key, _), n in zip(hits, cached, strict=True)]
    if any(cached):
        sample = next(b for b in bases if b)[0]
        _, _, heads, _, dim = sample.shape
        cache.allocate(heads, dim, sample.dtype, device)
        for i, segments in enumerate(bases):
            start = 0
            for seg in segments:
                cache.data[:, :, i, :, start : start + seg.shape[3]] = seg
                start += seg.shape[3]

    ids = torch.full((len(distinct), width_q), pad_id, dtype=torch.long)
    positions = torch.full((len(distinct), width_q), capacity, dtype=torch.long)  # padding → scratch column
    for i, (c, n, s) in enumerate(zip(distinct, cached, suffix, strict=True)):
        ids[i, width_q - s :] = torch.tensor(c[n:])  # suffixes end in the last slot
        positions[i, width_q - s :] = torch.arange(n, n + s)
    ids, positions = ids.to(device), positions.to(device)
    attend = torch.where(positions == capacity, 0, positions)  # padding slots must attend somewhere: column 0
    width = max(len(c) for c in distinct)
    return PrefillPlan(row_of, distinct, hits, cached, suffix, bases, cache, ids, positions, attend, width, capacity)


def finish_prefill(plan: PrefillPlan, logits: torch.Tensor, prefix_cache: PrefixCache, fork_pool: KVPool
                   ) -> Prefilled:
    """Per-row counts and origins after the forward, and the KV fork: rows of repeated contexts get copies of their
    distinct context's cache row (into `fork_pool`'s memory) and logits."""
    n_rows = len(plan.row_of)
    prefilled = [0] * n_rows
    extended: list[int | None] = [None] * n_rows
    seen = set()
    for row, u in enumerate(plan.row_of):
        if u not in seen:  # a repeated context is fed once; its copies cost nothing
            seen.add(u)
            prefilled[row] = plan.suffix[u]
            key, n = plan.hits[u]
            if key is not None and n == len(prefix_cache.entries[key].tokens):
                extended[row] = key
    cache = plan.cache
    if len(plan.distinct) < n_rows:
        index = torch.tensor(plan.row_of, device=logits.device)
        cache.select_rows(index, fork_pool)
        logits = logits.index_select(0, index)
    origins = [(plan.bases[u], plan.cached[u]) for u in plan.row_of]
    return Prefilled(cache, logits, prefilled, extended, origins)
