"""KV of earlier token sequences, found again by longest common prefix.

The engine keeps what it computed (a context plus the tokens generated after it) so a later context copies its
longest cached prefix and feeds only the rest: an episode's next turn feeds its observation, a tree expansion from
an intermediate node feeds almost nothing. An entry shares the segments of the entry it extended and adds one
segment of what its own call computed. Oldest entries are evicted first, within a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MIN_PREFIX = 8  # the cache keeps and finds only prefixes of at least this many tokens (its block size)


@dataclass
class _Entry:
    """A cached token sequence and its KV as consecutive segments, each (layers, 2, kv_heads, length, head_dim):
    the segments of the entry it extended (shared, not copied) and then what the call that made it computed."""

    tokens: list[int]
    segments: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.segments)

    def first(self, n: int) -> list[torch.Tensor]:
        """The segments covering the first n tokens (the last one cut to fit)."""
        out = []
        for seg in self.segments:
            if n <= 0:
                break
            out.append(seg[:, :, :, :n])
            n -= seg.shape[3]
        return out


class PrefixCache:
    """KV of previously computed token sequences, found by longest common prefix; oldest evicted first.

    Indexed by block: a sequence's prefixes of MIN_PREFIX, 2·MIN_PREFIX, … tokens each hash (chained) to the set
    of entries that start with them. A lookup finds the longest of its own block prefixes that some entry shares,
    then extends the match by fewer than MIN_PREFIX tokens among just those entries. Scanning every entry that
    shares the first block instead (all of them, where every prompt opens with the same template) was ~8% of tree
    sampling at 96 prompts, and grows with the square of the batch.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.blocks: dict[int, set[int]] = {}  # chained hash of a block prefix → entries starting with it
        self._hashes: dict[int, list[int]] = {}  # entry → its block prefixes' hashes
        self.bytes = 0
        self._next = 0

    def clear(self) -> None:
        self.entries.clear()
        self.blocks.clear()
        self._hashes.clear()
        self.bytes = 0

    @staticmethod
    def block_hashes(tokens: list[int]) -> list[int]:
        """Hash of each prefix of whole blocks: element k covers tokens[: (k + 1) · MIN_PREFIX]."""
        out, h = [], 0
        for start in range(0, len(tokens) - MIN_PREFIX + 1, MIN_PREFIX):
            h = hash((h, *tokens[start : start + MIN_PREFIX]))
            out.append(h)
        return out

    def longest(self, tokens: list[int]) -> tuple[int | None, int]:
        """(entry id, common prefix length) of the entry sharing the longest prefix with `tokens` (at least
        MIN_PREFIX tokens; ties go to the oldest entry), else (None, 0)."""
        hashes = self.block_hashes(tokens)
        level = len(hashes)
        while level and hashes[level - 1] not in self.blocks:
            level -= 1
        if not level:
            return None, 0
        shared = level * MIN_PREFIX
        best, best_len = None, 0
        for key in self.blocks[hashes[level - 1]]:
            cached = self.entries[key].tokens
            n = min(len(cached), len(tokens))
            i = shared
            while i < n and cached[i] == tokens[i]:
                i += 1
            if i > best_len or (i == best_len and key < best):
                best, best_len = key, i
        if self.entries[best].tokens[:shared] != tokens[:shared]:  # equal hashes of different tokens
            return None, 0
        return best, best_len

    def add(self, tokens: list[int], segments: list[torch.Tensor]) -> int | None:
        """Keep `tokens` with their KV `segments` (see `_Entry`; counted in full, shared parts included); returns
        the new entry's id (None: too short to keep, or the cache is off)."""
        if len(tokens) < MIN_PREFIX or self.max_bytes <= 0:
            return None
        key, self._next = self._next, self._next + 1
        self.entries[key] = entry = _Entry(tokens, segments)
        self._hashes[key] = hashes = self.block_hashes(tokens)
        for h in hashes:
            self.blocks.setdefault(h, set()).add(key)
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and self.entries:
            self.remove(next(iter(self.entries)))
        return key

    def remove(self, key: int) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        for h in self._hashes.pop(key):
            keys = self.blocks[h]
            keys.discard(key)
            if not keys:
                del self.blocks[h]
        self.bytes -= entry.nbytes
