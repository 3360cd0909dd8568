"""The Search-R1 agent loop over a batch of episodes: generate a turn, call the tool, append the
observation, repeat until an answer, EOS, `max_turns` or the token caps end the episode.

All live episodes advance together, so each turn is one batched generation call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from components.config import AgentConfig
from components.envs import protocol
from components.envs.retriever import FTSRetriever, RetrieverError
from components.sampling.backend import HFBackend


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

    def observe(self, query: str) -> tuple[str, list[int], str | None]:
        try:
            docs, error = self.retriever.search(query), None
        except RetrieverError as exc:
            docs, error = [], str(exc)
        text = protocol.observation(docs)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"], error


def run_episodes(
    backend: HFBackend,
    env: SearchEnv,
    episodes: list[Episode],
    agent: AgentConfig,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> None:
    """Advance every episode to its end, in place."""
    decode = env.tokenizer.decode
    while True:
        live = [e for e in episodes if not e.done]
        if not live:
            return
        contexts = [e.context() for e in live]
        budgets = [min(agent.max_tokens_per_turn, agent.max_total_tokens - len(c)) for c in contexts]
        outs = backend.generate(contexts, budgets, env.stop_ids, temperature, greedy, generator)
        for ep, ctx, out in zip(live, contexts, outs, strict=True):
            text = decode(out.tokens)
            action = protocol.turn_action(text) if out.stop == "stop" else "invalid"
            fed = len(ctx) if out.prefilled is None else out.prefilled  # a prefix cache feeds only the rest
            step = Step(out.tokens, out.logprobs, text, action, prefilled=fed)
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
