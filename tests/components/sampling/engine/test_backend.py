"""components.sampling.engine.HFBackend: batched, KV-cached generation vs a naive reference, for each of its
three forwards (fused, lean, the model's own), and turns that stop on stop strings spelled across tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from arborl.components.sampling.engine import FORWARDS, HFBackend, cpu_kernels
from arborl.components.sampling.engine.fused_forward import FusedLlama
from arborl.components.sampling.engine.prefix_cache import MIN_PREFIX, PrefixCache
from arborl.components.sampling.generation import StopStrings, cut_turn, token_pieces
from arborl.components.sampling.rng import row_generators
from tests.components.sampling.test_generation import (
    TAGS,
    bpe_tokenizer,
    chain_model,
    spelled_tags,
    tiny_llama,
    tiny_qwen2,
)


def _contexts(tokenizer) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    lo, hi = 4, len(tokenizer)  # skip the special tokens
    return [[tokenizer.bos_token_id] + torch.randint(lo, hi, (n,), generator=g).tolist() for n in (7, 2, 12, 4)]


@torch.no_grad()
def _reference_greedy(model, context, steps, temperature=1.0):
    """Full forward pass over the whole sequence at every step: no cache, no padding."""
    ids, logps, margins = list(context), [], []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        nxt = int(logp.argmax())
        ids.append(nxt)
        logps.append(float(logp[nxt]))
    return ids[len(context):], logps, min(margins, default=float("inf"))


@torch.no_grad()
def _teacher_forced_logps(model, context, tokens, temperature=1.0):
    ids = torch.tensor([context + tokens])
    logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return [float(logp[len(context) - 1 + i, t]) for i, t in enumerate(tokens)]


def _backend(model, tokenizer, batch_size=256, eos_id=None, forward=None):
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    return HFBackend(model, tokenizer.pad_token_id, eos, batch_size, forward=forward)


@pytest.fixture(params=[*FORWARDS, "fused-matmul"])
def forward(request, monkeypatch):
    """Each forward; "fused" decodes through the compiled attention kernel on a CPU, "fused-matmul" with the
    kernel switched off (its torch fallback)."""
    if request.param == "fused-matmul":
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
        return "fused"
    return request.param


def test_the_default_forward_is_fused_for_a_float32_llama(peaked_model, tokenizer):
    assert _backend(peaked_model, tokenizer).forward == "fused"
    with pytest.raises(ValueError, match="forward must be one of"):
        _backend(peaked_model, tokenizer, forward="compiled")


@pytest.mark.parametrize("batch_size", [256, 3])
def test_greedy_batch_equals_single_and_naive_reference(peaked_model, tokenizer, batch_size, forward):
    contexts = _contexts(tokenizer)
    steps = 6
    backend = _backend(peaked_model, tokenizer, batch_size, eos_id=-1, forward=forward)
    batched = backend.generate(contexts, [steps] * len(contexts), set(), greedy=True)
    for ctx, out in zip(contexts, batched, strict=True):
        ref_tokens, ref_logps, margin = _reference_greedy(peaked_model, ctx, steps)
        assert margin > 1e-3, "reference too close to a tie to compare argmax choices"
        assert out.tokens == ref_tokens
        assert out.logprobs == pytest.approx(ref_logps, abs=1e-4)
        assert out.stop == "length"
        alone = backend.generate([ctx], [steps], set(), greedy=True)[0]
        assert alone.tokens == out.tokens
        assert alone.logprobs == pytest.approx(out.logprobs, abs=5e-5)  # reuses the batch's cached prefix


def test_greedy_logprobs_are_of_the_tempered_distribution(peaked_model, tokenizer):
    contexts = _contexts(tokenizer)
    backend = _backend(peaked_model, tokenizer, eos_id=-1)
    outs = backend.generate(contexts, [4] * len(contexts), set(), temperature=2.0, greedy=True)
    for ctx, out in zip(contexts, outs, strict=True):
        ref_tokens, ref_logps, _ = _reference_greedy(peaked_model, ctx, 4, temperature=2.0)
        assert out.tokens == ref_tokens
        assert out.logprobs == pytest.approx(ref_logps, abs=1e-4)


def test_stops_at_a_stop_id_and_at_eos(peaked_model, tokenizer, forward):
    ctx = _contexts(tokenizer)[0]
    steps = 8
    ref_tokens, _, _ = _reference_greedy(peaked_model, ctx, steps)
    # the first token that did not occur before it in the greedy continuation
    k = next(i for i in range(1, steps) if ref_tokens[i] not in ref_tokens[:i])
    stop = ref_tokens[k]

    out = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward).generate([ctx], [steps], {stop}, greedy=True)[0]
    assert out.tokens == ref_tokens[: k + 1]  # the stop token is included
    assert out.stop == "stop"
    assert len(out.logprobs) == k + 1

    eos_backend = _backend(peaked_model, tokenizer, eos_id=stop, forward=forward)
    out = eos_backend.generate([ctx], [steps], set(), greedy=True)[0]
    assert out.tokens == ref_tokens[: k + 1]
    assert out.stop == "eos"
    out = eos_backend.generate([ctx], [steps], {stop}, greedy=True)[0]  # both: EOS wins, as the episode ends
    assert out.stop == "eos"


def test_one_sequence_stopping_does_not_disturb_the_others(peaked_model, tokenizer, forward):
    contexts = _contexts(tokenizer)
    steps = 6
    refs = [_reference_greedy(peaked_model, c, steps)[0] for c in contexts]
    stop = refs[1][0]  # the second context stops after its first token
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    outs = backend.generate(contexts, [steps] * len(contexts), {stop}, greedy=True)
    for ref, out in zip(refs, outs, strict=True):
        expected = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert out.tokens == expected
        assert out.stop == ("stop" if stop in ref else "length")


def test_respects_per_sequence_max_new_tokens(peaked_model, tokenizer, forward):
    contexts = _contexts(tokenizer)
    limits = [3, 1, 0, 5]
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    outs = backend.generate(contexts, limits, set(), greedy=True)
    for ctx, limit, out in zip(contexts, limits, outs, strict=True):
        assert len(out.tokens) == len(out.logprobs) == limit
        assert out.tokens == _reference_greedy(peaked_model, ctx, limit)[0]
        assert out.stop == "length"


def test_sampling_is_reproducible_and_logprobs_match_the_sampled_tokens(peaked_model, tokenizer, forward):
    contexts = _contexts(tokenizer)
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    limits = [10] * len(contexts)

    def sample(seed, temperature=1.5):
        return backend.generate(contexts, limits, set(), temperature, False, torch.Generator().manual_seed(seed))

    a, b, c = sample(11), sample(11), sample(12)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]
    for ctx, out in zip(contexts, a, strict=True):
        assert out.logprobs == pytest.approx(_teacher_forced_logps(peaked_model, ctx, out.tokens, 1.5), abs=1e-4)


def test_sampling_follows_the_model_distribution(peaked_model, tokenizer):
    """The empirical first-token frequencies over many draws match softmax(logits / T)."""
    ctx = _contexts(tokenizer)[1]
    n = 4000
    backend = _backend(peaked_model, tokenizer, batch_size=n, eos_id=-1)
    outs = backend.generate([ctx] * n, [1] * n, set(), 3.0, False, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([o.tokens[0] for o in outs]), minlength=len(tokenizer)).double() / n
    with torch.no_grad():
        probs = torch.softmax(peaked_model(input_ids=torch.tensor([ctx])).logits[0, -1].double() / 3.0, -1)
    assert float((counts - probs).abs().sum()) < 0.15  # total variation (×2) well below chance mismatch


def test_eval_mode_is_restored_and_no_grad(peaked_model, tokenizer):
    peaked_model.train()
    out = _backend(peaked_model, tokenizer).generate([[tokenizer.bos_token_id]], [2], set(), greedy=True)
    assert len(out) == 1 and not peaked_model.training


# --- preallocated cache, the three forwards and prefix reuse ------------------------------------------------


def test_next_token_logits_equal_the_models(peaked_model, tokenizer, forward):
    """Against the model's forward in float64: on this large-weight model two float32 computations in different
    orders differ by up to ~1e-4 (the model's own float32 forward is ~9e-5 off the float64 one), so the exact
    reference, not another rounding of it, is what each forward is held to."""
    contexts = _contexts(tokenizer)
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    assert backend.forward == forward
    logits = backend.next_token_logits(contexts)
    exact = copy.deepcopy(peaked_model).double()
    with torch.no_grad():
        ref = torch.stack([exact(input_ids=torch.tensor([c])).logits[0, -1] for c in contexts])
    torch.testing.assert_close(logits.double(), ref, rtol=0, atol=1e-4)


def test_greedy_tokens_equal_model_generate(peaked_model, tokenizer, forward):
    contexts = _contexts(tokenizer)
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    outs = backend.generate(contexts, [8] * len(contexts), set(), greedy=True)
    for ctx, out in zip(contexts, outs, strict=True):
        ref = peaked_model.generate(input_ids=torch.tensor([ctx]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        assert out.tokens == ref[0, len(ctx):].tolist()


def test_forked_continuations_equal_full_recomputation(peaked_model, tokenizer, forward):
    """A chain is generated; then branches from an intermediate point and from its end (twice) reuse its cached
    keys/values. Their logits, tokens and log-probs equal a cache-free backend and a full forward pass, and
    `prefilled` counts exactly the tokens fed."""
    ctx = _contexts(tokenizer)[2]  # 13 tokens
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    chain = backend.generate([ctx], [6], set(), greedy=True)[0]
    assert chain.prefilled == len(ctx)
    branch_mid = ctx + chain.tokens[:3] + [7, 9]  # forks after 3 generated tokens
    branch_end = ctx + chain.tokens + [11]
    contexts = [branch_mid, branch_end, branch_end]

    forked = backend.generate(contexts, [5] * 3, set(), greedy=True)
    plain = HFBackend(peaked_model, tokenizer.pad_token_id, -1, prefix_cache_mb=0, forward=forward)
    fresh = plain.generate(contexts, [5] * 3, set(), greedy=True)
    # the cached chain covers ctx + its first 5 tokens (the 6th was never fed back)
    assert [o.prefilled for o in forked] == [2, 2, 0]
    assert [o.prefilled for o in fresh] == [len(branch_mid), len(branch_end), 0]
    for c, a, b in zip(contexts, forked, fresh, strict=True):
        ref_tokens, ref_logps, margin = _reference_greedy(peaked_model, c, 5)
        assert margin > 1e-3
        assert a.tokens == b.tokens == ref_tokens
        assert a.logprobs == pytest.approx(ref_logps, abs=1e-4)
    with torch.no_grad():
        ref = torch.stack([peaked_model(input_ids=torch.tensor([c])).logits[0, -1] for c in contexts])
    torch.testing.assert_close(backend.next_token_logits(contexts), ref, rtol=0, atol=1e-4)


def test_prefix_cache_is_dropped_when_the_weights_change(peaked_model, tokenizer, forward):
    """...and the fused forward's folded weights are rebuilt from the new ones."""
    ctx = _contexts(tokenizer)[2]
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    first = backend.generate([ctx], [4], set(), greedy=True)[0]
    assert backend.generate([ctx + first.tokens], [1], set(), greedy=True)[0].prefilled == 1
    with torch.no_grad():
        peaked_model.lm_head.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    again = backend.generate([ctx + first.tokens], [1], set(), greedy=True)[0]
    assert again.prefilled == len(ctx) + len(first.tokens)
    with torch.no_grad():
        expected = peaked_model(input_ids=torch.tensor([ctx + first.tokens])).logits[0, -1].double().log_softmax(-1)
    assert again.logprobs[0] == pytest.approx(float(expected.max()), abs=1e-4)


def _random_model(cls, config_cls, **extra):
    torch.manual_seed(4)
    config = config_cls(vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128, **extra)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norm weights and biases too, so folding them is exercised
            p.normal_(0.0, 0.3 if p.dim() == 1 else (4 / p.shape[-1]) ** 0.5)
    return model


def test_prefix_cache_lookup_finds_the_longest_common_prefix_of_any_entry():
    """The block index against a scan of every entry: sequences sharing prefixes of every length (one template
    opening them all), shorter and longer than the query, some removed; the longest match (ties: the oldest
    entry) is found, and nothing under MIN_PREFIX tokens."""
    import random

    rng = random.Random(0)
    cache = PrefixCache(max_bytes=1 << 30)
    template = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    stored: dict[int, list[int]] = {}  # entry id → tokens
    for _ in range(300):
        base = stored[rng.choice(list(stored))] if stored and rng.random() < 0.7 else template
        tokens = base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        key = cache.add(tokens, [])
        assert (key is None) == (len(tokens) < MIN_PREFIX)
        if key is not None:
            stored[key] = tokens
        if stored and rng.random() < 0.2:
            gone = rng.choice(list(stored))
            cache.remove(gone)
            del stored[gone]

    def common(a, b):
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        return i

    queries = [stored[rng.choice(list(stored))][: rng.randrange(40)] + [rng.randrange(4) for _ in range(5)]
               for _ in range(300)]
    for query in queries + [template[:5], [9, 9, 9, 9, 9, 9, 9, 9, 9]]:
        lengths = {key: common(tokens, query) for key, tokens in stored.items()}
        best = max(lengths.values(), default=0)
        want = (min(k for k, v in lengths.items() if v == best), best) if best >= MIN_PREFIX else (None, 0)
        assert cache.longest(query) == want, query


@pytest.mark.parametrize(
    "make",
    [
        # grouped kv heads, q/k/v biases, a rope base other than 10,000
        lambda: _random_model(Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2, rope_theta=5e4),
        # linear rope scaling, untied head
        lambda: _random_model(LlamaForCausalLM, LlamaConfig, num_key_value_heads=4, tie_word_embeddings=False,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ],
    ids=["qwen2-gqa-bias", "llama-linear-rope"],
)
def test_fused_and_lean_forwards_match_other_llama_family_models(make, forward):
    """Logits and greedy continuations (with a cached prefix forked into repeated rows) equal the model's."""
    model = make()
    g = torch.Generator().manual_seed(5)
    contexts = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (9, 3, 17, 9)]
    backend = HFBackend(model, 0, -1, forward=forward)
    with torch.no_grad():
        ref = torch.stack([model(input_ids=torch.tensor([c])).logits[0, -1] for c in contexts])
    torch.testing.assert_close(backend.next_token_logits(contexts), ref, rtol=0, atol=1e-4)
    first = backend.generate(contexts, [6] * 4, set(), greedy=True)
    again = backend.generate([c + o.tokens for c, o in zip(contexts, first, strict=True)], [4] * 4, set(), greedy=True)
    for c, a, b in zip(contexts, first, again, strict=True):
        ref_tokens, ref_logps, margin = _reference_greedy(model, c, 10)
        assert margin > 1e-3
        assert a.tokens + b.tokens == ref_tokens
        assert a.logprobs + b.logprobs == pytest.approx(ref_logps, abs=1e-4)


def test_fused_forward_is_not_used_where_its_folding_would_be_wrong(peaked_model, tokenizer):
    """bfloat16 weights, adapter-wrapped projections (their weight is not the whole map) and sequence-dependent
    rope fall back to the lean forward."""
    assert FusedLlama.supports(peaked_model)
    dynamic = _random_model(LlamaForCausalLM, LlamaConfig, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not FusedLlama.supports(dynamic)
    assert HFBackend(dynamic, 0, -1).forward == "lean"
    with pytest.raises(ValueError, match="fused forward requested"):
        HFBackend(dynamic, 0, -1, forward="fused")

    class Wrapped(torch.nn.Linear):
        pass

    backend = _backend(peaked_model, tokenizer)
    peaked_model.to(torch.bfloat16)
    assert not FusedLlama.supports(peaked_model)
    with pytest.raises(ValueError, match="does not support"):
        backend.generate([[5, 6]], [1], set())
    peaked_model.to(torch.float32)
    layer = peaked_model.model.layers[0].self_attn
    wrapped = Wrapped(layer.q_proj.in_features, layer.q_proj.out_features, bias=False)
    layer.q_proj = wrapped
    assert not FusedLlama.supports(peaked_model)
    assert _backend(peaked_model, tokenizer).forward == "lean"


def test_kv_memory_is_reused_and_leaves_nothing_behind(peaked_model, tokenizer, forward):
    """A call after a larger one runs in the same (pooled) memory and gives what a fresh backend gives."""
    contexts = _contexts(tokenizer)
    backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
    backend.generate(contexts * 8, [12] * 32, set(), greedy=True)  # fills the pools with 32 rows of KV
    pools = [p._flat.data_ptr() for p in backend._pools if p._flat is not None]
    assert pools
    small = [contexts[3][:3], contexts[1]]  # new contexts, fewer rows and columns
    again = backend.generate(small, [6, 6], set(), greedy=True)
    assert [p._flat.data_ptr() for p in backend._pools if p._flat is not None] == pools
    fresh = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward).generate(small, [6, 6], set(), greedy=True)
    for a, b in zip(again, fresh, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_finished_rows_leave_the_buffer_without_changing_any_output(peaked_model, tokenizer, forward, monkeypatch):
    """With many rows stopping early, finished rows are dropped mid-turn (their KV handed to the prefix cache):
    outputs, log-probs and prefilled counts equal a backend that never drops rows, also on a next turn that
    resumes every row from the prefix cache."""
    import arborl.components.sampling.engine.backend as backend_module

    g = torch.Generator().manual_seed(9)
    contexts = [[tokenizer.bos_token_id] + torch.randint(4, len(tokenizer), (int(n),), generator=g).tolist()
                for n in torch.randint(3, 20, (40,), generator=g)]
    vocab = len(tokenizer)
    stops = set(range(4, vocab, 3))  # a third of the vocabulary stops a row: most rows end early, at varied steps
    seeds = list(range(100, 140))

    def run(min_rows):
        monkeypatch.setattr(backend_module, "COMPACT_MIN_ROWS", min_rows)
        backend = _backend(peaked_model, tokenizer, eos_id=-1, forward=forward)
        drops = []
        select = backend_module.KVBuffer.select_rows

        def counting(self, index, pool=None):
            drops.append(self.batch - int(index.numel()))
            return select(self, index, pool)

        monkeypatch.setattr(backend_module.KVBuffer, "select_rows", counting)
        first = backend.generate(contexts, [12] * 40, stops, 1.0, False, row_generators(seeds))
        nxt = [c + o.tokens + [5] for c, o in zip(contexts, first, strict=True)]
        second = backend.generate(nxt, [6] * 40, stops, 1.0, False, row_generators([s + 1 for s in seeds]))
        return first + second, drops

    dropped, drops = run(16)
    kept, no_drops = run(10**9)
    assert any(d > 0 for d in drops) and not any(d > 0 for d in no_drops)
    assert {o.stop for o in dropped} >= {"stop", "length"}
    for a, b in zip(dropped, kept, strict=True):
        assert (a.tokens, a.stop, a.prefilled) == (b.tokens, b.stop, b.prefilled)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # the next turn found every row's KV cached (sequences shorter than MIN_PREFIX are not kept)
    for c, o, again in zip(contexts, dropped[:40], dropped[40:], strict=True):
        fed = len(c) + len(o.tokens) - 1
        assert again.prefilled == (2 if fed >= MIN_PREFIX else fed + 2)


# --- stop strings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_stops_where_a_stop_string_is_spelled_across_tokens(arch, forward):
    """A byte-level BPE model whose greedy turns spell the closing tags across tokens: each turn ends at the token
    that completes a tag (even one carrying characters after it), whatever the token cap leaves; rows that spell
    none run to their cap; without stop strings the same rows run on past the tags."""
    tok = bpe_tokenizer()
    contexts, chains, ends = spelled_tags(tok)
    model = chain_model(tiny_qwen2(tok, tie=False) if arch == "qwen2" else tiny_llama(tok), chains)
    stops = StopStrings.from_tokenizer(TAGS, tok)
    backend = HFBackend(model, tok.pad_token_id, tok.eos_token_id, forward=forward)
    rows = contexts + [contexts[0], contexts[0]]
    limits = [12] * len(contexts) + [2, 3]  # the cap before the tag's last token, and on it
    plain = backend.generate(rows, limits, set(), greedy=True)
    cut = backend.generate(rows, limits, set(), greedy=True, stop_strings=stops)
    for i, end in enumerate(ends):
        assert plain[i].tokens[: len(chains[i]) - 1] == chains[i][1:]  # the model spells its chain
        if end:
            assert (cut[i].tokens, cut[i].stop) == (chains[i][1: end + 1], "stop")
            assert plain[i].stop == "length" and len(plain[i].tokens) == 12
        else:
            assert (cut[i].tokens, cut[i].stop) == (plain[i].tokens, "length")
    assert (cut[-2].tokens, cut[-2].stop) == (chains[0][1:3], "length")
    assert (cut[-1].tokens, cut[-1].stop) == (chains[0][1:4], "stop")
    for p, c in zip(plain, cut, strict=True):
        assert c.logprobs == pytest.approx(p.logprobs[: len(c.tokens)], abs=1e-5)


def test_stop_strings_cut_each_sampled_row_where_its_own_text_completes_one(forward, monkeypatch):
    """40 sampled rows with their own generators: with stop strings each row's turn is its turn without them, cut
    at the first token after which its text holds one; rows that stop leave the buffer mid-turn, and whether they
    leave changes nothing."""
    import arborl.components.sampling.engine.backend as backend_module

    tok = bpe_tokenizer()
    model = tiny_qwen2(tok)
    stops = StopStrings(("an", "th", "in", "e"), token_pieces(tok))
    g = torch.Generator().manual_seed(9)
    contexts = [torch.randint(2, len(tok), (int(n),), generator=g).tolist()
                for n in torch.randint(3, 20, (40,), generator=g)]
    seeds = list(range(100, 140))

    def run(min_rows, stop_strings):
        monkeypatch.setattr(backend_module, "COMPACT_MIN_ROWS", min_rows)
        backend = HFBackend(model, tok.pad_token_id, tok.eos_token_id, forward=forward)
        drops = []
        select = backend_module.KVBuffer.select_rows

        def counting(self, index, pool=None):
            drops.append(self.batch - int(index.numel()))
            return select(self, index, pool)

        monkeypatch.setattr(backend_module.KVBuffer, "select_rows", counting)
        outs = backend.generate(contexts, [12] * 40, set(), 1.0, False, row_generators(seeds),
                                stop_strings=stop_strings)
        monkeypatch.setattr(backend_module.KVBuffer, "select_rows", select)
        return outs, drops

    plain, _ = run(16, None)
    dropped, drops = run(16, stops)
    kept, no_drops = run(10**9, stops)
    assert any(d > 0 for d in drops) and not any(d > 0 for d in no_drops)
    assert 10 < sum(o.stop == "stop" for o in dropped) < 40
    for p, a, b in zip(plain, dropped, kept, strict=True):
        want = cut_turn(p.tokens, set(), tok.eos_token_id, stops)
        assert (a.tokens, a.stop) == (b.tokens, b.stop) == (want.tokens, want.stop)
        assert a.prefilled == b.prefilled
        assert a.logprobs == pytest.approx(p.logprobs[: len(a.tokens)], abs=1e-5)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
