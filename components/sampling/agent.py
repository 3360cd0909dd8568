"""The Search-R1 agent loop over a batch of episodes: generate a turn, call the tool, append the
observation, repeat until an answer, EOS, `max_turns` or the token caps end the episode.

In segment mode (`agent.node_mode: segment`, tool-free tasks) a step is instead a piece of one
continuous generation: it ends at the delimiter token or after `segment_tokens` tokens, nothing is
appended, and the next step continues the same text, until an answer, EOS, `max_turns` segments or
the length cap.

All live episodes advance together, so each turn is one batched generation call. An episode with a
`seed` samples from its own generator, re-seeded every turn, so its tokens do not depend on its batch.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from arborl.components.config import AgentConfig
from arborl.components.envs import protocol
from arborl.components.envs.retriever import MEMO_ENTRIES, FTSRetriever, RetrieverError
from arborl.components.sampling.generation import GenerationBackend
from arborl.components.sampling.rng import Generators, row_generators, stable_seed


@dataclass
class Step:
    """One agent step = one tree node: model-written action tokens, then observation tokens."""

    action_ids: list[int]
    action_logprobs: list[float]
    action_text: str
    action: str  # search / answer / invalid
    obs_ids: list[int] = field(default_factory=list)
    obs_text: str = ""
    finish_reason: str | None = None  # set on the episode's last step
    tool_error: str | None = None
    prefilled: int = 0  # context tokens fed to the model before this turn's first generated token (cached ones not)


@dataclass
class Episode:
    prefix: list[int]  # prompt + earlier steps' tokens (for an expansion from an intermediate node)
    turns_left: int
    steps: list[Step] = field(default_factory=list)
    seed: int | None = None  # own sampling stream (see module doc); None: the caller's shared generator

    @property
    def done(self) -> bool:
        return bool(self.steps) and self.steps[-1].finish_reason is not None

    def context(self) -> list[int]:
        ids = list(self.prefix)
        for s in self.steps:
            ids += s.action_ids + s.obs_ids
        return ids


class SearchEnv:
    """The `search` tool wired to a tokenizer: query text in, observation tokens out."""

    def __init__(self, retriever: FTSRetriever, tokenizer):
        self.retriever = retriever
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.stop_ids = {vocab[t] for t in protocol.TURN_STOPS}
        self.search_close = vocab[protocol.SEARCH_CLOSE]
        self.answer_close = vocab[protocol.ANSWER_CLOSE]
        self._encoded: dict[str, list[int]] = {}  # observation text → token ids (the same docs recur often)

    def observe(self, query: str) -> tuple[str, list[int], str | None]:
        try:
            docs, error = self.retriever.search(query), None
        except RetrieverError as exc:
            docs, error = [], str(exc)
        text = protocol.observation(docs)
        ids = self._encoded.get(text)
        if ids is None:
            if len(self._encoded) >= MEMO_ENTRIES:
                self._encoded.clear()
            ids = self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text, list(ids), error


def segment_stop_ids(env: SearchEnv, agent: AgentConfig) -> set[int]:
    """Segment mode's stop tokens: the answer's closing tag and the delimiter, which must be one token."""
    stops = {env.answer_close}
    if agent.segment_delimiter is not None:
        ids = env.tokenizer(agent.segment_delimiter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"agent.segment_delimiter {agent.segment_delimiter!r} is {len(ids)} tokens for this tokenizer; "
                "it must be exactly one"
            )
        stops.add(ids[0])
    return stops


def _generators(live: list[Episode], shared: torch.Generator | None) -> Generators:
    if all(e.seed is not None for e in live):
        return row_generators([stable_seed(e.seed, len(e.steps)) for e in live])
    return shared


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Sampling makes many short-lived objects, and each of the collector's full passes would rescan the whole
    heap (world, questions, model, caches): pauses of ~0.2 s were measured mid-sampling. Objects alive before
    the block are moved out of the collector's sight for its duration (`gc.freeze`); new ones are still
    collected. Where something else froze objects already, nothing is done (unfreezing would undo its freeze)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_episodes(
    backend: GenerationBackend,
    env: SearchEnv,
    episodes: list[Episode],
    agent: AgentConfig,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> None:
    """Advance every episode to its end, in place."""
    with frozen_heap():
        while run_turn(backend, env, episodes, agent, temperature, greedy, generator):
            pass


def run_turn(
    backend: GenerationBackend,
    env: SearchEnv,
    episodes: list[Episode],
    agent: AgentConfig,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> bool:
    """Advance every live episode by one step (one batched generation call), in place. Returns whether any
    episode was live."""
    segment = agent.node_mode == "segment"
    stop_ids = segment_stop_ids(env, agent) if segment else env.stop_ids
    turn_cap = agent.segment_tokens if segment else agent.max_tokens_per_turn
    live = [e for e in episodes if not e.done]
    if not live:
        return False
    contexts = [e.context() for e in live]
    budgets = [min(turn_cap, agent.max_total_tokens - len(c)) for c in contexts]
    outs = backend.generate(contexts, budgets, stop_ids, temperature, greedy, _generators(live, generator))
    for ep, ctx, out in zip(live, contexts, outs, strict=True):
        text = env.tokenizer.decode(out.tokens)
        if segment:
            _segment_step(ep, ctx, out, text, env, agent)
        else:
            _tool_step(ep, ctx, out, text, env, agent)
    return True


def _fed(ctx: list[int], out) -> int:
    """Tokens the backend actually fed for this turn: a prefix cache feeds only what it has not seen."""
    return len(ctx) if out.prefilled is None else out.prefilled


def _segment_step(ep: Episode, ctx: list[int], out, text: str, env: SearchEnv, agent: AgentConfig) -> None:
    answered = out.stop == "stop" and bool(out.tokens) and out.tokens[-1] == env.answer_close
    step = Step(out.tokens, out.logprobs, text, "answer" if answered else "segment", prefilled=_fed(ctx, out))
    ep.steps.append(step)
    ep.turns_left -= 1
    if answered:
        step.finish_reason = "answer"
    elif out.stop == "eos":
        step.finish_reason = "eos"
    elif len(ctx) + len(out.tokens) >= agent.max_total_tokens:
        step.finish_reason = "length"
    elif ep.turns_left <= 0:
        step.finish_reason = "max_turns"


def _tool_step(ep: Episode, ctx: list[int], out, text: str, env: SearchEnv, agent: AgentConfig) -> None:
    action = protocol.turn_action(text) if out.stop == "stop" else "invalid"
    step = Step(out.tokens, out.logprobs, text, action, prefilled=_fed(ctx, out))
    ep.steps.append(step)
    ep.turns_left -= 1
    if action == "answer":
        step.finish_reason = "answer"
    elif out.stop == "eos":
        step.finish_reason = "eos"
    elif action != "search":
        step.finish_reason = "length"
    elif ep.turns_left <= 0:
        step.finish_reason = "max_turns"
    else:
        step.obs_text, step.obs_ids, step.tool_error = env.observe(protocol.search_query(text))
        if len(ctx) + len(step.action_ids) + len(step.obs_ids) >= agent.max_total_tokens:
            step.obs_text, step.obs_ids = "", []
            step.finish_reason = "length"
