"""The in-process generation engine (`sampling.backend: hf`): one agent turn for a batch of contexts, with
behaviour log-probs, behind the `GenerationBackend` contract.

A call prefills (see `prefill`: cached prefixes reused, identical contexts fed once), then decodes: step t writes
every row's token to the one buffer column `width + t` (see `kv_cache`), with one of three forwards — fused
(`fused_forward`), lean (`lean_forward`) or the model's own. Once half the rows in the buffer have finished, the
finished ones hand their KV to the prefix cache and leave, so a turn stops paying for rows that wait on its longest.
The prefix cache is dropped whenever a parameter of the model changes (tensor version counters). Logits are cast to
float32 before the softmax, so bf16 models sample from float32 probabilities.

Stop tokens and EOS are checked on the device. Stop strings (`StopStrings`) are checked on the host: with them, each
decode step copies its new tokens to the host and advances every row's text tail; without them the loop copies
nothing but its finished count.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from arborl.components.sampling import rng
from arborl.components.sampling.engine import lean_forward
from arborl.components.sampling.engine.fused_forward import FusedLlama
from arborl.components.sampling.engine.kv_cache import KVBuffer, KVPool, attention_bias
from arborl.components.sampling.engine.prefill import Prefilled, finish_prefill, plan_prefill
from arborl.components.sampling.engine.prefix_cache import PrefixCache
from arborl.components.sampling.generation import StopStrings, TurnOutput, cut_turn

FORWARDS = ("fused", "lean", "model")
COMPACT_MIN_ROWS = 16  # below this many rows a decode step costs about the same whatever the count


@dataclass
class _Turn:
    """A batch in its decode loop: the prefilled rows, what they may generate, and what they sampled so far
    (`tokens`, `logps`: (batch, steps), indexed by batch row)."""

    contexts: list[list[int]]
    max_new: list[int]
    stop_ids: set[int]
    stop_strings: StopStrings | None
    width: int
    pre: Prefilled
    tokens: torch.Tensor
    logps: torch.Tensor


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
        computed — "fused" (`FusedLlama`: folded, concatenated weights; float32 only), "lean" (the Llama modules
        without Hugging Face's per-call machinery) or "model" (the model's own forward); None picks the first of
        these the model supports."""
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.batch_size = batch_size
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self._weights_version: tuple | None = None
        self._fused: FusedLlama | None = None
        self._num_layers = model.config.num_hidden_layers
        self._pools = (KVPool(), KVPool())  # a call's distinct-context buffer, and its rows after the fork
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"HFBackend needs sdpa or eager attention (it passes its own 4D masks), got {impl!r}")
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns where the new one exists)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        available = {"model": True, "lean": lean_forward.supports(model), "fused": FusedLlama.supports(model)}
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
        return self._fused.packed_kernel

    def clear_cache(self) -> None:
        self.prefix_cache.clear()

    def _check_weights(self) -> None:
        """Drop cached prefixes (and rebuild fused weights) when any parameter was replaced or changed in place
        since the last call."""
        version = tuple((p.data_ptr(), p._version, p.device) for p in self.model.parameters())
        if version != self._weights_version:
            self.prefix_cache.clear()
            if self.forward == "fused" and not FusedLlama.supports(self.model):
                raise ValueError("the model changed into one the fused forward does not support (it needs float32 "
                                 "plain linear layers); make a new HFBackend with forward='lean'")
            self._fused = FusedLlama(self.model) if self.forward == "fused" else None
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
        *,
        stop_strings: StopStrings | None = None,
    ) -> list[TurnOutput]:
        """See `GenerationBackend.generate`; contexts go through in batches of `batch_size`."""
        self._check_weights()
        out: list[TurnOutput] = []
        for start in range(0, len(contexts), self.batch_size):
            end = start + self.batch_size
            batch = contexts[start:end], max_new_tokens[start:end]
            out.extend(self._generate_batch(*batch, stop_ids, temperature, greedy, rng.rows(generator, start, end),
                                            stop_strings))
        return out

    @torch.no_grad()
    def next_token_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """float32 logits (batch, vocab) of the token after each context, computed as generation computes them."""
        self._check_weights()
        return self._prefill(contexts, capacity=max(len(c) for c in contexts)).logits

    def _forward(self, cache: KVBuffer, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor,
                 max_position: int | None = None) -> torch.Tensor:
        """ids, positions: (batch, q_len); bias: (batch, 1, q_len, width) float32, 0 where a slot attends and -inf
        where it does not. The tokens' KV go where `cache` was planned. Returns float32 logits (batch, vocab) of
        the last slot."""
        if self.forward == "fused":
            return self._fused.forward(ids, positions, cache, bias, max_position)
        if self.forward == "lean":
            return lean_forward.forward(self.model, ids, positions, cache, bias)
        dtype = next(self.model.parameters()).dtype
        mask = bias.to(dtype).clamp(min=torch.finfo(dtype).min)  # eager attention adds it: keep it finite
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: cache})
        return res.logits[:, -1, :].float()

    def _prefill(self, contexts: list[list[int]], capacity: int) -> Prefilled:
        """Feed each distinct context's uncached suffix in one pass: packed (real tokens only) through the fused
        forward when suffixes are uneven, else over the padded grid."""
        plan = plan_prefill(contexts, capacity, self.prefix_cache, self.pad_id, self._num_layers, self._pools[0],
                            self.device)
        n, width_q = len(plan.distinct), plan.width_q
        if self.forward == "fused" and sum(plan.suffix) < n * width_q:
            slots = (plan.positions != capacity).flatten().nonzero().squeeze(1)
            rows = torch.arange(n, device=self.device).repeat_interleave(width_q)[slots]
            flat_pos = plan.positions.flatten()[slots]
            last = torch.tensor(plan.suffix, device=self.device).cumsum(0) - 1
            plan.cache.plan(plan.width, cols=flat_pos, rows=rows)
            # the compiled kernel attends causally by position and never reads a bias
            bias = None if self._fused.packed_kernel else plan.causal_bias()
            logits = self._fused.forward(plan.ids.flatten()[slots], flat_pos, plan.cache, bias, plan.width,
                                         packed=(slots, n, width_q, last))
        else:
            plan.cache.plan(plan.width, cols=plan.positions)
            logits = self._forward(plan.cache, plan.ids, plan.attend, plan.causal_bias())
        return finish_prefill(plan, logits, self.prefix_cache, self._pools[1])

    def _generate_batch(self, contexts: list[list[int]], max_new: list[int], stop_ids: set[int], temperature: float,
                        greedy: bool, generator: rng.Generators,
                        stop_strings: StopStrings | None = None) -> list[TurnOutput]:
        """Prefill, then decode. Row i attends to its context columns [0, len_i) and to the decode columns
        [width, width + t], and its token's position is len_i + t. A finished row keeps decoding (harmlessly; its
        extra tokens are cut) until half the rows in the buffer have finished; then the finished ones leave the
        buffer (`alive` maps buffer rows back to batch rows). With `stop_strings`, each batch row's text tail
        (`tails`, None once a stop string ended it) advances on the host by the token it sampled."""
        self.model.eval()
        dev = self.device
        b = len(contexts)
        steps = max(max(max_new), 0)
        width = max(len(c) for c in contexts)
        capacity = width + steps
        pre = self._prefill(contexts, capacity)
        cache, logits = pre.cache, pre.logits
        turn = _Turn(contexts, max_new, stop_ids, stop_strings, width, pre,
                     torch.zeros((b, max(steps, 1)), dtype=torch.long, device=dev),
                     torch.zeros((b, max(steps, 1)), device=dev))
        lengths_ctx = torch.tensor([len(c) for c in contexts], device=dev)
        columns = torch.arange(capacity, device=dev)
        bias = attention_bias((columns[None, :] < lengths_ctx[:, None]) | (columns[None, :] >= width))[:, None, None]
        uniforms = None if greedy else rng.uniforms(generator, b, max(steps, 1), dev)
        top_position = width + steps

        last_step = torch.tensor(max_new, device=dev) - 1  # a row's last allowed step
        stops = torch.tensor(sorted(stop_ids | {self.eos_id}), dtype=torch.long, device=dev)
        finished = last_step < 0
        alive = torch.arange(b, device=dev)
        kept: list[int] = list(range(b))  # `alive` as a list: batch rows still in the buffer
        tails: list[str | None] = [""] * b  # per batch row: its text tail for `stop_strings`
        outputs: dict[int, TurnOutput] = {}
        for t in range(steps):
            logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
            nxt = logp.argmax(-1) if greedy else rng.inverse_cdf(logp, uniforms[:, t])
            turn.tokens[alive, t] = nxt
            turn.logps[alive, t] = logp.gather(1, nxt[:, None]).squeeze(1)
            finished |= torch.isin(nxt, stops) | (last_step <= t)
            if stop_strings is not None:
                finished |= self._string_stops(stop_strings, tails, kept, nxt)
            n_finished = int(finished.sum())
            if t == steps - 1 or n_finished == len(kept):
                break
            if 2 * n_finished >= len(kept) >= COMPACT_MIN_ROWS:
                leaving = finished.nonzero().squeeze(1)
                stay = (~finished).nonzero().squeeze(1)
                outputs.update(self._finish(turn, [kept[i] for i in leaving.tolist()], leaving, t + 1))
                cache.select_rows(stay, self._pools[1] if cache.pool is self._pools[0] else self._pools[0])
                kept = [kept[i] for i in stay.tolist()]
                alive, nxt, lengths_ctx, bias, last_step, finished = (
                    x.index_select(0, stay) for x in (alive, nxt, lengths_ctx, bias, last_step, finished))
                if uniforms is not None:
                    uniforms = uniforms.index_select(0, stay)
            cache.plan(width + t + 1, col=width + t)
            logits = self._forward(cache, nxt[:, None], (lengths_ctx + t)[:, None], bias[..., : width + t + 1],
                                   top_position)
        outputs.update(self._finish(turn, kept, torch.arange(len(kept), device=dev), steps))
        return [outputs[i] for i in range(b)]

    @staticmethod
    def _string_stops(stop_strings: StopStrings, tails: list[str | None], kept: list[int],
                      nxt: torch.Tensor) -> torch.Tensor:
        """Advance the text tail of each row in the buffer (batch row `kept[j]` at buffer row j) by its new token
        `nxt` (buffer rows,); a row whose text now contains a stop string gets tail None. Returns (buffer rows,)
        bool on `nxt`'s device: the rows a stop string ended at this step."""
        hits = [False] * len(kept)
        for j, (i, tok) in enumerate(zip(kept, nxt.tolist(), strict=True)):
            tail = tails[i]
            if tail is not None:
                tails[i], hits[j] = stop_strings.advance(tail, tok)
                if hits[j]:
                    tails[i] = None
        return torch.tensor(hits, device=nxt.device)

    def _finish(self, turn: _Turn, rows: list[int], buffer_rows: torch.Tensor, decoded: int) -> dict[int, TurnOutput]:
        """Turn outputs of batch rows `rows` (in the buffer at `buffer_rows`) after `decoded` decode steps, and
        their KV (context + generated tokens fed back) kept for later calls: the cached segments a row started
        from, shared, plus one gathered segment of what this call computed for it."""
        pre, contexts = turn.pre, turn.contexts
        out = {}
        tokens, logps = turn.tokens[rows, :decoded].tolist(), turn.logps[rows, :decoded].tolist()
        for i, toks, lps in zip(rows, tokens, logps, strict=True):
            result = cut_turn(toks[: max(turn.max_new[i], 0)], turn.stop_ids, self.eos_id, turn.stop_strings)
            result.logprobs, result.prefilled = lps[: len(result.tokens)], pre.prefilled[i]
            out[i] = result
        if self.prefix_cache.max_bytes <= 0 or not pre.cache.layers:
            return out
        for i in rows:  # superseded by the longer sequences stored below
            if pre.extended[i] is not None:
                self.prefix_cache.remove(pre.extended[i])
        fed = [max(len(out[i].tokens) - 1, 0) for i in rows]
        runs = []  # per row: the context columns it computed here, then the decode columns it fed
        for j, i, f in zip(buffer_rows.tolist(), rows, fed, strict=True):
            runs += [(j, pre.origins[i][1], len(contexts[i])), (j, turn.width, turn.width + f)]
        kv = pre.cache.gather(runs)
        start = 0
        for i, f in zip(rows, fed, strict=True):
            base, n = pre.origins[i]
            end = start + len(contexts[i]) - n + f
            self.prefix_cache.add(list(contexts[i]) + out[i].tokens[:f], base + [kv[:, :, :, start:end]])
            start = end
        return out
