"""components.training.loss: PPO clip with dual clip on (A⁺, A⁻) token weights, and token log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from arborl.components.training.loss import clipped_objective, token_logprobs

# ratios in every region for ε_low = ε_high = 0.2, c = 3 (never exactly on a boundary)
RATIOS = [0.3, 0.79, 0.81, 0.95, 1.0, 1.05, 1.19, 1.21, 2.0, 2.99, 3.01, 7.0]
ADVANTAGES = [-2.0, -0.5, 0.0, 0.5, 1.5]


def ppo_reference(r: float, a: float, eps_low: float, eps_high: float, c: float) -> tuple[float, float, bool]:
    """Textbook PPO: min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), then dual clip max(·, c·A) for A < 0.

    Returns (objective, d objective / d log π, clipped)."""
    unclipped = r * a
    clipped_val = min(max(r, 1 - eps_low), 1 + eps_high) * a
    obj = min(unclipped, clipped_val)
    grad = a * r if unclipped <= clipped_val else 0.0
    if a < 0 and c * a > obj:
        obj, grad = c * a, 0.0
    return obj, grad, a != 0 and grad == 0.0


@pytest.mark.parametrize(("eps_low", "eps_high", "c"), [(0.2, 0.2, 3.0), (0.1, 0.28, 2.0)])
def test_clipped_objective_matches_textbook_ppo_and_gradients(eps_low, eps_high, c):
    cases = [(r, a) for r in RATIOS for a in ADVANTAGES
             if all(abs(r - b) > 1e-3 for b in (1 - eps_low, 1 + eps_high, c))]
    old = torch.randn(len(cases), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logp = (old + torch.tensor([math.log(r) for r, _ in cases], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([a for _, a in cases], dtype=torch.float64)
    obj, clipped = clipped_objective(logp, old, adv.clamp(min=0), adv.clamp(max=0), eps_low, eps_high, c)
    obj.sum().backward()
    obj = obj.detach()
    for i, (r, a) in enumerate(cases):
        ref_obj, ref_grad, ref_clipped = ppo_reference(r, a, eps_low, eps_high, c)
        assert float(obj[i]) == pytest.approx(ref_obj, abs=1e-12), (r, a)
        assert float(logp.grad[i]) == pytest.approx(ref_grad, abs=1e-12), (r, a)
        assert bool(clipped[i]) == ref_clipped, (r, a)


def test_gradient_regions_explicitly():
    """A > 0: gradient A·r below 1+ε, 0 above. A < 0: 0 below 1−ε, A·r inside, 0 above c."""
    def grad(r, a):
        logp = torch.tensor([math.log(r)], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        a_t = torch.tensor([a], dtype=torch.float64)
        obj, _ = clipped_objective(logp, zero, a_t.clamp(min=0), a_t.clamp(max=0), 0.2, 0.2, 3.0)
        obj.sum().backward()
        return float(logp.grad[0])

    assert grad(0.5, 1.0) == pytest.approx(0.5)
    assert grad(1.1, 1.0) == pytest.approx(1.1)
    assert grad(1.5, 1.0) == 0.0
    assert grad(5.0, 1.0) == 0.0
    assert grad(0.5, -1.0) == 0.0
    assert grad(1.1, -1.0) == pytest.approx(-1.1)
    assert grad(2.5, -1.0) == pytest.approx(-2.5)
    assert grad(3.5, -1.0) == 0.0


def test_dual_clip_bounds_negative_advantages():
    logp = torch.tensor([math.log(100.0)])
    obj, clipped = clipped_objective(logp, torch.zeros(1), torch.zeros(1), torch.tensor([-1.0]), 0.2, 0.2, 3.0)
    assert float(obj) == pytest.approx(-3.0)  # plain PPO would give −100
    assert bool(clipped)


def test_shared_token_with_both_signs_is_the_sum_of_duplicated_objectives():
    """A token shared by trajectories with advantages A_1..A_k: A⁺ = Σ positive, A⁻ = Σ negative."""
    advantages = [1.0, -0.5, 2.0, -1.5, 0.0]
    a_pos, a_neg = sum(a for a in advantages if a > 0), sum(a for a in advantages if a < 0)
    for r in RATIOS:
        logp = torch.tensor([math.log(r)], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        packed, _ = clipped_objective(logp, zero, torch.tensor([a_pos], dtype=torch.float64),
                                      torch.tensor([a_neg], dtype=torch.float64), 0.2, 0.2, 3.0)
        packed.sum().backward()
        packed = packed.detach()
        ref = sum(ppo_reference(r, a, 0.2, 0.2, 3.0)[0] for a in advantages)
        ref_grad = sum(ppo_reference(r, a, 0.2, 0.2, 3.0)[1] for a in advantages)
        assert float(packed) == pytest.approx(ref, abs=1e-12)
        assert float(logp.grad) == pytest.approx(ref_grad, abs=1e-12)


def test_objective_at_ratio_one_is_the_advantage_and_keeps_shape():
    shape = (2, 3, 4)
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    obj, clipped = clipped_objective(logp, logp.clone(), adv.clamp(min=0), adv.clamp(max=0), 0.2, 0.2, 3.0)
    assert obj.shape == clipped.shape == shape
    torch.testing.assert_close(obj, adv)
    assert not clipped.any()


def test_token_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    got = token_logprobs(logits, targets)
    assert got.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            row = logits[b, t].double()
            ref = float(row[targets[b, t]] - torch.logsumexp(row, 0))
            assert float(got[b, t]) == pytest.approx(ref, abs=1e-5)
    # half-precision logits are computed in float32
    assert token_logprobs(logits.half(), targets).dtype == torch.float32
