"""The generation contract: what every backend gives the agent loop, the tree scheduler and evaluation.

A backend takes token ids and returns token ids; text never crosses it, so history is never re-tokenised. One call
is one agent turn for a batch of contexts: each row generates until a stop token, a stop string (`StopStrings`), EOS
or its own token cap, and reports the behaviour log-prob of every token it sampled (log-softmax of logits /
temperature, float32), why it stopped, and how many context tokens it actually fed to the model (a backend that
reuses cached prefixes feeds fewer). Backends: the in-process engine (`engine.HFBackend`, `sampling.backend: hf`),
the plain reference over Hugging Face `generate` (`reference_backend`, `generate`) and vLLM (`vllm_backend`,
`vllm`); `backends.load_backend` builds the configured one.

Stop strings end a turn on text, whatever tokens spell it: with a byte-level BPE tokenizer a closing tag such as
`</search>` is several tokens, and which ones depends on its neighbours (`>` may merge with a following newline or
`</`). The check runs on the text of each generated token (`token_pieces`), so the turn still keeps whole tokens:
the token that completes the string is the turn's last, even when it carries characters after it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from arborl.components.sampling.rng import Generators

STOP_REASONS = ("stop", "eos", "length")

_PIECES: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def token_pieces(tokenizer: Any) -> list[str]:
    """The text of every token id decoded alone (index = id), special tokens kept, for `StopStrings`.

    Decoded in one batch by the tokenizer's Rust backend where it has one (a 150k vocabulary takes a fraction of a
    second), else id by id; cached per tokenizer object (recomputed if its vocabulary grew).

    A byte-level BPE token that holds only part of a multi-byte UTF-8 character decodes alone to replacement
    characters in place of those bytes, but its ASCII bytes decode as they are, so every run of ASCII text survives
    intact in the joined pieces: ASCII stop strings (the agent's tags) are matched exactly. Decoders that drop a
    word's leading space when it is decoded alone (SentencePiece's metaspace) lose that space here too.
    """
    n = len(tokenizer)
    try:
        cached = _PIECES.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: computed every time
        cached = None
    if cached is not None and len(cached) == n:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pieces = backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    else:
        pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                  for i in range(n)]
    try:
        _PIECES[tokenizer] = pieces
    except TypeError:
        pass
    return pieces


@dataclass(frozen=True, eq=False)
class StopStrings:
    """Strings that end a turn when its generated text contains one, checked token by token on `pieces`.

    `texts`: the stop strings (non-empty). `pieces`: the text of every token id (index = id; see `token_pieces`);
    ids past its end (a model's padded vocabulary) count as empty text. Compared by identity (`pieces` is large).
    A row's check state is the tail of its text so far: `advance` keeps only its last `keep` characters, the most
    a stop string can overlap the text before a new token.
    """

    texts: tuple[str, ...]
    pieces: Sequence[str] = field(repr=False)
    keep: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if any(not t for t in self.texts):
            raise ValueError("a stop string cannot be empty")
        object.__setattr__(self, "keep", max((len(t) for t in self.texts), default=1) - 1)

    @classmethod
    def from_tokenizer(cls, texts: Iterable[str], tokenizer: Any) -> StopStrings:
        """Stop strings `texts` over the token texts of `tokenizer` (`token_pieces`)."""
        return cls(tuple(texts), token_pieces(tokenizer))

    def advance(self, tail: str, token: int) -> tuple[str, bool]:
        """(new tail, hit) after `token`: hit is whether a stop string ends in this token's text, i.e. the text
        through it contains one that the text before it did not. Start each row with the tail ""."""
        piece = self.pieces[token] if 0 <= token < len(self.pieces) else ""
        text = tail + piece
        start = len(tail)
        hit = any(text.find(t, max(0, start - len(t) + 1)) >= 0 for t in self.texts)
        return (text[-self.keep:] if self.keep else ""), hit

    def find(self, tokens: Iterable[int]) -> int | None:
        """Index of the first token after which the text of `tokens` contains a stop string, or None."""
        tail = ""
        for n, tok in enumerate(tokens):
            tail, hit = self.advance(tail, tok)
            if hit:
                return n
        return None


@dataclass
class TurnOutput:
    tokens: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution
    stop: str  # "stop" (a stop token or stop string), "eos", or "length" (hit its token cap)
    prefilled: int | None = None  # context tokens actually fed to the model for this row (None: unknown)


@runtime_checkable
class GenerationBackend(Protocol):
    pad_id: int
    eos_id: int

    @property
    def device(self) -> torch.device:
        """Where a shared sampling `torch.Generator` passed to `generate` must live."""
        ...

    def clear_cache(self) -> None:
        """Forget reusable state from earlier calls (cached prefixes), so a seed gives the same tokens whatever
        ran before."""
        ...

    def generate(
        self,
        contexts: list[list[int]],
        max_new_tokens: list[int],
        stop_ids: set[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: Generators = None,
        *,
        stop_strings: StopStrings | None = None,
    ) -> list[TurnOutput]:
        """One turn per context: at most `max_new_tokens[i]` new tokens, ending at the first token of `stop_ids`,
        the first token after which this turn's text contains one of `stop_strings` (stop reason "stop" for both),
        or EOS; that token is kept in `tokens`. `generator`: one shared, or one per row (a row's tokens then depend
        on its own generator only), or None."""
        ...


def cut_turn(tokens: list[int], stop_ids: set[int], eos_id: int,
             stop_strings: StopStrings | None = None) -> TurnOutput:
    """A row's turn from the tokens it generated: up to and including the first EOS, stop token or token that
    completes one of `stop_strings` in the text of `tokens`, else all of them (stop reason "length"). Log-probs
    are left for the caller to fill."""
    tail = ""
    for n, tok in enumerate(tokens):
        if tok == eos_id:
            return TurnOutput(tokens[: n + 1], [], "eos")
        if tok in stop_ids:
            return TurnOutput(tokens[: n + 1], [], "stop")
        if stop_strings is not None:
            tail, hit = stop_strings.advance(tail, tok)
            if hit:
                return TurnOutput(tokens[: n + 1], [], "stop")
    return TurnOutput(tokens, [], "length")
