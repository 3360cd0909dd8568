"""components.sampling.reference_backend and the generation contract: the plain `model.generate` backend against
the engine (greedy tokens equal, behaviour log-probs within float32 tolerance), and `sampling.backend` choosing
the backend for sampling and evaluation alike."""

from __future__ import annotations

import copy

import pytest
import torch

from arborl.components.config import AgentConfig, Config
from arborl.components.models import prompt_ids, save_policy
from arborl.components.sampling.agent import Episode, SearchEnv, run_episodes
from arborl.components.sampling.backends import load_backend
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.generation import GenerationBackend, cut_turn
from arborl.components.sampling.reference_backend import GenerateBackend
from arborl.components.sampling.rng import row_generators
from arborl.components.sampling.vllm_backend import VLLMBackend


def _contexts(tokenizer) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [[tokenizer.bos_token_id] + torch.randint(4, len(tokenizer), (n,), generator=g).tolist()
            for n in (9, 3, 14, 6, 9)]


@torch.no_grad()
def _teacher_forced(model, context: list[int], tokens: list[int], temperature: float) -> list[float]:
    logits = model(input_ids=torch.tensor([context + tokens])).logits[0].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return [float(logp[len(context) - 1 + i, t]) for i, t in enumerate(tokens)]


def test_every_backend_satisfies_the_contract(peaked_model, tokenizer):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for backend in (HFBackend(peaked_model, pad, eos), GenerateBackend(peaked_model, pad, eos),
                    VLLMBackend(llm=None, pad_id=pad, eos_id=eos)):  # no vLLM here: the wrapper alone
        assert isinstance(backend, GenerationBackend)


def test_cut_turn_keeps_tokens_up_to_the_first_stop_or_eos():
    assert cut_turn([5, 6, 7, 8], {7}, eos_id=2).tokens == [5, 6, 7]
    assert cut_turn([5, 2, 7], {7}, eos_id=2).stop == "eos"
    out = cut_turn([5, 6], {7}, eos_id=2)
    assert (out.tokens, out.stop) == ([5, 6], "length")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_greedy_reference_equals_the_engine(peaked_model, tokenizer, temperature):
    contexts = _contexts(tokenizer)
    limits = [12, 7, 12, 1, 0]
    stop = {contexts[0][3], contexts[2][5]}  # tokens the model may well write
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    engine = HFBackend(peaked_model, pad, eos).generate(contexts, limits, stop, temperature, greedy=True)
    ref = GenerateBackend(peaked_model, pad, eos, batch_size=3).generate(contexts, limits, stop, temperature,
                                                                         greedy=True)
    for e, r, limit in zip(engine, ref, limits, strict=True):
        assert r.tokens == e.tokens and r.stop == e.stop
        assert len(r.tokens) <= limit
        assert r.logprobs == pytest.approx(e.logprobs, abs=1e-4)
    assert [r.prefilled for r in ref] == [len(c) for c in contexts]  # generate feeds every context whole


def test_sampled_logprobs_are_the_tempered_distributions(peaked_model, tokenizer):
    contexts = _contexts(tokenizer)
    backend = GenerateBackend(peaked_model, tokenizer.pad_token_id, -1)
    gens = row_generators(list(range(len(contexts))))
    outs = backend.generate(contexts, [10] * len(contexts), set(), temperature=0.7, generator=gens)
    for ctx, out in zip(contexts, outs, strict=True):
        assert len(out.tokens) == 10 and out.stop == "length"
        assert out.logprobs == pytest.approx(_teacher_forced(peaked_model, ctx, out.tokens, 0.7), abs=1e-4)


def test_per_row_generators_make_rows_independent_of_their_batch(peaked_model, tokenizer):
    contexts = _contexts(tokenizer)
    backend = GenerateBackend(peaked_model, tokenizer.pad_token_id, -1)
    together = backend.generate(contexts, [8] * 5, set(), generator=row_generators([11, 12, 13, 14, 15]))
    alone = backend.generate(contexts[2:3], [8], set(), generator=row_generators([13]))
    assert alone[0].tokens == together[2].tokens
    shared = backend.generate(contexts, [8] * 5, set(), generator=torch.Generator().manual_seed(0))
    again = backend.generate(contexts, [8] * 5, set(), generator=torch.Generator().manual_seed(0))
    assert [o.tokens for o in shared] == [o.tokens for o in again]


def test_greedy_agent_episodes_are_the_same_through_either_backend(policy, tokenizer, retriever, questions):
    """The agent loop (tool calls, observations, stop tags) over a warm-started policy: one backend or the other
    gives the same episodes."""
    model = copy.deepcopy(policy)
    env = SearchEnv(retriever, tokenizer)
    agent = AgentConfig()
    episodes = {}
    for name, backend in (("engine", HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)),
                          ("generate", GenerateBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id))):
        eps = [Episode(prompt_ids(tokenizer, q["prompt"]), agent.max_turns) for q in questions["val"]]
        run_episodes(backend, env, eps, agent, greedy=True)
        episodes[name] = eps
    assert sum(len(e.steps) for e in episodes["engine"]) > len(questions["val"])  # the policy does search
    for e, r in zip(episodes["engine"], episodes["generate"], strict=True):
        assert [s.action_ids for s in r.steps] == [s.action_ids for s in e.steps]
        assert [s.obs_ids for s in r.steps] == [s.obs_ids for s in e.steps]
        for se, sr in zip(e.steps, r.steps, strict=True):
            assert sr.action_logprobs == pytest.approx(se.action_logprobs, abs=1e-4)


def test_sampling_backend_selects_the_backend(tmp_path, peaked_model, tokenizer):
    save_policy(peaked_model, tokenizer, str(tmp_path / "model"))
    cfg = Config()
    for name, kind in (("hf", HFBackend), ("generate", GenerateBackend)):
        cfg.sampling.backend = name
        loaded = load_backend(cfg, str(tmp_path / "model"), "cpu", batch_size=7)
        assert type(loaded.backend) is kind and loaded.backend.batch_size == 7
        assert loaded.context_window == peaked_model.config.max_position_embeddings
    cfg.sampling.backend = "vllm"
    with pytest.raises(ImportError, match="vllm"):  # vLLM is not installed here: the backend asked for is built
        load_backend(cfg, str(tmp_path / "model"), "cpu")
