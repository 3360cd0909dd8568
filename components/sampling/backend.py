"""Hugging Face generation backend: one agent turn for a batch of contexts, with behaviour log-probs.

The interface is deliberately narrow (token ids in, token ids + log-probs out) so another engine (see
`vllm_backend.py`) can stand in for it.

How a batch is computed, and why:
* **Preallocated KV cache.** Keys/values live in one buffer per layer, allocated once per batch at its final
  width and written in place; decoding never concatenates (with `DynamicCache` most of a tiny model's decode
  time went to `torch.cat`). Every row is stored from column 0 with no padding in front, so a token's cache
  column is its position; the attention mask is built here, one boolean row per sequence.
* **Prefix reuse.** The backend keeps the KV of what it computed in earlier calls (the context and the
  generated tokens it fed) and, for a new context, copies the longest cached common prefix and feeds only the
  rest — the next turn of an episode feeds just the observation, and a tree expansion from an intermediate node
  feeds nothing it computed before. Identical contexts within a call (the M trees of a prompt, a node drawn
  twice) are prefilled once and their cache rows repeated. The cache is dropped whenever a parameter of the
  model changes (tracked by tensor version counters), and is bounded by `prefix_cache_mb`.
* Logits are cast to float32 before the softmax, so bf16 models sample from float32 probabilities.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from components.sampling import llama_forward, rng

MIN_PREFIX = 8  # contexts are looked up in the prefix cache by their first MIN_PREFIX tokens


@dataclass
class TurnOutput:
    tokens: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution
    stop: str  # "stop" (a stop token), "eos", or "length" (hit max_new_tokens)
    prefilled: int | None = None  # context tokens actually fed to the model for this row (None: unknown)


class KVBuffer:
    """Preallocated keys/values for a batch, passed to the model as its `cache`.

    Per layer one tensor of shape (2, batch, kv_heads, capacity + 1, head_dim); column `capacity` is scratch
    space for padding slots. Before each forward, `plan` says where this forward's tokens go (`cols`, shape
    (batch, q_len)) and how many columns attention reads (`width`); each layer's `update` writes there and
    returns views of the first `width` columns.
    """

    def __init__(self, batch: int, capacity: int):
        self.batch, self.capacity = batch, capacity
        self.layers: list[torch.Tensor] = []
        self.cols: torch.Tensor | None = None
        self.width = 0

    def allocate(self, num_layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (2, self.batch, heads, self.capacity + 1, head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def plan(self, cols: torch.Tensor, width: int) -> None:
        self.cols, self.width = cols, width
        self._rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key/value_states: (batch, kv_heads, q_len, head_dim) → views (batch, kv_heads, width, head_dim)."""
        while layer_idx >= len(self.layers):  # allocated lazily when no cached prefix fixed the shapes first
            _, heads, _, dim = key_states.shape
            shape = (2, self.batch, heads, self.capacity + 1, dim)
            self.layers.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
        buf = self.layers[layer_idx]
        buf[0][self._rows, :, self.cols] = key_states.transpose(1, 2)
        buf[1][self._rows, :, self.cols] = value_states.transpose(1, 2)
        return buf[0, :, :, : self.width], buf[1, :, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (batch' entries, repeats allowed): the KV fork of shared prefixes."""
        self.layers = [buf.index_select(1, index) for buf in self.layers]
        self.batch = int(index.numel())

    def row(self, i: int, length: int) -> torch.Tensor:
        """A compact copy of row i's first `length` columns: (layers, 2, kv_heads, length, head_dim)."""
        return torch.stack([buf[:, i, :, :length] for buf in self.layers])


@dataclass
class _Entry:
    tokens: list[int]
    kv: torch.Tensor  # (layers, 2, kv_heads, len(tokens), head_dim)


class PrefixCache:
    """KV of previously computed token sequences, found by longest common prefix; oldest evicted first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.buckets: dict[tuple[int, ...], set[int]] = {}
        self.bytes = 0
        self._next = 0

    def clear(self) -> None:
        self.entries.clear()
        self.buckets.clear()
        self.bytes = 0

    def longest(self, tokens: list[int]) -> tuple[int | None, int]:
        """(entry id, common prefix length) of the entry sharing the longest prefix with `tokens`."""
        best, best_len = None, 0
        if len(tokens) < MIN_PREFIX:
            return best, best_len
        for key in self.buckets.get(tuple(tokens[:MIN_PREFIX]), ()):
            cached = self.entries[key].tokens
            n = min(len(cached), len(tokens))
            i = MIN_PREFIX
            while i < n and cached[i] == tokens[i]:
                i += 1
            if i > best_len:
                best, best_len = key, i
        return best, best_len

    def add(self, tokens: list[int], kv: torch.Tensor) -> None:
        if len(tokens) < MIN_PREFIX or self.max_bytes <= 0:
            return
        key, self._next = self._next, self._next + 1
        self.entries[key] = _Entry(tokens, kv)
        self.buckets.setdefault(tuple(tokens[:MIN_PREFIX]), set()).add(key)
        self.bytes += kv.numel() * kv.element_size()
        while self.bytes > self.max_bytes and self.entries:
            self.remove(next(iter(self.entries)))

    def remove(self, key: int) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self.buckets[tuple(entry.tokens[:MIN_PREFIX])].discard(key)
        self.bytes -= entry.kv.numel() * entry.kv.element_size()


class HFBackend:
    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        eos_id: int,
        batch_size: int = 256,
        prefix_cache_mb: float = 512.0,
        lean_forward: bool | None = None,
    ):
        """`prefix_cache_mb`: memory for KV reused across calls (0 disables it); `lean_forward`: use the lean
        Llama-family forward (None: whenever the model supports it)."""
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.batch_size = batch_size
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self._weights_version: tuple | None = None
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"HFBackend needs sdpa or eager attention (it passes its own 4D masks), got {impl!r}")
        self._bool_mask = impl == "sdpa"
        self.lean_forward = llama_forward.supports(model) if lean_forward is None else lean_forward
        if self.lean_forward and not llama_forward.supports(model):
            raise ValueError(f"lean forward requested but {type(model).__name__} is not a supported Llama-family model")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self) -> None:
        self.prefix_cache.clear()

    def _check_weights(self) -> None:
        """Drop cached prefixes when any parameter was replaced or changed in place since the last call."""
        version = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if version != self._weights_version:
            self.prefix_cache.clear()
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
        _, logits, _, _ = self._prefill(contexts, capacity=max(len(c) for c in contexts))
        return logits

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """(batch, q_len, width) booleans → the 4D mask the model's attention takes."""
        allowed = allowed[:, None]
        if self._bool_mask:
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _forward(self, cache: KVBuffer, ids: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor,
                 width: int) -> torch.Tensor:
        """ids, positions, attend: (batch, q_len). Writes KV at column `positions`; a slot sees columns <= its
        `attend` (its position; 0 for padding). Returns float32 logits (batch, vocab) of the last slot."""
        cache.plan(positions, width)
        cols = torch.arange(width, device=ids.device)
        allowed = cols[None, None, :] <= attend[:, :, None]
        if self.lean_forward:
            bias = torch.zeros(allowed.shape, device=ids.device).masked_fill_(~allowed, float("-inf"))
            return llama_forward.forward(self.model, ids, attend, cache, bias[:, None])
        mask = self._mask(allowed)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=attend, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return res.logits[:, -1, :].float()

    def _prefill(self, contexts: list[list[int]], capacity: int):
        """Feed each distinct context's uncached suffix in one batched pass; fork rows of repeated contexts.

        Returns (cache over len(contexts) rows, float32 logits (batch, vocab), per-row prefilled token counts,
        per-row id of the prefix-cache entry the row extended in full or None).
        """
        dev = self.device
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(c), len(unique)) for c in contexts]
        distinct = [list(c) for c in unique]
        hits = [self.prefix_cache.longest(c) for c in distinct]
        cached = [min(n, len(c) - 1) for c, (_, n) in zip(distinct, hits, strict=True)]
        suffix = [len(c) - n for c, n in zip(distinct, cached, strict=True)]
        width_q = max(suffix)

        cache = KVBuffer(len(distinct), capacity)
        if any(cached):
            first = self.prefix_cache.entries[next(k for k, _ in hits if k is not None)].kv
            layers, _, heads, _, dim = first.shape
            cache.allocate(layers, heads, dim, first.dtype, dev)
            for i, ((key, _), n) in enumerate(zip(hits, cached, strict=True)):
                if n:
                    kv = self.prefix_cache.entries[key].kv
                    for layer, buf in enumerate(cache.layers):
                        buf[:, i, :, :n] = kv[layer, :, :, :n]

        ids = torch.full((len(distinct), width_q), self.pad_id, dtype=torch.long)
        positions = torch.full((len(distinct), width_q), capacity, dtype=torch.long)  # padding → scratch column
        for i, (c, n, s) in enumerate(zip(distinct, cached, suffix, strict=True)):
            ids[i, width_q - s :] = torch.tensor(c[n:])  # suffixes end in the last slot: logits_to_keep=1
            positions[i, width_q - s :] = torch.arange(n, n + s)
        ids, positions = ids.to(dev), positions.to(dev)
        # padding slots write to the scratch column but must attend somewhere: column 0
        attend = torch.where(positions == capacity, 0, positions)
        logits = self._forward(cache, ids, positions, attend, max(len(c) for c in distinct))

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
            cache.select_rows(index)
            logits = logits.index_select(0, index)
        return cache, logits, prefilled, extended

    def _generate_batch(self, contexts, max_new, stop_ids, temperature, greedy, generator) -> list[TurnOutput]:
        self.model.eval()
        dev = self.device
        b = len(contexts)
        steps = max(max(max_new), 0)
        capacity = max(len(c) for c in contexts) + steps
        cache, logits, prefilled, extended = self._prefill(contexts, capacity)
        lengths_ctx = torch.tensor([len(c) for c in contexts], device=dev)
        width = max(len(c) for c in contexts)

        limits = torch.tensor(max_new, device=dev)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
        tokens = torch.zeros((b, max(steps, 1)), dtype=torch.long, device=dev)
        logps = torch.zeros((b, max(steps, 1)), device=dev)
        lengths = torch.zeros(b, dtype=torch.long, device=dev)
        done = limits <= 0
        stop_kind = torch.zeros(b, dtype=torch.long, device=dev)  # 0 length, 1 stop, 2 eos
        for t in range(steps):
            logp = torch.log_softmax(logits / temperature, dim=-1)
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = rng.sample_next(logp, generator)
            live = ~done
            tokens[:, t] = torch.where(live, nxt, 0)
            logps[:, t] = torch.where(live, logp.gather(-1, nxt[:, None]).squeeze(-1), 0.0)
            lengths += live.long()
            hit_stop = live & torch.isin(nxt, stops)
            hit_eos = live & (nxt == self.eos_id)
            stop_kind = torch.where(hit_stop, 1, stop_kind)
            stop_kind = torch.where(hit_eos, 2, stop_kind)
            done = done | hit_stop | hit_eos | (lengths >= limits)
            if t == steps - 1 or bool(done.all()):
                break
            positions = (lengths_ctx + t)[:, None]  # every row feeds its token t, done rows harmlessly
            logits = self._forward(cache, nxt[:, None], positions, positions, width + t + 1)

        kinds = {0: "length", 1: "stop", 2: "eos"}
        tokens_l, logps_l, lengths_l, kinds_l = tokens.tolist(), logps.tolist(), lengths.tolist(), stop_kind.tolist()
        result = []
        for i in range(b):
            n = lengths_l[i]
            result.append(TurnOutput(tokens_l[i][:n], logps_l[i][:n], kinds[kinds_l[i]], prefilled[i]))
        self._remember(contexts, tokens_l, lengths_l, cache, extended)
        return result

    def _remember(self, contexts, tokens, lengths, cache: KVBuffer, extended) -> None:
        """Keep each row's computed KV (context + generated tokens fed back) for later calls."""
        if self.prefix_cache.max_bytes <= 0 or not cache.layers:
            return
        for key in extended:  # superseded by the longer sequences stored below
            if key is not None:
                self.prefix_cache.remove(key)
        for i, (c, n) in enumerate(zip(contexts, lengths, strict=True)):
            fed = list(c) + tokens[i][: max(n - 1, 0)]
            self.prefix_cache.add(fed, cache.row(i, len(fed)))
