"""components.sampling.reference_backend and the generation contract: the plain `model.generate` backend against
the engine (greedy tokens equal, behaviour log-probs within float32 tolerance, with stop tokens and with stop
strings spelled across byte-level BPE tokens), and `sampling.backend` choosing the backend for sampling and
evaluation alike."""

from __future__ import annotations

import copy

import pytest
import torch

from arborl.components.config import AgentConfig, Config
from arborl.components.sampling.agent import Episode, SearchEnv, run_episodes
from arborl.components.sampling.backends import load_backend
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.generation import GenerationBackend, StopStrings, cut_turn, token_pieces
from arborl.components.sampling.reference_backend import GenerateBackend
from arborl.components.sampling.rng import row_generators
from arborl.components.sampling.vllm_backend import VLLMBackend
from arborl.components.training.models import prompt_ids, save_policy
from tests.components.sampling.test_generation import (
    TAGS,
    bpe_tokenizer,
    chain_model,
    encode,
    spelled_tags,
    tiny_llama,
    tiny_qwen2,
)


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


def _bpe_model(arch: str, tok, chains=None):
    model = tiny_qwen2(tok, tie=chains is None) if arch == "qwen2" else tiny_llama(tok)
    return model if chains is None else chain_model(model, chains)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_reference_stops_at_stop_strings_spelled_across_tokens(arch):
    """Greedy turns that spell the closing tags across byte-level BPE tokens end at the completing token, as in
    the engine, in batches or row by row; `generate` itself stops once every row has hit one."""
    tok = bpe_tokenizer()
    contexts, chains, ends = spelled_tags(tok)
    model = _bpe_model(arch, tok, chains)
    stops = StopStrings.from_tokenizer(TAGS, tok)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    limits = [12] * len(contexts)
    engine = HFBackend(model, pad, eos).generate(contexts, limits, set(), greedy=True, stop_strings=stops)
    reference = GenerateBackend(model, pad, eos, batch_size=3)
    batched = reference.generate(contexts, limits, set(), greedy=True, stop_strings=stops)
    alone = reference.generate(contexts, limits, set(), greedy=True, generator=row_generators([1, 2, 3, 4]),
                               stop_strings=stops)
    for i, end in enumerate(ends):
        if end:
            assert (engine[i].tokens, engine[i].stop) == (chains[i][1: end + 1], "stop")
        for r in (batched[i], alone[i]):
            assert (r.tokens, r.stop) == (engine[i].tokens, engine[i].stop)
            assert r.logprobs == pytest.approx(engine[i].logprobs, abs=1e-4)

    steps = []
    hook = model.register_forward_hook(lambda *_: steps.append(1))
    try:
        reference.generate(contexts[:3], [40] * 3, set(), greedy=True, stop_strings=stops)
    finally:
        hook.remove()
    assert len(steps) == max(ends)  # one forward per generated token, none past the last row's tag


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_reference_equals_the_engine_with_stop_strings(arch):
    """A random byte-level BPE model, stop strings taken from its own greedy text across token boundaries: both
    backends end every row at the same token, with the same log-probs, where `cut_turn` cuts its uncut turn."""
    tok = bpe_tokenizer()
    model = _bpe_model(arch, tok)
    pieces = token_pieces(tok)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    contexts = [encode(tok, line) for line in ("<search> who wrote", "<answer>", "the capital of",
                                                "<think> the river", "a")]
    limits = [12, 12, 7, 12, 12]
    plain = GenerateBackend(model, pad, eos).generate(contexts, limits, set(), greedy=True)
    texts = set()
    for out in plain:
        a, b = pieces[out.tokens[3]], pieces[out.tokens[4]]
        if a and b:
            texts.add(a[-1] + b[:2])
    stops = StopStrings(tuple(sorted(texts)), pieces)
    engine = HFBackend(model, pad, eos).generate(contexts, limits, set(), greedy=True, stop_strings=stops)
    ref = GenerateBackend(model, pad, eos, batch_size=2).generate(contexts, limits, set(), greedy=True,
                                                                  stop_strings=stops)
    straddling = 0
    for p, e, r in zip(plain, engine, ref, strict=True):
        want = cut_turn(p.tokens, set(), eos, stops)
        assert (e.tokens, e.stop) == (r.tokens, r.stop) == (want.tokens, want.stop)
        assert e.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        assert r.logprobs == pytest.approx(p.logprobs[: len(r.tokens)], abs=1e-4)  # other batches: other padding
        straddling += e.stop == "stop" and not any(t in pieces[e.tokens[-1]] for t in stops.texts)
    assert straddling >= 3
