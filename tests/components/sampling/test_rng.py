"""components.sampling.rng: per-row sampling follows the distribution and ignores batch neighbours."""

from __future__ import annotations

import pytest
import torch

from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.rng import inverse_cdf, row_generators, stable_seed, uniforms


def sample_rows(logp, generators):
    return inverse_cdf(logp, uniforms(generators, logp.shape[0], 1)[:, 0])


def sample_shared(logp, generator):
    return inverse_cdf(logp, uniforms(generator, logp.shape[0], 1)[:, 0])


def test_stable_seed_is_deterministic_and_distinct():
    assert stable_seed(1, "p0", 0, 1, 2) == stable_seed(1, "p0", 0, 1, 2)
    assert len({stable_seed(1, "p0", t, r, k) for t in range(3) for r in range(3) for k in range(3)}) == 27
    assert 0 <= stable_seed("x") < 2**63


def test_sample_rows_follows_the_distribution_and_skips_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    n = 20_000
    logp = probs.log().expand(n, -1)
    tokens = sample_rows(logp, row_generators(list(range(n))))
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[[0, 2, 5]].sum() == 0
    assert float((freq - probs.double()).abs().sum()) < 0.03


def test_a_row_draws_the_same_token_whatever_its_neighbours():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 50), -1)
    seeds = [11, 12, 13, 14, 15]
    together = sample_rows(logp, row_generators(seeds))
    alone = torch.cat([sample_rows(logp[i : i + 1], row_generators([s])) for i, s in enumerate(seeds)])
    reordered = sample_rows(logp[[4, 2, 0]], row_generators([15, 13, 11]))
    assert together.tolist() == alone.tolist()
    assert reordered.tolist() == together[[4, 2, 0]].tolist()
    with pytest.raises(ValueError, match="2 generators for 5 rows"):
        sample_rows(logp, row_generators([1, 2]))


def test_a_turns_uniforms_are_the_rows_own_stream():
    """Drawn a turn at a time, row i's uniforms are its generator's first draws: the same for any batch or turn
    length (a longer turn extends a shorter one), all in (0, 1]."""
    seeds = [3, 4, 5]
    u = uniforms(row_generators(seeds), 3, 6)
    assert u.shape == (3, 6) and u.dtype == torch.float64
    assert bool(((u > 0) & (u <= 1)).all())
    alone = torch.cat([uniforms(row_generators([s]), 1, 4) for s in seeds])
    assert torch.equal(u[:, :4], alone)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        uniforms(row_generators([1, 2]), 3, 6)


def test_shared_generator_draws_one_reproducible_uniform_per_row():
    logp = torch.log_softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(2)), -1)
    first = sample_shared(logp, torch.Generator().manual_seed(5))
    assert torch.equal(first, sample_shared(logp, torch.Generator().manual_seed(5)))
    u = 1.0 - torch.rand(4, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(first, inverse_cdf(logp, u[:, 0]))


def test_backend_rows_with_own_generators_do_not_depend_on_the_batch(policy, tokenizer, questions):
    """Through the real HF backend (batch_size 2 forces several chunks): a context's sampled continuation
    with its own generator is the same alone, in a batch, and in another order."""
    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size=2)
    ctx = [[tokenizer.bos_token_id] + tokenizer(q["prompt"], add_special_tokens=False)["input_ids"]
           for q in questions["train"][:5]]
    seeds = [101, 102, 103, 104, 105]

    def sample(idx):
        outs = backend.generate([ctx[i] for i in idx], [12] * len(idx), set(), 1.0, False,
                                row_generators([seeds[i] for i in idx]))
        return {i: o for i, o in zip(idx, outs, strict=True)}

    batch, alone, shuffled = sample(range(5)), {}, sample([3, 0, 4])
    for i in range(5):
        alone.update(sample([i]))
    for i in range(5):
        assert batch[i].tokens == alone[i].tokens
        assert batch[i].logprobs == pytest.approx(alone[i].logprobs, abs=1e-4)
    for i in (3, 0, 4):
        assert shuffled[i].tokens == batch[i].tokens
    assert len({tuple(o.tokens) for o in batch.values()}) > 1
