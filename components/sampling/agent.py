"""The Search-R1 agent loop over a batch of episodes: generate a turn, call the tool, append the
observation, repeat until an answer, EOS, `max_turns` or the token caps end the episode. An episode with an
`allowance` (its share of an exact token budget, see `scheduler`) ends when it has generated that many tokens
(finish reason `budget`): it has no answer and is rewarded as such, like a trajectory cut by `max_total_tokens`.

Token in, token out: a turn's tokens are the ones the model sampled, an observation is tokenised alone and
appended, and the history is never re-tokenised, so the loss mask covers exactly the model's own tokens. A turn
ends at a closing tag found as text (`generation.StopStrings`), however the tokenizer spells it; with the
synthetic world's word-level tokenizer, where each tag is one token, at the tag's token. A turn that neither
searches nor answers ends the episode (`agent.on_invalid: stop`) or gets Search-R1's corrective observation
(`continue`). All searches of a turn go to the retriever in one batch.

In segment mode (`agent.node_mode: segment`, tool-free tasks) a step is instead a piece of one
continuous generation: it ends at the delimiter token or after `segment_tokens` tokens, nothing is
appended, and the next step continues the same text, until an answer, EOS, `max_turns` segments or
the length cap.

All live episodes advance together, so each turn is one batched generation call. An episode with a
`seed` samples from its own generator, re-seeded every turn, so its tokens do not depend on its batch.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from arborl.components.config import AgentConfig
from arborl.components.envs import protocol
from arborl.components.envs.retriever import MEMO_ENTRIES, FTSRetriever, RetrieverError
from arborl.components.sampling.generation import GenerationBackend, StopStrings, token_pieces
from arborl.components.sampling.rng import Generators, row_generators, stable_seed
from arborl.components.training.models import row_prompt_ids


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
    allowance: int | None = None  # most tokens it may generate in all (an exact token budget's share); None: no cap

    @property
    def done(self) -> bool:
        return bool(self.steps) and self.steps[-1].finish_reason is not None

    @property
    def generated(self) -> int:
        return sum(len(s.action_ids) for s in self.steps)

    def context(self) -> list[int]:
        ids = list(self.prefix)
        for s in self.steps:
            ids += s.action_ids + s.obs_ids
        return ids


class SearchEnv:
    """The `search` tool wired to a tokenizer: queries in, observation tokens out; and how turns stop.

    `chat_template`: `model.chat_template`, used by `prompt_ids`."""

    def __init__(self, retriever: FTSRetriever, tokenizer, chat_template: str = "auto"):
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        core = getattr(tokenizer, "backend_tokenizer", None)
        self.word_level = type(getattr(core, "model", None)).__name__ == "WordLevel"
        self.style = "words" if self.word_level else "search-r1"
        single = {tag: ids[0] for tag in protocol.TURN_STOPS
                  if len(ids := tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1}
        self.stop_ids = set(single.values())
        self.answer_close = single.get(protocol.ANSWER_CLOSE)  # the answer tag's own token, where it has one
        # Word-level: every tag is one token, so stopping at the token is exact and needs no text. Otherwise the
        # tags stop as text, whatever tokens spell them.
        self.stop_strings = None if self.word_level else StopStrings(protocol.TURN_STOPS, token_pieces(tokenizer))
        self._encoded: dict[str, list[int]] = {}  # observation text → token ids (the same docs recur often)
        self._feedback: list[int] | None = None

    def prompt_ids(self, row: dict) -> list[int]:
        """Token ids of a row of the prompts artifact (`models.row_prompt_ids`)."""
        return row_prompt_ids(self.tokenizer, row, self.chat_template)

    def _encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            if len(self._encoded) >= MEMO_ENTRIES:
                self._encoded.clear()
            ids = self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids)

    def observe(self, query: str) -> tuple[str, list[int], str | None]:
        return self.observe_batch([query])[0]

    def observe_batch(self, queries: list[str]) -> list[tuple[str, list[int], str | None]]:
        """(observation text, its token ids, tool error or None) per query, from one retriever call."""
        if hasattr(self.retriever, "search_batch"):
            results = self.retriever.search_batch(queries)
        else:
            results = []
            for query in queries:
                try:
                    results.append((self.retriever.search(query), None))
                except RetrieverError as exc:
                    results.append(([], str(exc)))
        out = []
        for docs, error in results:
            text = protocol.observation(docs, self.style)
            out.append((text, self._encode(text), error))
        return out

    def feedback(self) -> tuple[str, list[int]]:
        """The corrective observation of an invalid turn, and its token ids."""
        if self._feedback is None:
            ids = self.tokenizer(protocol.INVALID_FEEDBACK, add_special_tokens=False)["input_ids"]
            unk = self.tokenizer.unk_token_id
            if unk is not None and unk in ids:
                raise ValueError("agent.on_invalid 'continue': this tokenizer cannot spell the corrective observation "
                                 "(it maps some of its words to the unknown token); use 'stop'")
            self._feedback = ids
        return protocol.INVALID_FEEDBACK, list(self._feedback)


def segment_stops(env: SearchEnv, agent: AgentConfig) -> tuple[set[int], StopStrings | None]:
    """Segment mode's stops: the answer's closing tag and the delimiter (a token id where the tokenizer spells it
    as one token, else text)."""
    ids = {env.answer_close} if env.answer_close is not None else set()
    texts = [] if env.stop_strings is None else [protocol.ANSWER_CLOSE]
    if agent.segment_delimiter is not None:
        delim = env.tokenizer(agent.segment_delimiter, add_special_tokens=False)["input_ids"]
        if len(delim) == 1:
            ids.add(delim[0])
        elif env.word_level:
            raise ValueError(
                f"agent.segment_delimiter {agent.segment_delimiter!r} is {len(delim)} tokens for this word-level "
                "tokenizer; it must be exactly one"
            )
        else:
            texts.append(agent.segment_delimiter)
    strings = StopStrings(tuple(texts), env.stop_strings.pieces) if texts else None
    return ids, strings


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
    stop_ids, stop_strings = segment_stops(env, agent) if segment else (env.stop_ids, env.stop_strings)
    turn_cap = agent.segment_tokens if segment else agent.max_tokens_per_turn
    live = [e for e in episodes if not e.done]
    if not live:
        return False
    contexts = [e.context() for e in live]
    budgets = [min(turn_cap, agent.max_total_tokens - len(c), _allowance_left(e))
               for e, c in zip(live, contexts, strict=True)]
    outs = backend.generate(contexts, budgets, stop_ids, temperature, greedy, _generators(live, generator),
                            **({"stop_strings": stop_strings} if stop_strings is not None else {}))
    searches = []
    for ep, ctx, out in zip(live, contexts, outs, strict=True):
        text = env.tokenizer.decode(out.tokens)
        if segment:
            _segment_step(ep, ctx, out, text, agent)
            searched = False
        else:
            searched = _tool_step(ep, ctx, out, text, env, agent)
        if ep.allowance is not None and ep.generated >= ep.allowance and ep.steps[-1].finish_reason in (None, "length"):
            ep.steps[-1].finish_reason = "budget"  # its share of the budget is spent: no observation, no more turns
        elif searched:
            searches.append((ep, len(ctx)))
    if searches:
        found = env.observe_batch([protocol.search_query(ep.steps[-1].action_text) for ep, _ in searches])
        for (ep, n_ctx), (obs_text, obs_ids, error) in zip(searches, found, strict=True):
            _observe(ep.steps[-1], n_ctx, obs_text, obs_ids, agent, error)
    return True


def _allowance_left(ep: Episode) -> float:
    return math.inf if ep.allowance is None else ep.allowance - ep.generated


def _fed(ctx: list[int], out) -> int:
    """Tokens the backend actually fed for this turn: a prefix cache feeds only what it has not seen."""
    return len(ctx) if out.prefilled is None else out.prefilled


def _segment_step(ep: Episode, ctx: list[int], out, text: str, agent: AgentConfig) -> None:
    answered = out.stop == "stop" and protocol.ANSWER_CLOSE in text
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


def _tool_step(ep: Episode, ctx: list[int], out, text: str, env: SearchEnv, agent: AgentConfig) -> bool:
    """Append the turn's step; returns whether it searched and waits for its observation. An invalid turn's
    corrective observation (`on_invalid: continue`) is appended here."""
    action = protocol.turn_action(text) if out.stop == "stop" else "invalid"
    step = Step(out.tokens, out.logprobs, text, action, prefilled=_fed(ctx, out))
    ep.steps.append(step)
    ep.turns_left -= 1
    if action == "answer":
        step.finish_reason = "answer"
    elif out.stop == "eos":
        step.finish_reason = "eos"
    elif action != "search" and agent.on_invalid == "stop":
        step.finish_reason = "length"  # a turn stops only at a tag, EOS or its cap: invalid means it hit the cap
    elif ep.turns_left <= 0:
        step.finish_reason = "max_turns"
    elif action == "search":
        return True
    else:
        _observe(step, len(ctx), *env.feedback(), agent, None)
    return False


def _observe(step: Step, n_ctx: int, obs_text: str, obs_ids: list[int], agent: AgentConfig, error: str | None
             ) -> None:
    """Append an observation to a step, unless it would overflow `max_total_tokens` (the episode then ends)."""
    step.obs_text, step.obs_ids, step.tool_error = obs_text, obs_ids, error
    if n_ctx + len(step.action_ids) + len(step.obs_ids) >= agent.max_total_tokens:
        step.obs_text, step.obs_ids = "", []
        step.finish_reason = "length"
