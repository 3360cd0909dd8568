"""The agent loop with a real chat model's shape: a byte-level BPE tokenizer with no BOS and closing tags that span
several tokens, a chat template modelled on Qwen2.5's, and a small Qwen2-architecture model (random weights, taught
the turn format in a few supervised steps). Turns stop on the tags as text, history is never re-tokenised, the
loss mask covers exactly the model's tokens, and the stored log-probs are the model's own."""

from __future__ import annotations

import json
import random

import pytest
import torch

from arborl.components.advantages.registry import leaf_advantages
from arborl.components.config import AgentConfig, SamplingConfig, TrainConfig
from arborl.components.envs import protocol
from arborl.components.sampling.agent import Episode, SearchEnv, run_episodes
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.reference_backend import GenerateBackend
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.sampling.tree import node_rows
from arborl.components.training.models import row_prompt_ids
from arborl.components.training.trainer import build_units, policy_update
from tests.models_bpe import bpe_tokenizer, qwen2_model, teach_search_format

AGENT = AgentConfig(max_turns=3, max_tokens_per_turn=24, max_total_tokens=640, on_invalid="continue")


@pytest.fixture(scope="module")
def rows(questions) -> list[dict]:
    out = []
    for q in questions["train"][:16]:
        question = q["prompt"].replace(protocol.QUESTION_OPEN, "").replace(protocol.QUESTION_CLOSE, "").strip()
        content = protocol.SEARCH_R1_TEMPLATE.format(question=question)
        out.append({**q, "prompt": content, "messages": json.dumps([{"role": "user", "content": content}])})
    return out


@pytest.fixture(scope="module")
def bpe(facts, questions):
    texts = [f["text"] for f in facts] + [q["prompt"].split(">", 1)[-1].rsplit("<", 1)[0]
                                          for split in questions.values() for q in split]
    return bpe_tokenizer(texts)


@pytest.fixture(scope="module")
def qwen(bpe, rows):
    model = qwen2_model(bpe, seed=0)
    teach_search_format(model, bpe, rows)
    return model


def _episodes(env, rows, repeats=1):
    return [Episode(env.prompt_ids(r), AGENT.max_turns, seed=i * 7 + k) for k in range(repeats)
            for i, r in enumerate(rows)]


def test_the_tokenizer_is_shaped_like_a_real_chat_model(bpe, rows):
    assert bpe.bos_token_id is None
    for tag in protocol.TURN_STOPS:
        assert len(bpe(tag, add_special_tokens=False)["input_ids"]) > 1
    ids = row_prompt_ids(bpe, rows[0])
    start = bpe.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start  # no BOS: the chat template's first token
    assert bpe.decode(ids).endswith("<|im_start|>assistant\n")
    assert row_prompt_ids(bpe, rows[0], "none")[0] != start  # the template off: the content as plain text


@pytest.mark.parametrize("backend_cls", [HFBackend, GenerateBackend])
def test_turns_stop_at_the_tag_text_and_observations_are_appended_as_tokenised_alone(qwen, bpe, retriever, rows,
                                                                                       backend_cls):
    env = SearchEnv(retriever, bpe)
    assert env.stop_strings is not None and env.style == "search-r1"
    episodes = _episodes(env, rows)
    run_episodes(backend_cls(qwen, bpe.pad_token_id, bpe.eos_token_id), env, episodes, AGENT)
    steps = [s for ep in episodes for s in ep.steps]
    searches = [s for s in steps if s.action == "search"]
    assert searches, "the taught model searches"
    for s in steps:
        if s.action in ("search", "answer"):
            tag = protocol.SEARCH_CLOSE if s.action == "search" else protocol.ANSWER_CLOSE
            assert tag in s.action_text
            assert tag not in bpe.decode(s.action_ids[:-1])  # the turn ended at the token that completed it
    for s in searches:
        if s.obs_ids:
            assert s.obs_text.startswith("\n\n<information>Doc 1(Title: ")
            assert s.obs_ids == bpe(s.obs_text, add_special_tokens=False)["input_ids"]
    for ep in episodes:  # token in, token out: the context is the prompt and the steps' own tokens
        assert ep.context()[: len(ep.prefix)] == ep.prefix
        assert len(ep.context()) == len(ep.prefix) + sum(len(s.action_ids) + len(s.obs_ids) for s in ep.steps)


def test_an_invalid_turn_gets_the_corrective_observation_and_the_episode_goes_on(qwen, bpe, retriever, rows):
    env = SearchEnv(retriever, bpe)
    agent = AGENT.model_copy(update={"max_tokens_per_turn": 2})  # too short for any tag: every turn is invalid
    episodes = _episodes(env, rows[:4])
    run_episodes(HFBackend(qwen, bpe.pad_token_id, bpe.eos_token_id), env, episodes, agent)
    for ep in episodes:
        if ep.steps[-1].finish_reason == "eos":
            continue
        assert len(ep.steps) == agent.max_turns and ep.steps[-1].finish_reason == "max_turns"
        for s in ep.steps[:-1]:
            assert s.action == "invalid" and s.obs_text == protocol.INVALID_FEEDBACK
            assert s.obs_ids == bpe(protocol.INVALID_FEEDBACK, add_special_tokens=False)["input_ids"]
    stopping = agent.model_copy(update={"on_invalid": "stop"})
    episodes = _episodes(env, rows[:4])
    run_episodes(HFBackend(qwen, bpe.pad_token_id, bpe.eos_token_id), env, episodes, stopping)
    assert all(len(ep.steps) == 1 for ep in episodes)


def test_stored_logprobs_equal_a_teacher_forced_forward(qwen, bpe, retriever, rows):
    env = SearchEnv(retriever, bpe)
    episodes = _episodes(env, rows[:8])
    run_episodes(HFBackend(qwen, bpe.pad_token_id, bpe.eos_token_id), env, episodes, AGENT,
                 generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        for ep in episodes:
            ids = ep.context()
            logp = torch.log_softmax(qwen(torch.tensor([ids])).logits[0].float(), -1)
            pos = len(ep.prefix)
            for s in ep.steps:
                for j, (tok, lp) in enumerate(zip(s.action_ids, s.action_logprobs, strict=True)):
                    worst = max(worst, abs(logp[pos + j - 1, tok].item() - lp))
                pos += len(s.action_ids) + len(s.obs_ids)
    assert worst < 1e-5


def test_trees_pack_and_train_with_the_loss_mask_on_model_tokens_only(qwen, bpe, retriever, rows):
    import copy

    model = copy.deepcopy(qwen)
    env = SearchEnv(retriever, bpe)
    prompts = {r["prompt_id"]: env.prompt_ids(r) for r in rows[:4]}
    trees = sample_trees(HFBackend(model, bpe.pad_token_id, bpe.eos_token_id), env, list(prompts.items()),
                         SamplingConfig(), AGENT, seed=0)
    nodes = node_rows(trees, 0)
    by_key = {(t.prompt_id, t.tree_id, n.node_id): n for t in trees for n in t.nodes}
    for r in nodes:
        step = by_key[(r["prompt_id"], r["tree_id"], r["node_id"])].step
        assert r["token_ids"] == step.action_ids + step.obs_ids
        assert r["loss_mask"] == [True] * len(step.action_ids) + [False] * len(step.obs_ids)
    rng = random.Random(0)
    rewards = {(r["prompt_id"], r["tree_id"], r["node_id"]): rng.choice([0.0, 1.0]) for r in nodes if r["is_leaf"]}
    units = build_units(prompts, nodes, leaf_advantages(rewards, "tree"))
    metrics = policy_update(model, torch.optim.Adam(model.parameters(), lr=1e-3), units, TrainConfig(),
                            bpe.pad_token_id, seed=0)
    assert metrics["logprob_mismatch"] < 1e-4
    assert metrics["packed"] == 1.0
    assert metrics["unique_tokens"] < metrics["duplicated_tokens"]
