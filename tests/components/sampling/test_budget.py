"""Budget arithmetic on hand-made trees, checked against counts written out by hand."""

from __future__ import annotations

import pytest

from components.sampling.agent import Step
from components.sampling.budget import budget, mean_chain_tokens
from components.sampling.tree import ROOT, Tree


def step(n_gen: int, prefilled: int, search: bool, leaf: bool) -> Step:
    s = Step(list(range(n_gen)), [0.0] * n_gen, "", "search" if search else "answer", prefilled=prefilled)
    if search and not leaf:
        s.obs_ids = [7, 7, 7]
    if leaf:
        s.finish_reason = "answer" if not search else "max_turns"
    return s


def hand_made() -> list[Tree]:
    # prompt p0, tree 0: chain search(4) -> answer(2); then round 1 adds one branch from node 0 (answer, 3 tokens)
    # and one fresh chain from the root (answer, 5 tokens).
    t0 = Tree("p0", 0, [1, 2, 3])
    t0.attach(ROOT, [step(4, 3, True, False), step(2, 10, False, True)], 0)
    t0.attach(0, [step(3, 10, False, True)], 1)
    t0.attach(ROOT, [step(5, 3, False, True)], 1)
    # prompt p1, tree 0: a single chain search(6) -> search(6) -> answer(4), no expansions
    t1 = Tree("p1", 0, [1, 2])
    t1.attach(ROOT, [step(6, 2, True, False), step(6, 11, True, False), step(4, 20, False, True)], 0)
    return [t0, t1]


def test_mean_chain_tokens_uses_round_zero_chains():
    assert mean_chain_tokens(hand_made()) == pytest.approx((6 + 16) / 2)


def test_budget_per_prompt_and_round():
    per_prompt, metrics = budget(hand_made())
    p0, p1 = per_prompt["p0"], per_prompt["p1"]
    assert (p0["generated_tokens"], p0["prefilled_tokens"], p0["tool_calls"], p0["trajectories"]) == (14, 26, 1, 3)
    assert (p1["generated_tokens"], p1["prefilled_tokens"], p1["tool_calls"], p1["trajectories"]) == (16, 33, 2, 1)
    assert p0["chain_equivalents"] == pytest.approx(14 / 11)
    assert p1["chain_equivalents"] == pytest.approx(16 / 11)
    assert p0["rounds"] == [
        {"round": 0, "generated_tokens": 6, "prefilled_tokens": 13, "tool_calls": 1, "trajectories": 1},
        {"round": 1, "generated_tokens": 8, "prefilled_tokens": 13, "tool_calls": 0, "trajectories": 2},
    ]
    assert metrics["generated_tokens"] == 30 and metrics["trajectories"] == 4
    assert metrics["round1_generated_tokens"] == 8 and metrics["round0_prefilled_tokens"] == 13 + 33
    assert metrics["chain_equivalents_per_prompt"] == pytest.approx((14 / 11 + 16 / 11) / 2)
    assert metrics["trajectories_per_chain_equivalent"] == pytest.approx(2 / (30 / 22))
