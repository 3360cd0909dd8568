"""Budget arithmetic on hand-made trees, checked against counts written out by hand."""

from __future__ import annotations

import random

import pytest

from arborl.components.sampling.agent import Step
from arborl.components.sampling.budget import budget, mean_chain_tokens, random_expansion_cost
from arborl.components.sampling.expansion import make_policy
from arborl.components.sampling.tree import ROOT, Tree


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


def test_random_expansion_cost_from_round_zero_chains():
    # p0's chain 4, 2: drawing the root starts a fresh chain (6 tokens, p0's only chain), node 0 regenerates 2
    # → 4 expected; p1's chain 6, 6, 4: root 16, node 0 10, node 1 4 → 10 expected; round-1 nodes are no chain's
    assert random_expansion_cost(hand_made()) == pytest.approx((4 + 10) / (6 + 16))
    assert random_expansion_cost([]) == 0.0
    # two chains of one prompt, 3 and 9 tokens: a fresh chain costs their mean, 6, whichever chain drew the root
    short, long = Tree("q", 0, [1]), Tree("q", 1, [1])
    short.attach(ROOT, [step(3, 0, False, True)], 0)  # one step: only the root to draw
    long.attach(ROOT, [step(5, 0, True, False), step(4, 0, False, True)], 0)  # root 6, node 0 regenerates 4
    assert random_expansion_cost([short, long]) == pytest.approx((6 + (6 + 4) / 2) / (3 + 9))


def test_random_expansion_cost_is_what_the_random_policy_draws_cost():
    """Simulated: the `random` policy's draws from a chain, each costing the chain's tokens after the drawn
    node, average to the predicted cost."""
    tree = Tree("p", 0, [1])
    tree.attach(ROOT, [step(6, 0, True, False), step(3, 0, True, False), step(8, 0, True, False),
                       step(2, 0, False, True)], 0)
    tokens = [len(n.step.action_ids) for n in tree.nodes]
    draws = make_policy("random", "max").choose(tree, 20000, random.Random(0))
    regenerated = [sum(tokens if node == ROOT else tokens[node + 1 :]) for node in draws]
    assert sum(regenerated) / len(draws) / sum(tokens) == pytest.approx(random_expansion_cost([tree]), rel=0.02)


def test_budget_per_prompt_and_round():
    per_prompt, metrics = budget(hand_made())
    p0, p1 = per_prompt["p0"], per_prompt["p1"]
    assert (p0["generated_tokens"], p0["prefilled_tokens"], p0["tool_calls"], p0["trajectories"]) == (14, 26, 1, 3)
    assert (p1["generated_tokens"], p1["prefilled_tokens"], p1["tool_calls"], p1["trajectories"]) == (16, 33, 2, 1)
    assert p0["chain_equivalents"] == pytest.approx(14 / 11)
    assert p1["chain_equivalents"] == pytest.approx(16 / 11)
    assert p0["rounds"] == [
        {"round": 0, "generated_tokens": 6, "prefilled_tokens": 13, "tool_calls": 1, "trajectories": 1,
         "budget_cuts": 0},
        {"round": 1, "generated_tokens": 8, "prefilled_tokens": 13, "tool_calls": 0, "trajectories": 2,
         "budget_cuts": 0},
    ]
    assert metrics["generated_tokens"] == 30 and metrics["trajectories"] == 4
    assert metrics["round1_generated_tokens"] == 8 and metrics["round0_prefilled_tokens"] == 13 + 33
    assert metrics["chain_equivalents_per_prompt"] == pytest.approx((14 / 11 + 16 / 11) / 2)
    assert metrics["trajectories_per_chain_equivalent"] == pytest.approx(2 / (30 / 22))


# --- fixing the budget ---------------------------------------------------------------------------------


def _plan(b, **sampling):
    from arborl.components.config import BudgetConfig, SamplingConfig
    from arborl.components.sampling.budget import plan, planned_chains

    s = plan(SamplingConfig(**sampling), BudgetConfig(chains_per_prompt=b))
    return (s.trees_per_prompt, s.expansions_per_round, s.expansion_rounds), planned_chains(s, 0.5)


def test_chains_budget_chooses_m_n_l_by_the_documented_rule():
    # tree mode, N = 2 configured: M = round(B / 2), then N = round((B/M - 1) / 0.5)
    assert _plan(4) == ((2, 2, 1), 4.0)  # Tree-GRPO's official setting at budget 4
    assert _plan(8) == ((4, 2, 1), 8.0)
    assert _plan(16) == ((8, 2, 1), 16.0)
    assert _plan(5) == ((3, 1, 1), 4.5)  # M = round(2.5) = 3, N = round(4/3) = 1
    assert _plan(3, expansions_per_round=4) == ((1, 4, 1), 3.0)  # M = round(1) = 1, N = round(4) = 4
    assert _plan(1.2) == ((1, 2, 0), 1.0)  # below 1 + c: one chain
    # chain mode: M = round(B) chains
    assert _plan(4, expansion_rounds=0) == ((4, 2, 0), 4.0)
    assert _plan(6.5, expansion_rounds=0)[0][0] == 7
    from arborl.components.config import BudgetConfig, SamplingConfig
    from arborl.components.sampling.budget import plan

    given = SamplingConfig(trees_per_prompt=3)
    assert plan(given, BudgetConfig()) is given  # no budget: M/N/L as given


def test_one_cost_model_for_plans_and_equal_budget_chains():
    """`planned_chains` is M · (1 + L·N·c); `equal_budget_chains` rounds it half up (at least one chain), which is
    what `plan` gives chain mode for that budget; `plan`'s tree mode spends B under the same c."""
    from arborl.components.config import BudgetConfig, SamplingConfig
    from arborl.components.sampling.budget import equal_budget_chains, plan, planned_chains

    official = SamplingConfig(trees_per_prompt=2, expansions_per_round=2, expansion_rounds=1)
    assert planned_chains(official, 0.5) == 4.0 and equal_budget_chains(official, 0.5) == 4
    assert planned_chains(official, 0.59) == pytest.approx(4.36) and equal_budget_chains(official, 0.59) == 4
    assert equal_budget_chains(official.model_copy(update={"trees_per_prompt": 1, "expansions_per_round": 3}),
                               0.5) == 3  # 2.5, half up
    assert equal_budget_chains(official.model_copy(update={"expansion_rounds": 0}), 0.9) == 2  # chains cost M
    for c in (0.25, 0.5, 0.59, 0.75, 1.0):
        for b in (2.0, 4.0, 5.0, 8.0, 13.0):
            tree = plan(SamplingConfig(), BudgetConfig(chains_per_prompt=b, expansion_cost=c))
            cost = planned_chains(tree, c)
            chains = plan(SamplingConfig(expansion_rounds=0), BudgetConfig(chains_per_prompt=cost, expansion_cost=c))
            assert chains.trees_per_prompt == equal_budget_chains(tree, c)
    # a dearer expansion buys fewer trees for the same budget
    assert plan(SamplingConfig(), BudgetConfig(chains_per_prompt=8, expansion_cost=1.0)).trees_per_prompt == 3


def test_at_most_one_budget_key():
    from pydantic import ValidationError

    from arborl.components.config import BudgetConfig

    with pytest.raises(ValidationError, match="at most one"):
        BudgetConfig(tokens_per_prompt=100, chains_per_prompt=4)


def test_summarize_of_merged_prompt_counts_equals_the_budget_of_the_whole_batch():
    from arborl.components.sampling.budget import prompt_counts, summarize

    trees = hand_made()
    whole_stats, whole = budget(trees)
    parts = {**prompt_counts(trees[:1]), **prompt_counts(trees[1:])}
    merged_stats, merged = summarize(parts)
    assert merged == whole and merged_stats == whole_stats
    assert whole["trees_per_prompt"] == 1 and whole["expansion_rounds_per_prompt"] == pytest.approx(0.5)


@pytest.mark.parametrize("rounds", [1, 0])
def test_token_budget_expands_each_prompt_until_it_is_reached(policy, tokenizer, retriever, questions, rounds):
    """Tree mode: expansion rounds go on per prompt until its generated tokens reach the budget; chain mode:
    one more chain per round. A prompt stops at the first round that reaches the budget."""
    from arborl.components.config import AgentConfig, SamplingConfig
    from arborl.components.sampling.agent import SearchEnv
    from arborl.components.sampling.engine import HFBackend
    from arborl.components.sampling.scheduler import sample_trees
    from arborl.components.training.models import prompt_ids

    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions["train"][:5]]
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=1, expansion_rounds=rounds)
    agent = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
    target = 90
    trees = sample_trees(backend, SearchEnv(retriever, tokenizer), prompts, sampling, agent, seed=0,
                         tokens_per_prompt=target, max_rounds=30)
    per_prompt, metrics = budget(trees)
    for pid, _ in prompts:
        stats = per_prompt[pid]
        assert stats["generated_tokens"] >= target  # reached well before max_rounds
        if rounds:  # tokens before the last round were below the budget
            last = stats["rounds"][-1]
            assert stats["generated_tokens"] - last["generated_tokens"] < target
            assert last["round"] == len(stats["rounds"]) - 1 >= 1
            assert last["trajectories"] == 2  # N = 1 expansion for each of the M = 2 trees
        else:
            mine = [t for t in trees if t.prompt_id == pid]
            assert [t.tree_id for t in mine] == list(range(len(mine))) and len(mine) > 2
            assert all(n.expansion_round == 0 for t in mine for n in t.nodes)
            assert stats["generated_tokens"] - sum(len(n.step.action_ids) for n in mine[-1].nodes) < target
    assert metrics["generated_tokens_per_prompt"] >= target


# --- exact token budgets (token_stop: nearest, exact) -----------------------------------------------------------


def test_predicted_costs_price_each_branch_point_by_its_continuations():
    from arborl.components.sampling.budget import predicted_costs

    p0, p1 = hand_made()
    # p0's trajectories: 4+2, 4+3 and the fresh chain 5 → a fresh chain is predicted at 6; node 0's two
    # continuations after it generated 2 and 3 → 2.5. Leaves are no branch points.
    assert predicted_costs([p0]) == {(0, ROOT): pytest.approx(6.0), (0, 0): pytest.approx(2.5)}
    # p1's one chain 6, 6, 4: fresh 16, after node 0: 10, after node 1: 4
    assert predicted_costs([p1]) == {(0, ROOT): 16.0, (0, 0): 10.0, (0, 1): 4.0}
    twin = Tree("p1", 1, [1, 2])
    twin.attach(ROOT, [step(2, 2, False, True)], 0)  # a second tree: the fresh-chain price is over both
    assert predicted_costs([p1, twin])[(1, ROOT)] == predicted_costs([p1, twin])[(0, ROOT)] == 9.0


def test_fit_picks_keeps_what_brings_the_prompt_nearest_its_budget_half_a_remainder_per_round():
    from arborl.components.sampling.budget import fit_picks

    assert fit_picks([4, 4, 4], 10) == 1  # a second pick would spend 8 of the 10 left: over half
    assert fit_picks([4, 4, 4], 10, share=1.0) == 2  # the third would end 2 over instead of 2 under: a tie
    assert fit_picks([3, 30, 2], 10) == 1  # 30 overshoots by more than stopping undershoots: the round ends
    assert fit_picks([30, 3, 2], 10) == 0  # in order: a cheaper pick behind it is not taken instead
    assert fit_picks([7], 4) == 1  # 3 over is nearer than 4 under
    assert fit_picks([9], 4) == 0  # 5 over is not: the prompt is done
    assert fit_picks([0.2], 1) == 1  # a pick costs at least one token
    assert fit_picks([5, 5], 0) == 0 and fit_picks([], 50) == 0


@pytest.mark.parametrize("rounds", [1, 0])
def test_nearest_token_budget_ends_near_it_either_side(policy, tokenizer, retriever, questions, rounds):
    """token_stop=nearest: prompts end near the budget, over or under, where `reach` always ends over it; chain mode
    adds at most M chains a round."""
    from arborl.components.config import AgentConfig, SamplingConfig
    from arborl.components.sampling.agent import SearchEnv
    from arborl.components.sampling.engine import HFBackend
    from arborl.components.sampling.scheduler import sample_trees
    from arborl.components.training.models import prompt_ids

    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions["train"][:12]]
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=2, expansion_rounds=rounds)
    agent = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
    target, env = 150, SearchEnv(retriever, tokenizer)
    spent = {}
    for stop in ("reach", "nearest"):
        trees = sample_trees(backend, env, prompts, sampling, agent, seed=0, tokens_per_prompt=target, max_rounds=30,
                             token_stop=stop)
        spent[stop] = [s["generated_tokens"] for s in budget(trees)[0].values()]
    assert min(spent["reach"]) >= target
    assert min(spent["nearest"]) < target < max(spent["nearest"])  # either side
    deviation = {k: sum(abs(x - target) for x in v) / len(v) / target for k, v in spent.items()}
    assert deviation["nearest"] < deviation["reach"]
    assert abs(sum(spent["nearest"]) / len(prompts) / target - 1) < 0.1
    with pytest.raises(ValueError, match="token_stop"):
        sample_trees(backend, env, prompts[:1], sampling, agent, seed=0, tokens_per_prompt=target, token_stop="near")


def test_allowances_split_what_is_left_in_proportion_to_the_predicted_costs():
    from arborl.components.sampling.budget import allowances

    assert allowances([5.0, 5.0], 20) == [10, 10]
    assert allowances([2.0, 6.0], 17) == [5, 12]  # 4.25 and 12.75 floored; the one token over goes to the first
    assert allowances([1.0, 1.0, 1.0], 10) == [4, 3, 3]
    assert allowances([30.0], 3) == [3]  # a last pick gets all that is left, however dear
    assert allowances([0.1, 9.0], 10) == [1, 9]  # at least one token each
    assert allowances([], 10) == []


@pytest.mark.parametrize("rounds", [1, 0])
def test_exact_token_budget_spends_it_to_the_token(policy, tokenizer, retriever, questions, rounds):
    """token_stop=exact: every prompt generates exactly the budget, trees (rounds = 1) and chains (0) alike; the
    episodes its last share cut short end with finish reason `budget` and are counted as budget_cuts."""
    from arborl.components.config import AgentConfig, SamplingConfig
    from arborl.components.sampling.agent import SearchEnv
    from arborl.components.sampling.engine import HFBackend
    from arborl.components.sampling.scheduler import sample_trees
    from arborl.components.training.models import prompt_ids

    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions["train"][:12]]
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=2, expansion_rounds=rounds)
    agent = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
    env = SearchEnv(retriever, tokenizer)
    for target in (9, 31, 150):  # below one chain, about two, many
        trees = sample_trees(backend, env, prompts, sampling, agent, seed=0, tokens_per_prompt=target, max_rounds=30,
                             token_stop="exact")
        stats, metrics = budget(trees)
        assert [s["generated_tokens"] for s in stats.values()] == [target] * len(prompts), target
        cut = [n for t in trees for n in t.nodes if n.step.finish_reason == "budget"]
        assert metrics["budget_cuts"] == len(cut) and all(n.is_leaf for n in cut)
        if target == 9:
            assert cut  # a chain is longer than 9 tokens: the first chains are cut
        for t in trees:
            for n in t.nodes:
                assert n.step.finish_reason != "budget" or n.step.obs_ids == []  # a cut turn gets no observation
