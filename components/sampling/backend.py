"""Hugging Face generation backend: one agent turn for a batch of contexts, with behaviour log-probs.

The interface is deliberately narrow (token ids in, token ids + log-probs out) so another engine (see
`vllm_backend.py`) can stand in for it.

How a batch is computed, and why:
* **Preallocated KV cache.** Keys/values live in one buffer, allocated once per batch at its final width (from
  memory pooled between calls) and written in place; decoding never concatenates (with `DynamicCache` most of
  a tiny model's decode time went to `torch.cat`). A context's token sits at its position's column; decode
  step t writes every row's token to the one column `width + t`. The additive attention bias is built here,
  once per call.
* **Three forwards** (see `llama_forward`): fused, lean, or the model's own.
* **Finished rows leave.** Once half the rows in the buffer have finished their turn, the finished ones hand
  their KV to the prefix cache and the rest are copied into the other pooled buffer.
* **Prefix reuse.** The backend keeps the KV of what it computed in earlier calls (the context and the
  generated tokens it fed; an entry shares the segments of the entry it extended) and, for a new context,
  copies the longest cached common prefix and feeds only the rest — the next turn of an episode feeds just
  the observation, and a tree expansion from an intermediate node feeds nothing it computed before.
  Identical contexts within a call (the M trees of a prompt, a node drawn twice) are prefilled once and their
  cache rows repeated. The cache is dropped whenever a parameter of the model changes (tracked by tensor
  version counters), and is bounded by `prefix_cache_mb`.
* Logits are cast to float32 before the softmax, so bf16 models sample from float32 probabilities.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from arborl.components.sampling import llama_forward, rng

MIN_PREFIX = 8  # the prefix cache keeps and finds only prefixes of at least this many tokens (its block size)
COMPACT_MIN_ROWS = 16  # below this many rows a decode step costs about the same whatever the count


@dataclass
class TurnOutput:
    tokens: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution
    stop: str  # "stop" (a stop token), "eos", or "length" (hit max_new_tokens)
    prefilled: int | None = None  # context tokens actually fed to the model for this row (None: unknown)


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


FORWARDS = ("fused", "lean", "model")


class HFBackend:
    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        eos_id: int,
        batch_size: int = 256,
        prefix_cache_mb: float = 512.0,
        forward: str | None = None,
    ):
        """`prefix_cache_mb`: memory for KV reused across calls (0 disables it). `forward`: how a step is
        computed — "fused" (`llama_forward.FusedLlama`: folded, concatenated weights; float32 only), "lean"
        (the Llama modules without Hugging Face's per-call machinery) or "model" (the model's own forward);
        None picks the first of these the model supports."""
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.batch_size = batch_size
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self._weights_version: tuple | None = None
        self._fused: llama_forward.FusedLlama | None = None
        self._num_layers = model.config.num_hidden_layers
        self._pools = (KVPool(), KVPool())  # a call's distinct-context buffer, and its rows after the fork
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"HFBackend needs sdpa or eager attention (it passes its own 4D masks), got {impl!r}")
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns where the new one exists)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        available = {"model": True, "lean": llama_forward.supports(model),
                     "fused": llama_forward.FusedLlama.supports(model)}
        if forward is None:
            forward = next(f for f in FORWARDS if available[f])
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        if not available[forward]:
            raise ValueError(f"{forward} forward requested but {type(model).__name__} does not support it "
                             "(a Llama-family model; fused also needs float32 plain linear layers, static rope)")
        self.forward = forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def uses_cpu_kernel(self) -> bool:
        """Whether decode attention runs in the compiled CPU kernel (`cpu_kernels`), as of the last build of the
        fused weights (built here if none was)."""
        if self.forward != "fused":
            return False
        self._check_weights()
        return self._fused._kernel is not None

    def clear_cache(self) -> None:
        self.prefix_cache.clear()

    def _check_weights(self) -> None:
        """Drop cached prefixes (and rebuild fused weights) when any parameter was replaced or changed in place
        since the last call."""
        version = tuple((p.data_ptr(), p._version, p.device) for p in self.model.parameters())
        if version != self._weights_version:
            self.prefix_cache.clear()
            if self.forward == "fused" and not llama_forward.FusedLlama.supports(self.model):
                raise ValueError("the model changed into one the fused forward does not support (it needs float32 "
                                 "plain linear layers); make a new HFBackend with forward='lean'")
            self._fused = llama_forward.FusedLlama(self.model) if self.forward == "fused" else None
            self._weights_version = version

    @torch.no_grad()
    def generate(
        self,
        contexts: list[list[int]],
        max_new_tokens: list[int],
        stop_ids: set[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: rng.Generators = None,
    ) -> list[TurnOutput]:
        self._check_weights()
        out: list[TurnOutput] = []
        for start in range(0, len(contexts), self.batch_size):
            end = start + self.batch_size
            batch = contexts[start:end], max_new_tokens[start:end]
            out.extend(self._generate_batch(*batch, stop_ids, temperature, greedy, rng.rows(generator, start, end)))
        return out

    @torch.no_grad()
    def next_token_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """float32 logits (batch, vocab) of the token after each context, computed as generation computes them."""
        self._check_weights()
        _, logits, _, _, _ = self._prefill(contexts, capacity=max(len(c) for c in contexts))
        return logits

    def _forward(self, cache: KVBuffer, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor,
                 max_position: int | None = None) -> torch.Tensor:
        """ids, positions: (batch, q_len); bias: (batch, 1, q_len, width) float32, 0 where a slot attends and -inf
        where it does not. The tokens' KV go where `cache` was planned. Returns float32 logits (batch, vocab) of
        the last slot."""
        if self.forward == "fused":
            return self._fused.forward(ids, positions, cache, bias, max_position)
        if self.forward == "lean":
            return llama_forward.forward(self.model, ids, positions, cache, bias)
        dtype = next(self.model.parameters()).dtype
        mask = bias.to(dtype).clamp(min=torch.finfo(dtype).min)  # eager attention adds it: keep it finite
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: cache})
        return res.logits[:, -1, :].float()

    def _prefill(self, contexts: list[list[int]], capacity: int):
        """Feed each distinct context's uncached suffix in one batched pass; fork rows of repeated contexts.

        Every context is stored from column 0, so a token's cache column is its position. Returns (cache over
        len(contexts) rows, float32 logits (batch, vocab), per-row prefilled token counts, per-row id of the
        prefix-cache entry the row extended in full or None).
        """
        dev = self.device
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(c), len(unique)) for c in contexts]
        distinct = [list(c) for c in unique]
        hits = [self.prefix_cache.longest(c) for c in distinct]
        cached = [min(n, len(c) - 1) for c, (_, n) in zip(distinct, hits, strict=True)]
        suffix = [len(c) - n for c, n in zip(distinct, cached, strict=True)]
        width_q = max(suffix)

        cache = KVBuffer(len(distinct), capacity, self._num_layers, self._pools[0])
        # the cached segments each distinct context starts from, taken now: entries may be evicted by the time
        # this call's own entries (which share them) are made
        bases = [self.prefix_cache.entries[key].first(n) if n else [] for (key, _), n in zip(hits, cached, strict=True)]
        if any(cached):
            sample = next(b for b in bases if b)[0]
            _, _, heads, _, dim = sample.shape
            cache.allocate(heads, dim, sample.dtype, dev)
            for i, segments in enumerate(bases):
                start = 0
                for seg in segments:
                    cache.data[:, :, i, :, start : start + seg.shape[3]] = seg
                    start += seg.shape[3]

        ids = torch.full((len(distinct), width_q), self.pad_id, dtype=torch.long)
        positions = torch.full((len(distinct), width_q), capacity, dtype=torch.long)  # padding → scratch column
        for i, (c, n, s) in enumerate(zip(distinct, cached, suffix, strict=True)):
            ids[i, width_q - s :] = torch.tensor(c[n:])  # suffixes end in the last slot: logits_to_keep=1
            positions[i, width_q - s :] = torch.arange(n, n + s)
        ids, positions = ids.to(dev), positions.to(dev)
        # padding slots write to the scratch column but must attend somewhere: column 0
        attend = torch.where(positions == capacity, 0, positions)
        width = max(len(c) for c in distinct)

        def causal_bias() -> torch.Tensor:  # (distinct, 1, width_q, width): each slot sees its row up to itself
            return _bias((torch.arange(width, device=dev)[None, None, :] <= attend[:, :, None])[:, None])

        if self.forward == "fused" and sum(suffix) < len(distinct) * width_q:  # uneven suffixes: pack them
            real = (positions != capacity).flatten()
            slots = real.nonzero().squeeze(1)
            rows = torch.arange(len(distinct), device=dev).repeat_interleave(width_q)[slots]
            flat_pos = positions.flatten()[slots]
            last = torch.tensor(suffix, device=dev).cumsum(0) - 1
            cache.plan(width, cols=flat_pos, rows=rows)
            # the compiled kernel attends causally by position and never reads a bias
            bias = None if self._fused.packed_kernel else causal_bias()
            logits = self._fused.forward(ids.flatten()[slots], flat_pos, cache, bias, width,
                                         packed=(slots, len(distinct), width_q, last))
        else:
            cache.plan(width, cols=positions)
            logits = self._forward(cache, ids, attend, causal_bias())

        prefilled = [0] * len(contexts)
        extended: list[int | None] = [None] * len(contexts)
        seen = set()
        for row, u in enumerate(row_of):
            if u not in seen:  # a repeated context is fed once; its copies cost nothing
                seen.add(u)
                prefilled[row] = suffix[u]
                key, n = hits[u]
                if key is not None and n == len(self.prefix_cache.entries[key].tokens):
                    extended[row] = key
        if len(distinct) < len(contexts):
            index = torch.tensor(row_of, device=dev)
            cache.select_rows(index, self._pools[1])
            logits = logits.index_select(0, index)
        origins = [(bases[u], cached[u]) for u in row_of]
        return cache, logits, prefilled, extended, origins

    def _generate_batch(self, contexts, max_new, stop_ids, temperature, greedy, generator) -> list[TurnOutput]:
        """Prefill, then decode. Decode step t writes every row's token to the same column `width + t` (width:
        the longest context), so a step's cache write is one slice; row i attends to its context columns
        [0, len_i) and to the decode columns [width, width + t], and its token's position is len_i + t.

        A finished row keeps decoding (harmlessly; its extra tokens are cut here) until half the rows in the
        buffer have finished; then the finished ones hand their KV to the prefix cache and leave the buffer
        (`alive` maps buffer rows back to batch rows), so a turn does not pay for rows waiting on its longest."""
        self.model.eval()
        dev = self.device
        b = len(contexts)
        steps = max(max(max_new), 0)
        width = max(len(c) for c in contexts)
        capacity = width + steps
        cache, logits, prefilled, extended, origins = self._prefill(contexts, capacity)
        lengths_ctx = torch.tensor([len(c) for c in contexts], device=dev)
        columns = torch.arange(capacity, device=dev)
        bias = _bias((columns[None, :] < lengths_ctx[:, None]) | (columns[None, :] >= width))[:, None, None]
        uniforms = None if greedy else rng.uniforms(generator, b, max(steps, 1), dev)
        top_position = width + steps

        last_step = torch.tensor(max_new, device=dev) - 1  # a row's last allowed step
        stops = torch.tensor(sorted(stop_ids | {self.eos_id}), dtype=torch.long, device=dev)
        tokens = torch.zeros((b, max(steps, 1)), dtype=torch.long, device=dev)
        logps = torch.zeros((b, max(steps, 1)), device=dev)
        finished = last_step < 0
        alive = torch.arange(b, device=dev)
        kept: list[int] = list(range(b))  # `alive` as a list: batch rows still in the buffer
        turns: dict[int, TurnOutput] = {}
        for t in range(steps):
            logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
            nxt = logp.argmax(-1) if greedy else rng.inverse_cdf(logp, uniforms[:, t])
            tokens[alive, t] = nxt
            logps[alive, t] = logp.gather(1, nxt[:, None]).squeeze(1)
            finished |= torch.isin(nxt, stops) | (last_step <= t)
            n_finished = int(finished.sum())
            if t == steps - 1 or n_finished == len(kept):
                break
            if 2 * n_finished >= len(kept) >= COMPACT_MIN_ROWS:
                leaving = finished.nonzero().squeeze(1)
                stay = (~finished).nonzero().squeeze(1)
                rows_out = [kept[i] for i in leaving.tolist()]
                turns.update(self._finish(rows_out, leaving, contexts, tokens, logps, t + 1, max_new, stop_ids,
                                          prefilled, extended, origins, cache, width))
                cache.select_rows(stay, self._pools[1] if cache.pool is self._pools[0] else self._pools[0])
                kept = [kept[i] for i in stay.tolist()]
                alive, nxt, lengths_ctx, bias, last_step, finished = (
                    x.index_select(0, stay) for x in (alive, nxt, lengths_ctx, bias, last_step, finished))
                if uniforms is not None:
                    uniforms = uniforms.index_select(0, stay)
            cache.plan(width + t + 1, col=width + t)
            logits = self._forward(cache, nxt[:, None], (lengths_ctx + t)[:, None], bias[..., : width + t + 1],
                                   top_position)
        turns.update(self._finish(kept, torch.arange(len(kept), device=dev), contexts, tokens, logps, steps,
                                  max_new, stop_ids, prefilled, extended, origins, cache, width))
        return [turns[i] for i in range(b)]

    def _finish(self, rows, buffer_rows, contexts, tokens, logps, decoded, max_new, stop_ids, prefilled, extended,
                origins, cache: KVBuffer, width: int) -> dict[int, TurnOutput]:
        """Turn outputs of batch rows `rows` (in the buffer at `buffer_rows`) after `decoded` decode steps, and
        their KV (context + generated tokens fed back) kept for later calls: the cached segments a row started
        from, shared, plus one gathered segment of what this call computed for it."""
        tokens_l = tokens[rows, :decoded].tolist()
        logps_l = logps[rows, :decoded].tolist()
        out = {}
        for i, toks, lps in zip(rows, tokens_l, logps_l, strict=True):
            turn = _cut(toks[: max(max_new[i], 0)], stop_ids, self.eos_id)
            turn.logprobs, turn.prefilled = lps[: len(turn.tokens)], prefilled[i]
            out[i] = turn
        if self.prefix_cache.max_bytes <= 0 or not cache.layers:
            return out
        for i in rows:  # superseded by the longer sequences stored below
            if extended[i] is not None:
                self.prefix_cache.remove(extended[i])
        fed = [max(len(out[i].tokens) - 1, 0) for i in rows]
        runs = []  # per row: the context columns it computed here, then the decode columns it fed
        for j, i, f in zip(buffer_rows.tolist(), rows, fed, strict=True):
            runs += [(j, origins[i][1], len(contexts[i])), (j, width, width + f)]
        kv = cache.gather(runs)
        start = 0
        for i, f in zip(rows, fed, strict=True):
            base, n = origins[i]
            end = start + len(contexts[i]) - n + f
            self.prefix_cache.add(list(contexts[i]) + out[i].tokens[:f], base + [kv[:, :, :, start:end]])
            start = end
        return out


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean attend/not → float32 additive attention bias (0 / -inf), same shape."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _cut(tokens: list[int], stop_ids: set[int], eos_id: int) -> TurnOutput:
    """A row's turn: its tokens up to and including the first stop token or EOS, else all of them (length)."""
    for n, tok in enumerate(tokens):
        if tok == eos_id:
            return TurnOutput(tokens[: n + 1], [], "eos")
        if tok in stop_ids:
            return TurnOutput(tokens[: n + 1], [], "stop")
    return TurnOutput(tokens, [], "length")
