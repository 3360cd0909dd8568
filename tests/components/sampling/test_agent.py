"""components.sampling.agent: an episode's token allowance, and segment mode (tool-free nodes cut from one continuous
generation)."""

from __future__ import annotations

import pytest
import torch

from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.envs.protocol import ANSWER_CLOSE, SEARCH_CLOSE
from arborl.components.sampling.agent import Episode, SearchEnv, run_episodes
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.training.models import prompt_ids


@pytest.fixture(scope="module")
def setup(policy, tokenizer, retriever, questions):
    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [prompt_ids(tokenizer, q["prompt"]) for q in questions["train"][:6]]
    return backend, SearchEnv(retriever, tokenizer), prompts


def test_an_allowance_cuts_the_episode_where_its_tokens_run_out(setup):
    """The same greedy episodes with and without an allowance: capped ones are the uncapped ones cut after exactly
    `allowance` generated tokens (finish reason `budget`, no observation); ones that end within it are unchanged."""
    backend, env, prompts = setup
    agent = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
    free = [Episode(list(p), agent.max_turns) for p in prompts]
    run_episodes(backend, env, free, agent, greedy=True)
    cap = 7
    capped = [Episode(list(p), agent.max_turns, allowance=cap) for p in prompts]
    run_episodes(backend, env, capped, agent, greedy=True)
    assert any(e.generated > cap for e in free)  # some are cut
    for f, c in zip(free, capped, strict=True):
        tokens = [t for s in f.steps for t in s.action_ids]
        assert [t for s in c.steps for t in s.action_ids] == tokens[:cap]
        if f.generated > cap:
            assert c.generated == cap and c.steps[-1].finish_reason == "budget" and c.steps[-1].obs_ids == []
        else:
            assert [s.finish_reason for s in c.steps] == [s.finish_reason for s in f.steps]


def _segment_agent(**kw) -> AgentConfig:
    # max_turns (the segment cap) above max_total_tokens: episodes end at an answer, EOS or the length cap
    return AgentConfig(**{"node_mode": "segment", "segment_tokens": 5, "max_turns": 100, "max_total_tokens": 90,
                          **kw})


def _greedy_segments(setup, agent):
    backend, env, prompts = setup
    episodes = [Episode(list(p), agent.max_turns) for p in prompts]
    run_episodes(backend, env, episodes, agent, greedy=True)
    continuous = backend.generate(prompts, [agent.max_total_tokens - len(p) for p in prompts], {env.answer_close},
                                  greedy=True)
    return episodes, continuous


def test_segments_are_short_and_concatenate_to_the_continuous_generation(setup, tokenizer):
    agent = _segment_agent()
    episodes, continuous = _greedy_segments(setup, agent)
    for ep, whole in zip(episodes, continuous, strict=True):
        steps = ep.steps
        assert all(1 <= len(s.action_ids) <= agent.segment_tokens for s in steps)
        assert all(s.obs_ids == [] and s.tool_error is None for s in steps)  # no tool in segment mode
        assert sum((s.action_ids for s in steps), []) == whole.tokens
        assert all(len(s.action_ids) == agent.segment_tokens for s in steps[:-1])  # no delimiter: cut by length
        assert [s.finish_reason is not None for s in steps] == [False] * (len(steps) - 1) + [True]
        last = steps[-1]
        if last.finish_reason == "answer":
            assert last.action_ids[-1] == tokenizer.convert_tokens_to_ids(ANSWER_CLOSE) and last.action == "answer"
        else:
            assert last.finish_reason in ("eos", "length")
        assert all(s.action == "segment" for s in steps[:-1])
    assert any(len(ep.steps) > 2 for ep in episodes)


def test_a_delimiter_token_also_ends_a_segment(setup, tokenizer):
    agent = _segment_agent(segment_delimiter=SEARCH_CLOSE, segment_tokens=8)
    delim = tokenizer.convert_tokens_to_ids(SEARCH_CLOSE)
    episodes, continuous = _greedy_segments(setup, agent)
    cut_at_delimiter = 0
    for ep, whole in zip(episodes, continuous, strict=True):
        assert sum((s.action_ids for s in ep.steps), []) == whole.tokens
        for s in ep.steps[:-1]:
            assert len(s.action_ids) == agent.segment_tokens or s.action_ids[-1] == delim
            assert delim not in s.action_ids[:-1]
            cut_at_delimiter += s.action_ids[-1] == delim and len(s.action_ids) < agent.segment_tokens
    assert cut_at_delimiter > 0


def test_a_delimiter_of_several_tokens_is_refused(setup):
    backend, env, prompts = setup
    agent = _segment_agent(segment_delimiter="</search> <answer>")
    with pytest.raises(ValueError, match="agent.segment_delimiter .* is 2 tokens"):
        run_episodes(backend, env, [Episode(prompts[0], 4)], agent, greedy=True)


def test_segment_trees_expand_from_segment_boundaries(setup, policy):
    backend, env, prompts = setup
    agent = _segment_agent(segment_tokens=4, max_turns=20, max_total_tokens=70)
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=2, expansion_rounds=1)
    trees = sample_trees(backend, env, [(f"p{i}", p) for i, p in enumerate(prompts)], sampling, agent, seed=0)
    from_inner = 0
    for t in trees:
        assert len(t.leaves()) == 3
        for n in t.nodes:
            assert 1 <= len(n.step.action_ids) <= 4 and n.step.obs_ids == []
            assert n.is_leaf or len(n.step.action_ids) == 4  # inner nodes are full-length cuts
        from_inner += sum(n.expansion_round == 1 and n.parent_id is not None
                          and t.nodes[n.parent_id].expansion_round == 0 for n in t.nodes)
        # every root→leaf path is one continuous text: teacher forcing reproduces the behaviour log-probs
        for leaf in t.leaves():
            ids = t.prefix(leaf.node_id)
            assert len(ids) <= agent.max_total_tokens
            with torch.no_grad():
                logp = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            stored = [lp for n in t.path(leaf.node_id) for lp in n.step.action_logprobs]
            pos = len(t.prompt_ids)
            assert stored == pytest.approx([float(logp[pos - 1 + i, tok]) for i, tok in enumerate(ids[pos:])],
                                           abs=1e-4)
    assert from_inner > 0


def test_frozen_heap_hides_old_objects_from_the_collector_and_restores_it():
    import gc

    from arborl.components.sampling.agent import frozen_heap

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()  # someone else's freeze is left alone
    try:
        frozen = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
