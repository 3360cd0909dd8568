"""components.sampling.backend.HFBackend: batched, left-padded, KV-cached generation vs a naive reference."""

from __future__ import annotations

import pytest
import torch

from components.sampling.backend import HFBackend


@pytest.fixture
def peaked_model(tiny_model):
    """The tiny random Llama re-initialised with large weights, so next-token distributions are far from
    uniform (greedy choices are not decided by float noise) yet greedy decoding does not just repeat."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, (32 / p.shape[1]) ** 0.5)
    tiny_model.eval()
    return tiny_model


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


def _backend(model, tokenizer, batch_size=256, eos_id=None):
    return HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id if eos_id is None else eos_id, batch_size)


@pytest.mark.parametrize("batch_size", [256, 3])
def test_greedy_batch_equals_single_and_naive_reference(peaked_model, tokenizer, batch_size):
    contexts = _contexts(tokenizer)
    steps = 6
    backend = _backend(peaked_model, tokenizer, batch_size, eos_id=-1)
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


def test_stops_at_a_stop_id_and_at_eos(peaked_model, tokenizer):
    ctx = _contexts(tokenizer)[0]
    steps = 8
    ref_tokens, _, _ = _reference_greedy(peaked_model, ctx, steps)
    # the first token that did not occur before it in the greedy continuation
    k = next(i for i in range(1, steps) if ref_tokens[i] not in ref_tokens[:i])
    stop = ref_tokens[k]

    out = _backend(peaked_model, tokenizer, eos_id=-1).generate([ctx], [steps], {stop}, greedy=True)[0]
    assert out.tokens == ref_tokens[: k + 1]  # the stop token is included
    assert out.stop == "stop"
    assert len(out.logprobs) == k + 1

    out = _backend(peaked_model, tokenizer, eos_id=stop).generate([ctx], [steps], set(), greedy=True)[0]
    assert out.tokens == ref_tokens[: k + 1]
    assert out.stop == "eos"


def test_one_sequence_stopping_does_not_disturb_the_others(peaked_model, tokenizer):
    contexts = _contexts(tokenizer)
    steps = 6
    refs = [_reference_greedy(peaked_model, c, steps)[0] for c in contexts]
    stop = refs[1][0]  # the second context stops after its first token
    backend = _backend(peaked_model, tokenizer, eos_id=-1)
    outs = backend.generate(contexts, [steps] * len(contexts), {stop}, greedy=True)
    for ref, out in zip(refs, outs, strict=True):
        expected = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert out.tokens == expected
        assert out.stop == ("stop" if stop in ref else "length")


def test_respects_per_sequence_max_new_tokens(peaked_model, tokenizer):
    contexts = _contexts(tokenizer)
    limits = [3, 1, 0, 5]
    backend = _backend(peaked_model, tokenizer, eos_id=-1)
    outs = backend.generate(contexts, limits, set(), greedy=True)
    for ctx, limit, out in zip(contexts, limits, outs, strict=True):
        assert len(out.tokens) == len(out.logprobs) == limit
        assert out.tokens == _reference_greedy(peaked_model, ctx, limit)[0]
        assert out.stop == "length"


def test_sampling_is_reproducible_and_logprobs_match_the_sampled_tokens(peaked_model, tokenizer):
    contexts = _contexts(tokenizer)
    backend = _backend(peaked_model, tokenizer, eos_id=-1)
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


# --- preallocated cache, lean forward and prefix reuse ------------------------------------------------------


@pytest.mark.parametrize("lean", [True, False])
def test_next_token_logits_equal_the_models(peaked_model, tokenizer, lean):
    contexts = _contexts(tokenizer)
    backend = HFBackend(peaked_model, tokenizer.pad_token_id, -1, lean_forward=lean)
    assert backend.lean_forward is lean
    logits = backend.next_token_logits(contexts)
    with torch.no_grad():
        ref = torch.stack([peaked_model(input_ids=torch.tensor([c])).logits[0, -1] for c in contexts])
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lean", [True, False])
def test_greedy_tokens_equal_model_generate(peaked_model, tokenizer, lean):
    contexts = _contexts(tokenizer)
    backend = HFBackend(peaked_model, tokenizer.pad_token_id, -1, lean_forward=lean)
    outs = backend.generate(contexts, [8] * len(contexts), set(), greedy=True)
    for ctx, out in zip(contexts, outs, strict=True):
        ref = peaked_model.generate(input_ids=torch.tensor([ctx]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        assert out.tokens == ref[0, len(ctx):].tolist()


def test_forked_continuations_equal_full_recomputation(peaked_model, tokenizer):
    """A chain is generated; then branches from an intermediate point and from its end (twice) reuse its cached
    keys/values. Their logits, tokens and log-probs equal a cache-free backend and a full forward pass, and
    `prefilled` counts exactly the tokens fed."""
    ctx = _contexts(tokenizer)[2]  # 13 tokens
    backend = _backend(peaked_model, tokenizer, eos_id=-1)
    chain = backend.generate([ctx], [6], set(), greedy=True)[0]
    assert chain.prefilled == len(ctx)
    branch_mid = ctx + chain.tokens[:3] + [7, 9]  # forks after 3 generated tokens
    branch_end = ctx + chain.tokens + [11]
    contexts = [branch_mid, branch_end, branch_end]

    forked = backend.generate(contexts, [5] * 3, set(), greedy=True)
    plain = HFBackend(peaked_model, tokenizer.pad_token_id, -1, prefix_cache_mb=0)
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


def test_prefix_cache_is_dropped_when_the_weights_change(peaked_model, tokenizer):
    ctx = _contexts(tokenizer)[2]
    backend = _backend(peaked_model, tokenizer, eos_id=-1)
    first = backend.generate([ctx], [4], set(), greedy=True)[0]
    assert backend.generate([ctx + first.tokens], [1], set(), greedy=True)[0].prefilled == 1
    with torch.no_grad():
        peaked_model.lm_head.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    again = backend.generate([ctx + first.tokens], [1], set(), greedy=True)[0]
    assert again.prefilled == len(ctx) + len(first.tokens)
    with torch.no_grad():
        expected = peaked_model(input_ids=torch.tensor([ctx + first.tokens])).logits[0, -1].double().log_softmax(-1)
    assert again.logprobs[0] == pytest.approx(float(expected.max()), abs=1e-4)
