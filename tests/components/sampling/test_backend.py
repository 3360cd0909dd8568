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
        assert alone.logprobs == pytest.approx(out.logprobs, abs=1e-5)


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
