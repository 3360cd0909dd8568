"""components.sampling.tree: Tree-GRPO random expansion, pruning, and the `nodes` rows."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
import torch

from arborl.components.artifacts import schemas
from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.envs.protocol import INFO_CLOSE, INFO_OPEN, TURN_STOPS
from arborl.components.sampling.agent import Episode, SearchEnv, Step, run_episodes
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.expansion import make_policy
from arborl.components.sampling.rng import stable_seed
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.sampling.tree import ROOT, Node, Tree, node_rows
from arborl.components.training.models import prompt_ids

AGENT = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
FINISH = {"answer", "eos", "length", "max_turns"}


@pytest.fixture(scope="module")
def setup(policy, tokenizer, retriever, questions):
    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    env = SearchEnv(retriever, tokenizer)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions["train"][:6]]
    return backend, env, prompts


def _sample(setup, seed=0, **kw):
    backend, env, prompts = setup
    sampling = SamplingConfig(**{"trees_per_prompt": 2, "expansions_per_round": 2, "expansion_rounds": 1, **kw})
    return sample_trees(backend, env, prompts, sampling, AGENT, seed=seed)


@pytest.fixture(scope="module")
def trees(setup):
    return _sample(setup)


def _check_structure(tree: Tree):
    ids = [n.node_id for n in tree.nodes]
    assert ids == list(range(len(tree.nodes)))  # dense, in order
    for n in tree.nodes:
        if n.parent_id is None:
            assert n.depth == 1
        else:
            parent = tree.nodes[n.parent_id]
            assert n.parent_id < n.node_id
            assert n.depth == parent.depth + 1
            assert n.node_id in parent.children
            assert not parent.is_leaf
        assert sorted(n.children) == sorted(c.node_id for c in tree.nodes if c.parent_id == n.node_id)
        assert n.depth <= AGENT.max_turns
        if n.is_leaf:
            assert n.step.finish_reason in FINISH and not n.children
        else:
            assert n.step.action == "search" and n.step.obs_ids and n.children


def test_every_tree_has_one_plus_L_times_N_leaves(trees, setup):
    prompts = setup[2]
    assert len(trees) == len(prompts) * 2
    assert [(t.prompt_id, t.tree_id) for t in trees] == [(pid, m) for pid, _ in prompts for m in range(2)]
    for t in trees:
        assert len(t.leaves()) == 1 + 1 * 2
        _check_structure(t)
    # the policy writes multi-turn episodes, so expansions from intermediate nodes are exercised
    assert any(n.depth > 1 for t in trees for n in t.nodes)
    assert any(n.expansion_round == 1 and n.parent_id is not None and n.depth == 2 for t in trees for n in t.nodes)


def test_expansion_rounds(trees):
    for t in trees:
        first = [n for n in t.nodes if n.expansion_round == 0]
        # round 0 is one chain from a first step down to one leaf
        assert [n.parent_id for n in first] == [None] + [n.node_id for n in first[:-1]]
        assert [n.is_leaf for n in first] == [False] * (len(first) - 1) + [True]
        later = [n for n in t.nodes if n.expansion_round == 1]
        # each of the N expansions starts at the root or at a round-0 node and stays in round 1 after that
        starts = [n for n in later if n.parent_id is None or t.nodes[n.parent_id].expansion_round == 0]
        assert len(starts) == 2
        assert all(t.nodes[n.parent_id].expansion_round == 1 for n in later if n not in starts)
        assert sum(n.is_leaf for n in later) == 2
        assert {n.expansion_round for n in t.nodes} <= {0, 1}


def test_prefixes_fit_the_token_budget(trees):
    for t in trees:
        for leaf in t.leaves():
            assert len(t.prefix(leaf.node_id)) <= AGENT.max_total_tokens
        for n in t.nodes:
            assert 1 <= len(n.step.action_ids) <= AGENT.max_tokens_per_turn


def test_chain_mode_gives_single_chains(setup):
    trees = _sample(setup, expansion_rounds=0)
    assert len(trees) == len(setup[2]) * 2
    for t in trees:
        _check_structure(t)
        assert len(t.leaves()) == 1
        assert all(len(n.children) <= 1 for n in t.nodes)
        assert [n.parent_id for n in t.nodes] == [None] + list(range(len(t.nodes) - 1))
        assert {n.expansion_round for n in t.nodes} == {0}


def test_more_rounds(setup):
    trees = _sample(setup, expansion_rounds=2, expansions_per_round=3)
    for t in trees:
        _check_structure(t)
        assert len(t.leaves()) == 1 + 2 * 3
        for r in (1, 2):
            assert sum(n.is_leaf for n in t.nodes if n.expansion_round == r) == 3


def test_sampling_is_deterministic_per_seed(setup, trees):
    again = _sample(setup)
    assert _rows_without_nan(node_rows(again, 0)) == _rows_without_nan(node_rows(trees, 0))
    other = _sample(setup, seed=1)
    assert _rows_without_nan(node_rows(other, 0)) != _rows_without_nan(node_rows(trees, 0))


def _rows_without_nan(rows):
    return [{**r, "logprobs": [None if math.isnan(x) else x for x in r["logprobs"]]} for r in rows]


def _paths(tree: Tree) -> list[list[int]]:
    return sorted(tree.prefix(leaf.node_id) for leaf in tree.leaves())


def test_keep_leaves_prunes_to_k_with_dense_ids(setup, trees):
    pruned = _sample(setup, keep_leaves=2)
    for full, t in zip(trees, pruned, strict=True):
        _check_structure(t)
        assert len(t.leaves()) == 2
        # the kept trajectories are trajectories of the unpruned tree, and every kept node is on one
        assert set(map(tuple, _paths(t))) <= set(map(tuple, _paths(full)))
        on_paths = {n.node_id for leaf in t.leaves() for n in t.path(leaf.node_id)}
        assert on_paths == set(range(len(t.nodes)))
    same = _sample(setup, keep_leaves=3)  # K = number of leaves: nothing to prune
    assert [_paths(t) for t in same] == [_paths(t) for t in trees]


def test_node_rows_validate_and_mask_observations(trees, tokenizer, tmp_path):
    rows = node_rows(trees, policy_version=4)
    assert len(rows) == sum(len(t.nodes) for t in trees)
    uri = str(tmp_path / "nodes.parquet")
    schemas.write(rows, schemas.NODES, uri)
    back = schemas.read(uri, schemas.NODES).to_pylist()
    assert len(back) == len(rows)
    stops = {tokenizer.convert_tokens_to_ids(t) for t in TURN_STOPS}
    for row in back:
        ids, mask, logps = row["token_ids"], row["loss_mask"], row["logprobs"]
        assert len(ids) == len(mask) == len(logps)
        assert row["policy_version"] == 4
        # the trainable part is a prefix, the observation the rest
        n_act = sum(mask)
        assert mask == [True] * n_act + [False] * (len(ids) - n_act)
        assert [math.isnan(x) for x in logps] == [not m for m in mask]
        assert all(x <= 0 for x, m in zip(logps, mask, strict=True) if m)
        obs = tokenizer.convert_ids_to_tokens(ids[n_act:])
        if row["is_leaf"]:
            assert obs == []
        else:
            assert obs[0] == INFO_OPEN and obs[-1] == INFO_CLOSE
            assert ids[n_act - 1] in stops
            assert INFO_OPEN not in tokenizer.convert_ids_to_tokens(ids[:n_act])
        assert tokenizer.decode(ids) == row["text"]
        assert (row["parent_id"] is None) == (row["depth"] == 1)


def test_node_logprobs_are_the_policy_logprobs_along_each_path(trees, policy):
    """Teacher-forcing every root→leaf path through the policy reproduces the stored behaviour log-probs
    (temperature 1), so the tokens and log-probs of expansions line up with their prefixes."""
    for t in trees[:6]:
        for leaf in t.leaves():
            ids = t.prefix(leaf.node_id)
            with torch.no_grad():
                logp = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            pos = len(t.prompt_ids)
            for node in t.path(leaf.node_id):
                for tok, stored in zip(node.step.action_ids, node.step.action_logprobs, strict=True):
                    assert stored == pytest.approx(float(logp[pos - 1, tok]), abs=1e-4)
                    pos += 1
                pos += len(node.step.obs_ids)
            assert pos == len(ids)


def _round_by_round(backend, env, prompts, sampling, agent, seed, tokens_per_prompt=None, max_rounds=16):
    """Reference: the rounds one after the other, every prompt waiting for all others at each round, each
    round's episodes run to their end in a batch of their own."""
    policy = make_policy(sampling.expansion_policy, sampling.entropy_statistic)
    backend.clear_cache()
    by_prompt = {pid: [Tree(pid, m, ids) for m in range(sampling.trees_per_prompt)] for pid, ids in prompts}
    rngs = {}
    chain_mode = sampling.expansion_rounds == 0

    def grow(picks, r):
        episodes = [Episode(t.prefix(node), agent.max_turns - (0 if node == ROOT else t.nodes[node].depth),
                            seed=stable_seed(seed, t.prompt_id, t.tree_id, r, k)) for t, node, k in picks]
        run_episodes(backend, env, episodes, agent, sampling.temperature)
        for (t, node, _), ep in zip(picks, episodes, strict=True):
            t.attach(node, ep.steps, r)

    grow([(t, ROOT, 0) for trees in by_prompt.values() for t in trees], 0)
    for r in range(1, (sampling.expansion_rounds if tokens_per_prompt is None else max_rounds) + 1):
        picks = []
        for pid, trees in by_prompt.items():
            if tokens_per_prompt is not None and sum(len(n.step.action_ids) for t in trees
                                                    for n in t.nodes) >= tokens_per_prompt:
                continue
            if chain_mode:
                trees.append(Tree(pid, len(trees), trees[0].prompt_ids))
                picks.append((trees[-1], ROOT, 0))
                continue
            for t in trees:
                rng = rngs.setdefault(t.tree_id, {}).setdefault(pid, random.Random(f"{seed}/{pid}/{t.tree_id}"))
                picks += [(t, node, k) for k, node in enumerate(policy.choose(t, sampling.expansions_per_round, rng))]
        if not picks:
            break
        grow(picks, 0 if chain_mode else r)
    return [t for trees in by_prompt.values() for t in trees]


def _shape(trees):
    return [(t.prompt_id, t.tree_id, [(n.node_id, n.parent_id, n.depth, n.expansion_round, n.step.action_ids,
                                        n.step.obs_ids, n.step.finish_reason) for n in t.nodes]) for t in trees]


@pytest.mark.parametrize(
    "shape, budget",
    [({"expansion_rounds": 2}, None), ({"expansion_rounds": 1, "expansion_policy": "entropy"}, None),
     ({"expansion_rounds": 1}, 120), ({"expansion_rounds": 0, "trees_per_prompt": 1}, 90)],
    ids=["two-rounds", "entropy", "token-budget", "chains-to-a-budget"],
)
def test_pipelined_rounds_grow_the_trees_of_round_by_round_sampling(setup, shape, budget):
    """Prompts move through rounds independently (a prompt's next round joins the batch as soon as its last
    episode ends): the trees, log-probs included, equal the round-by-round reference."""
    backend, env, prompts = setup
    sampling = SamplingConfig(**{"trees_per_prompt": 2, "expansions_per_round": 2, **shape})
    calls = []
    generate = backend.generate

    def counting(contexts, *args, **kwargs):
        calls.append(len(contexts))
        return generate(contexts, *args, **kwargs)

    backend.generate = counting
    try:
        piped = sample_trees(backend, env, prompts, sampling, AGENT, seed=3, tokens_per_prompt=budget)
        piped_calls, calls[:] = list(calls), []
        ref = _round_by_round(backend, env, prompts, sampling, AGENT, seed=3, tokens_per_prompt=budget)
    finally:
        del backend.generate
    assert _shape(piped) == _shape(ref)
    for a, b in zip(piped, ref, strict=True):
        for x, y in zip(a.nodes, b.nodes, strict=True):
            assert x.step.action_logprobs == pytest.approx(y.step.action_logprobs, abs=1e-5)
    if sampling.expansion_rounds:
        assert sum(len(t.leaves()) for t in piped) > len(piped)  # some tree branched
    else:
        assert len(piped) > len(prompts)  # the budget added chains
    assert len(piped_calls) <= len(calls)  # never more batched calls; usually fewer
    assert sum(piped_calls) == sum(calls)  # the same episode turns, batched differently


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_trees_on_cuda(policy, tokenizer, retriever, questions):
    import copy

    model = copy.deepcopy(policy).cuda()
    backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions["train"][:2]]
    trees = sample_trees(backend, SearchEnv(retriever, tokenizer), prompts, SamplingConfig(), AGENT, seed=0)
    assert all(len(t.leaves()) == 3 for t in trees)


# --- hand-made trees -----------------------------------------------------------------------------------


def _step(action_ids, obs_ids=(), finish=None, action="search"):
    return Step(list(action_ids), [-0.5] * len(action_ids), "", action, list(obs_ids), "", finish)


def _hand_tree() -> Tree:
    """prompt [1, 2]; 0 → 1 → 2(leaf); 0 → 3(leaf); 4(leaf) from the root; 1 → 5(leaf)."""
    t = Tree("p", 0, [1, 2])
    t.attach(ROOT, [_step([10, 11], [12]), _step([20], [21, 22]), _step([30], finish="answer")], 0)
    t.attach(0, [_step([40, 41], finish="eos")], 1)
    t.attach(ROOT, [_step([50], finish="answer")], 1)
    t.attach(1, [_step([60], finish="length")], 2)
    return t


def test_hand_made_tree_structure_and_prefix():
    t = _hand_tree()
    assert [(n.node_id, n.parent_id, n.depth, n.expansion_round) for n in t.nodes] == [
        (0, None, 1, 0), (1, 0, 2, 0), (2, 1, 3, 0), (3, 0, 2, 1), (4, None, 1, 1), (5, 1, 3, 2)]
    assert t.nodes[0].children == [1, 3] and t.nodes[1].children == [2, 5]
    assert t.prefix(ROOT) == [1, 2]
    assert t.prefix(0) == [1, 2, 10, 11, 12]
    assert t.prefix(1) == [1, 2, 10, 11, 12, 20, 21, 22]
    assert t.prefix(2) == [1, 2, 10, 11, 12, 20, 21, 22, 30]
    assert t.prefix(3) == [1, 2, 10, 11, 12, 40, 41]
    assert t.prefix(4) == [1, 2, 50]
    assert t.prefix(5) == [1, 2, 10, 11, 12, 20, 21, 22, 60]
    assert [n.node_id for n in t.path(5)] == [0, 1, 5]
    assert t.expandable() == [ROOT, 0, 1]
    assert [n.node_id for n in t.leaves()] == [2, 3, 4, 5]


def test_hand_made_keep_leaves_renumbers_densely():
    t = _hand_tree()
    full = {tuple(t.prefix(n.node_id)) for n in t.leaves()}
    t.keep_leaves(2, random.Random(0))
    _check_structure_hand(t)
    assert len(t.leaves()) == 2
    assert {tuple(t.prefix(n.node_id)) for n in t.leaves()} <= full
    # the kept leaves are a random choice: over seeds every pair of the 4 leaves occurs, and each pruned
    # tree keeps exactly the nodes on the kept paths
    kept_sets = set()
    for seed in range(60):
        t = _hand_tree()
        t.keep_leaves(2, random.Random(seed))
        _check_structure_hand(t)
        assert {n.node_id for leaf in t.leaves() for n in t.path(leaf.node_id)} == set(range(len(t.nodes)))
        kept_sets.add(frozenset(tuple(t.prefix(n.node_id)) for n in t.leaves()))
    assert len(kept_sets) == 6


def _check_structure_hand(t: Tree):
    assert [n.node_id for n in t.nodes] == list(range(len(t.nodes)))
    for n in t.nodes:
        if n.parent_id is not None:
            assert n.depth == t.nodes[n.parent_id].depth + 1
            assert n.node_id in t.nodes[n.parent_id].children
        assert all(t.nodes[c].parent_id == n.node_id for c in n.children)


def test_hand_made_node_rows():
    rows = node_rows([_hand_tree()], policy_version=0)
    assert rows[0]["token_ids"] == [10, 11, 12]
    assert rows[0]["loss_mask"] == [True, True, False]
    assert rows[0]["logprobs"][:2] == [-0.5, -0.5] and math.isnan(rows[0]["logprobs"][2])
    assert [r["is_leaf"] for r in rows] == [False, False, True, True, True, True]
    assert [r["finish_reason"] for r in rows] == [None, None, "answer", "eos", "answer", "length"]
    schemas.to_table(rows, schemas.NODES)  # validates


def test_node_is_leaf_follows_finish_reason():
    assert Node(0, None, 1, 0, _step([1], finish="answer")).is_leaf
    assert not Node(0, None, 1, 0, _step([1], [2])).is_leaf


def test_prefilled_tokens_are_what_the_model_was_fed(setup, trees):
    """Budget input: with the backend's prefix cache a turn feeds only what was not computed before — after
    the first turn the parent's observation and its last generated token; a round-1 expansion one token (0 for
    a repeat of the same context); without the cache, the whole prompt plus the path above it."""
    backend, env, prompts = setup
    for tree in trees:
        for node in tree.nodes:
            parent = ROOT if node.parent_id is None else node.parent_id
            assert 0 <= node.step.prefilled <= len(tree.prefix(parent))
            first_of_expansion = node.expansion_round > 0 and (
                node.parent_id is None or tree.nodes[node.parent_id].expansion_round < node.expansion_round
            )
            if first_of_expansion:
                assert node.step.prefilled <= 1
            elif node.parent_id is not None:
                assert node.step.prefilled <= len(tree.nodes[node.parent_id].step.obs_ids) + 1
    plain = HFBackend(backend.model, backend.pad_id, backend.eos_id, prefix_cache_mb=0)
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=2, expansion_rounds=1)
    calls = []  # identical contexts of one generate call go to the model once
    generate = plain.generate

    def recording(contexts, *args, **kwargs):
        outs = generate(contexts, *args, **kwargs)
        calls.append([(tuple(c), o.prefilled) for c, o in zip(contexts, outs, strict=True)])
        return outs

    plain.generate = recording
    trees = sample_trees(plain, env, prompts, sampling, AGENT, seed=0)
    repeated = 0
    for call in calls:
        fed = defaultdict(list)
        for context, prefilled in call:
            fed[context].append(prefilled)
        for context, counts in fed.items():
            assert sorted(counts) == [0] * (len(counts) - 1) + [len(context)]
            repeated += len(counts) > 1
    assert repeated  # the M trees of a prompt start from one context
    assert sum(len(call) for call in calls) == sum(len(t.nodes) for t in trees)  # one row per node

class _Recording:
    """Wraps a backend and records each turn's context and token cap, to read back what an episode was allowed."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def clear_cache(self):
        self.inner.clear_cache()

    def generate(self, contexts, max_new_tokens, *args, **kwargs):
        self.calls += [(tuple(c), cap) for c, cap in zip(contexts, max_new_tokens, strict=True)]
        return self.inner.generate(contexts, max_new_tokens, *args, **kwargs)


def test_an_expansion_from_depth_d_has_exactly_what_its_path_had_left(setup):
    """Caps count from the root for chains and branches alike: a continuation from a node at depth d gets the turns
    (max_turns − d) and the tokens (max_total_tokens − its prefix, per turn at most max_tokens_per_turn) that the
    chain through that node had left at the same point, and no pool cuts it."""
    backend, env, prompts = setup
    agent = AgentConfig(max_turns=3, max_tokens_per_turn=12, max_total_tokens=70)  # tight: the caps bind
    rec = _Recording(backend)
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=4, expansion_rounds=2)
    trees = sample_trees(rec, env, prompts, sampling, agent, seed=3)
    caps = dict(rec.calls)  # a context always gets the same cap: it depends on the context alone
    assert len(caps) == len(set(rec.calls))
    branched = 0
    for tree in trees:
        for node in tree.nodes:
            context = tree.prefix(node.parent_id if node.parent_id is not None else ROOT)
            expected = min(agent.max_tokens_per_turn, agent.max_total_tokens - len(context))
            assert caps[tuple(context)] == expected  # the turn's token cap, root-relative
            assert len(node.step.action_ids) <= expected
            assert node.depth <= agent.max_turns
            if node.is_leaf:
                assert node.step.finish_reason != "budget"  # no pool here
                assert len(tree.prefix(node.node_id)) <= agent.max_total_tokens
                if node.step.finish_reason == "max_turns":
                    assert node.depth == agent.max_turns  # turns count from the root, not from the branch point
            if node.expansion_round > 0 and node.parent_id is not None and \
                    tree.nodes[node.parent_id].expansion_round == 0:
                branched += 1
                # the round-0 chain through the same parent continued from the very same context
                sibling = next(c for c in tree.nodes[node.parent_id].children
                               if tree.nodes[c].expansion_round == 0)
                assert tree.prefix(node.parent_id) == context and tree.nodes[sibling].depth == node.depth
    assert branched > 0  # expansions from intermediate steps were exercised
    assert any(n.step.finish_reason in ("max_turns", "length") for t in trees for n in t.leaves())
